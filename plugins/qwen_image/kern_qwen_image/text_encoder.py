"""Qwen-Image text encoding with Qwen2.5-VL-7B, as diffusers' Qwen-Image pipelines do it.

Every variant wraps the prompt in a fixed chat template, runs the VLM once and keeps the **last** hidden state
(after the final RMSNorm) of the valid tokens, minus a fixed number of leading template tokens (the system
turn and ``<|im_start|>user\\n``). Rows are right-padded with zeros to the longest prompt of the batch and come
with a 0/1 mask, so the context is variable length:

======================  ===============================================  ====  ===========================
mode                    user turn                                        drop  images for the VLM
======================  ===============================================  ====  ===========================
``t2i`` (and 2512)      ``{prompt}``                                      34   none
``layered``             ``{prompt}`` (T2I template)                       34   none (captioning only)
``edit`` (2508)         ``<|vision_start|><|image_pad|><|vision_end|>``   64   1, ≈1024² area
                        ``{prompt}``
``edit_plus`` (2509,    ``Picture 1: <|vision_start|><|image_pad|>``      64   1..N, each ≈384² area
2511)                   ``<|vision_end|>Picture 2: …{prompt}``
======================  ===============================================  ====  ===========================

Only the template prefix is dropped, so in the edit modes the kept context starts with the image labels and
the image tokens themselves (e.g. 196 tokens per 384² Edit-Plus image, 1369 for a 1024² Edit image), and in
every mode it ends with the 5 template tokens ``<|im_end|>\\n<|im_start|>assistant\\n`` (unless truncated).

Lengths, as in diffusers' ``encode_prompt``: ``t2i`` truncates the token sequence at 1024 + 34 and then keeps
at most ``max_sequence_length`` (default 1024; ``QwenImagePipeline.__call__`` passes 512) context rows;
``layered`` does not truncate the tokens but keeps at most ``max_sequence_length`` rows; the edit modes
truncate nothing.

Image tokens and their positions. With transformers ≥ 5.15, Qwen2.5-VL only gives image tokens their 3-D
(t, h, w) M-RoPE positions when it receives the processor's ``mm_token_type_ids``; diffusers up to at least
0.42 does not pass it (diffusers issue #14194, fix in PR #14189), so its edit embeddings then use plain
sequential positions for the image tokens, unlike the transformers 4.x the models were trained with. kern
passes it (``multimodal_positions=True``, the default), which reproduces the 4.x embeddings;
``multimodal_positions=False`` reproduces unpatched diffusers under transformers 5 bit for bit. Text-only
modes are unaffected.

The vision side needs no torchvision: the image processor is loaded with ``AutoImageProcessor``, which picks
the torchvision backend when installed and the PIL one (``Qwen2VLImageProcessorPil``) otherwise, and the
``<|image_pad|>`` expansion the processor would do is done here (the ``Qwen2_5_VLProcessor`` class itself
cannot be built without torchvision in transformers 5, because of its video processor). Note that the two
backends resize slightly differently, so pixel values, and hence edit embeddings, differ a little between an
environment with torchvision and one without; diffusers in the same environment picks the same backend.

``tests/qwen_image/test_text_encoder.py`` checks ``ctx``/``mask`` against diffusers' ``encode_prompt``.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from kern.errors import ModelFileError, UsageError
from kern.gpu.fp8 import quantize_linears_
from kern.log import get_logger
from kern.models import hf
from torch import nn

from kern_qwen_image.geometry import calculate_dimensions

__all__ = [
    "CAPTION_PROMPTS",
    "CONDITION_IMAGE_AREA",
    "DROP_TOKENS",
    "EDIT_IMAGE_AREA",
    "IMAGE_LABEL",
    "MODES",
    "TEMPLATES",
    "QwenImageTextEncoder",
    "calculate_dimensions",
    "load_text_encoder",
    "vlm_image_size",
]

log = get_logger(__name__)

_T2I_SYSTEM = (
    "Describe the image by detailing the color, shape, size, texture, quantity, text, spatial relationships of "
    "the objects and background:"
)
_EDIT_SYSTEM = (
    "Describe the key features of the input image (color, shape, size, texture, objects, background), then "
    "explain how the user's text instruction should alter or modify the image. Generate a new image that meets "
    "the user's requirements while maintaining consistency with the original input where appropriate."
)
_VISION_SLOT = "<|vision_start|><|image_pad|><|vision_end|>"
_IMAGE_PAD = "<|image_pad|>"


def _chat(system: str, user: str) -> str:
    return f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


# "{}" is where the prompt goes (str.format, as the pipelines do).
TEMPLATES: dict[str, str] = {
    "t2i": _chat(_T2I_SYSTEM, "{}"),
    "layered": _chat(_T2I_SYSTEM, "{}"),
    "edit": _chat(_EDIT_SYSTEM, _VISION_SLOT + "{}"),
    "edit_plus": _chat(_EDIT_SYSTEM, "{}"),
}
# Leading template tokens removed from the hidden states: "<|im_start|>system\n…<|im_end|>\n<|im_start|>user\n".
DROP_TOKENS: dict[str, int] = {"t2i": 34, "layered": 34, "edit": 64, "edit_plus": 64}
MODES = tuple(TEMPLATES)
# Edit-Plus prepends one of these per image (N = 1, 2, …) to the prompt, without separators.
IMAGE_LABEL = "Picture {}: " + _VISION_SLOT

TOKENIZER_MAX_LENGTH = 1024  # the pipelines' tokenizer_max_length
CONDITION_IMAGE_AREA = 384 * 384  # Edit-Plus: area of each image the VLM sees
EDIT_IMAGE_AREA = 1024 * 1024  # Edit 2508: the VLM sees the image at the VAE size (also Edit-Plus's VAE area)
_VLM_IMAGE_AREA = {"edit": EDIT_IMAGE_AREA, "edit_plus": CONDITION_IMAGE_AREA}


def _lines(*lines: str) -> str:
    return "\n".join(lines)


_CAPTION_HEAD = ("<|im_start|>system", "You are a helpful assistant.<|im_end|>", "<|im_start|>user")
_CAPTION_TAIL = (_VISION_SLOT + "<|im_end|>", "<|im_start|>assistant", "")
# Qwen-Image-Layered's auto-captioning prompts. The line breaks inside sentences (and the trailing space after
# "including:") are part of the official strings: they change the tokens, so they must stay.
CAPTION_PROMPTS: dict[str, str] = {
    "en": _lines(
        *_CAPTION_HEAD,
        "# Image Annotator",
        "You are a professional",
        "image annotator. Please write an image caption based on the input image:",
        "1. Write the caption using natural,",
        "descriptive language without structured formats or rich text.",
        "2. Enrich caption details by including: ",
        " - Object",
        "attributes, such as quantity, color, shape, size, material, state, position, actions, and so on",
        " - Vision Relations",
        "between objects, such as spatial relations, functional relations, possessive relations, attachment "
        "relations, action",
        "relations, comparative relations, causal relations, and so on",
        " - Environmental details, such as weather, lighting,",
        "colors, textures, atmosphere, and so on",
        " - Identify the text clearly visible in the image, without translation or",
        "explanation, and highlight it in the caption with quotation marks",
        "3. Maintain authenticity and accuracy:",
        " - Avoid",
        "generalizations",
        " - Describe all visible information in the image, while do not add information not explicitly shown in",
        "the image",
        *_CAPTION_TAIL,
    ),
    "zh": _lines(
        *_CAPTION_HEAD,
        "# 图像标注器",
        "你是一个专业的图像标注器。请基于输入图像，撰写图注:",
        "1.",
        "使用自然、描述性的语言撰写图注，不要使用结构化形式或富文本形式。",
        "2. 通过加入以下内容，丰富图注细节：",
        " - 对象的属性：如数量、颜色、形状、大小、位置、材质、状态、动作等",
        " -",
        "对象间的视觉关系：如空间关系、功能关系、动作关系、从属关系、比较关系、因果关系等",
        " - 环境细节：例如天气、光照、颜色、纹理、气氛等",
        " - 文字内容：识别图像中清晰可见的文字，不做翻译和解释，用引号在图注中强调",
        "3.",
        "保持真实性与准确性：",
        " - 不要使用笼统的描述",
        " -",
        "描述图像中所有可见的信息，但不要加入没有在图像中出现的内容",
        *_CAPTION_TAIL,
    ),
}
CAPTION_MAX_NEW_TOKENS = 512


def vlm_image_size(width: int, height: int, mode: str) -> tuple[int, int]:
    """(width, height) the pipeline resizes an input image of ``width``×``height`` to before the VLM sees it.

    Edit: ≈1024² area; Edit-Plus: ≈384² area (its VAE copy, not handled here, is ≈1024²). The Qwen2-VL image
    processor then rounds each side to a multiple of 28 (14-pixel patches, 2×2 merge), one token per 28×28.
    """
    if mode not in _VLM_IMAGE_AREA:
        raise UsageError(f"mode {mode!r} passes no images to the VLM; expected 'edit' or 'edit_plus'")
    return calculate_dimensions(_VLM_IMAGE_AREA[mode], width / height)


def _resize(image, width: int, height: int):
    # diffusers' VaeImageProcessor.resize for PIL images: Lanczos, no reducing gap.
    from PIL import Image

    return image.resize((width, height), resample=Image.Resampling.LANCZOS, reducing_gap=None)


def _as_image_list(item) -> list:
    if item is None:
        return []
    if isinstance(item, (list, tuple)):
        return list(item)
    return [item]


class QwenImageTextEncoder(nn.Module):
    """Qwen2.5-VL plus tokenizer (and image processor for the edit modes); returns ``{"ctx", "mask"}``.

    ``encoder(prompts, images=None, mode="t2i")`` gives ``ctx`` (B, L, 3584) in the model dtype and ``mask``
    (B, L) int64, 1 for real rows and 0 for the zero padding at the end of shorter prompts: exactly diffusers'
    ``prompt_embeds`` and ``prompt_embeds_mask``, except that diffusers returns ``None`` for a mask that is all
    ones while kern always returns the tensor (an all-ones mask means "no mask" to the transformer).

    ``images`` is one entry per prompt: for ``edit`` one PIL image, for ``edit_plus`` a list of PIL images
    (labelled "Picture 1:", "Picture 2:", … in order; an empty list gives no labels). With ``resize_images``
    (default) each is first resized as the pipeline's ``__call__`` does (:func:`vlm_image_size`, Lanczos);
    pass False for images already at that size. diffusers' edit ``encode_prompt`` takes one image set for the
    whole batch (so in practice one prompt at a time); here a batch may mix prompts with different images and
    image counts, and each row then equals its single-prompt encoding up to float rounding.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        image_processor=None,
        *,
        vl_tokenizer=None,
        max_sequence_length: int = TOKENIZER_MAX_LENGTH,
        multimodal_positions: bool = True,
    ):
        super().__init__()
        if not 1 <= max_sequence_length <= TOKENIZER_MAX_LENGTH:
            raise UsageError(f"max_sequence_length must be in 1..{TOKENIZER_MAX_LENGTH}, got {max_sequence_length}")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        # diffusers tokenises edit prompts with the processor's tokenizer; normally the same files.
        self.vl_tokenizer = vl_tokenizer if vl_tokenizer is not None else tokenizer
        self.image_processor = image_processor
        self.max_sequence_length = max_sequence_length
        self.multimodal_positions = multimodal_positions
        self.image_token_id = self.vl_tokenizer.convert_tokens_to_ids(_IMAGE_PAD)
        cfg_id = getattr(model.config, "image_token_id", None)
        if cfg_id is not None and cfg_id != self.image_token_id:
            raise ModelFileError(
                f"tokenizer maps {_IMAGE_PAD} to id {self.image_token_id}, the model config expects {cfg_id}"
            )
        self._check_drop_counts()

    def _check_drop_counts(self) -> None:
        # The drop counts are fixed numbers in the pipelines, right for the Qwen2.5-VL tokenizer only.
        for mode, system in (("t2i", _T2I_SYSTEM), ("edit", _EDIT_SYSTEM)):
            prefix = f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n"
            n = len(self.tokenizer(prefix)["input_ids"])
            if n != DROP_TOKENS[mode]:
                log.warning(
                    "tokenizer splits the template prefix differently from Qwen2.5-VL's; the pipeline's fixed "
                    "drop count no longer matches it",
                    mode=mode,
                    prefix_tokens=n,
                    drop=DROP_TOKENS[mode],
                )

    @property
    def hidden_size(self) -> int:
        return self.model.config.get_text_config().hidden_size

    @property
    def has_vision(self) -> bool:
        return self.image_processor is not None and getattr(self.model.model, "visual", None) is not None

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    # ---- inputs ----------------------------------------------------------------------------------------------

    def _require_vision(self, what: str) -> None:
        if not self.has_vision:
            raise UsageError(
                f"{what} needs the Qwen2.5-VL vision tower and image processor; load the text encoder with "
                "need_vision=True (the processor files, preprocessor_config.json, must be in the folder, its "
                "processor/ sibling or processor_path)"
            )

    def _vision_inputs(self, texts: list[str], images: list, tokenizer, **tok_kwargs) -> dict[str, torch.Tensor]:
        """What the Qwen2.5-VL processor returns: pixel values, grids, and texts with each ``<|image_pad|>``
        expanded to its image's token count (images matched to slots in order, across the whole batch)."""
        n_slots = sum(t.count(_IMAGE_PAD) for t in texts)
        if n_slots != len(images):
            raise UsageError(f"{n_slots} image slots in the prompts but {len(images)} images")
        out: dict[str, torch.Tensor] = {}
        if images:
            vision = self.image_processor(images=images, return_tensors="pt")
            grids = vision["image_grid_thw"]
            merge = self.image_processor.merge_size
            counts = iter((grids.prod(-1) // (merge * merge)).tolist())
            expanded = []
            for text in texts:
                parts = text.split(_IMAGE_PAD)
                pieces = [parts[0]]
                for part in parts[1:]:
                    pieces.append(_IMAGE_PAD * next(counts) + part)
                expanded.append("".join(pieces))
            texts = expanded
            out["pixel_values"] = vision["pixel_values"]
            out["image_grid_thw"] = grids
        enc = tokenizer(texts, return_tensors="pt", **tok_kwargs)
        out["input_ids"], out["attention_mask"] = enc["input_ids"], enc["attention_mask"]
        if images:
            # The processor's mm_token_type_ids: 1 on image tokens, 0 elsewhere (no videos here).
            out["mm_token_type_ids"] = (enc["input_ids"] == self.image_token_id).to(torch.int64)
        return out

    def prepare(
        self, prompts: Sequence[str], images: Sequence | None = None, mode: str = "t2i", resize_images: bool = True
    ) -> dict[str, torch.Tensor]:
        """Model inputs for ``prompts``: ``input_ids``, ``attention_mask`` and, with images, ``pixel_values``,
        ``image_grid_thw`` and ``mm_token_type_ids`` (CPU tensors)."""
        if mode not in TEMPLATES:
            raise UsageError(f"unknown text encoding mode {mode!r}; expected one of {list(MODES)}")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise UsageError("no prompts to encode")
        template = TEMPLATES[mode]
        if mode in ("t2i", "layered"):
            if images is not None and any(_as_image_list(i) for i in images):
                raise UsageError(f"mode {mode!r} takes no images; use 'edit' or 'edit_plus'")
            texts = [template.format(p) for p in prompts]
            kwargs: dict[str, Any] = {"padding": True}
            if mode == "t2i":
                kwargs.update(truncation=True, max_length=TOKENIZER_MAX_LENGTH + DROP_TOKENS[mode])
            enc = self.tokenizer(texts, return_tensors="pt", **kwargs)
            return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

        self._require_vision(f"mode {mode!r}")
        if images is None or len(images) != len(prompts):
            got = "no images" if images is None else f"{len(images)} image entries"
            raise UsageError(f"mode {mode!r} needs one image entry per prompt: {len(prompts)} prompts, {got}")
        per_prompt = [_as_image_list(i) for i in images]
        if mode == "edit":
            bad = [k for k, imgs in enumerate(per_prompt) if len(imgs) != 1]
            if bad:
                raise UsageError(f"mode 'edit' takes exactly one image per prompt; prompts {bad} have another count")
            texts = [template.format(p) for p in prompts]
        else:
            texts = [
                template.format("".join(IMAGE_LABEL.format(i + 1) for i in range(len(imgs))) + p)
                for p, imgs in zip(prompts, per_prompt)
            ]
        flat = [img for imgs in per_prompt for img in imgs]
        if resize_images:
            flat = [_resize(img, *vlm_image_size(img.width, img.height, mode)) for img in flat]
        return self._vision_inputs(texts, flat, self.vl_tokenizer, padding=True)

    # ---- encoding --------------------------------------------------------------------------------------------

    def _run(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        device = self.device
        kwargs = {k: v.to(device) for k, v in inputs.items()}
        if not (self.multimodal_positions and _accepts_mm_token_type_ids(self.model.model)):
            kwargs.pop("mm_token_type_ids", None)
        if "pixel_values" in kwargs:
            kwargs["pixel_values"] = kwargs["pixel_values"].to(self.model.model.visual.dtype)
        # The decoder alone (no lm_head logits); its last_hidden_state is hidden_states[-1], after the final norm.
        return self.model.model(**kwargs, use_cache=False).last_hidden_state

    @torch.no_grad()  # not inference_mode: ctx must stay usable as an input to autograd in the DiT
    def forward(
        self,
        prompts: Sequence[str] | str,
        images: Sequence | None = None,
        mode: str = "t2i",
        *,
        resize_images: bool = True,
    ) -> dict[str, torch.Tensor]:
        inputs = self.prepare(prompts, images, mode, resize_images)
        hidden = self._run(inputs)
        valid = inputs["attention_mask"].to(hidden.device).bool()
        drop = DROP_TOKENS[mode]
        # Valid tokens of each row (any padding side), the template prefix removed, right-padded with zeros.
        rows = [h[m][drop:] for h, m in zip(hidden, valid)]
        length = max(r.shape[0] for r in rows)
        ctx = hidden.new_zeros(len(rows), length, hidden.shape[-1])
        mask = torch.zeros(len(rows), length, dtype=torch.int64, device=hidden.device)
        for i, r in enumerate(rows):
            ctx[i, : r.shape[0]] = r
            mask[i, : r.shape[0]] = 1
        if mode in ("t2i", "layered"):
            ctx, mask = ctx[:, : self.max_sequence_length], mask[:, : self.max_sequence_length]
        return {"ctx": ctx.to(self.dtype), "mask": mask}

    # ---- Layered auto-captioning -----------------------------------------------------------------------------

    @torch.no_grad()
    def caption_image(
        self,
        image,
        lang: str = "en",
        *,
        resolution: int | None = 640,
        max_new_tokens: int = CAPTION_MAX_NEW_TOKENS,
    ) -> str:
        """Caption ``image`` as Qwen-Image-Layered does when it gets no prompt.

        The pipeline resizes the (RGBA) input to ≈``resolution``² area (640 or 1024, multiples of 32, Lanczos;
        ``resolution=None`` keeps the image as given), asks the VLM with the English or Chinese annotator prompt
        ("You are a helpful assistant." system turn, the image at the end of the user turn) and runs
        ``generate(max_new_tokens=512)`` with the checkpoint's own generation config (greedy unless its
        ``generation_config.json`` enables sampling), then decodes the new tokens without special tokens and
        strips whitespace. Note: ``QwenImageLayeredPipeline.__call__`` defaults to the Chinese prompt
        (``use_en_prompt=False``).
        """
        if lang not in CAPTION_PROMPTS:
            raise UsageError(f"caption language must be one of {sorted(CAPTION_PROMPTS)}, got {lang!r}")
        self._require_vision("captioning")
        if getattr(self.model, "lm_head", None) is None:
            raise UsageError("captioning needs the language-model head; load the text encoder with need_vision=True")
        if resolution is not None:
            image = _resize(image, *calculate_dimensions(resolution * resolution, image.width / image.height))
        inputs = self._vision_inputs([CAPTION_PROMPTS[lang]], [image], self.vl_tokenizer, padding=True)
        device = self.device
        inputs = {k: v.to(device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.model.visual.dtype)
        if not _accepts_mm_token_type_ids(self.model.model):
            inputs.pop("mm_token_type_ids")
        out = self.model.generate(**inputs, max_new_tokens=max_new_tokens)
        new_tokens = out[:, inputs["input_ids"].shape[1] :]
        text = self.vl_tokenizer.batch_decode(new_tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return text[0].strip()


def _accepts_mm_token_type_ids(module: nn.Module) -> bool:
    # transformers >= 5.15 takes the token types to build M-RoPE positions; 4.x finds image tokens by itself.
    return "mm_token_type_ids" in inspect.signature(module.forward).parameters


# ---- loading ---------------------------------------------------------------------------------------------------


def _check_is_qwen25vl(path: Path) -> None:
    cfg = hf.read_config(path)
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    if model_type != "qwen2_5_vl" and "Qwen2_5_VLForConditionalGeneration" not in archs:
        raise ModelFileError(
            f"{path / 'config.json'}: model_type {model_type!r} (architectures {archs}) is not Qwen2.5-VL; "
            "Qwen-Image's text encoder is Qwen2.5-VL-7B-Instruct (model_type 'qwen2_5_vl'), e.g. the "
            "text_encoder/ folder of a Qwen-Image repository"
        )


def _processor_dir(path: Path, given: str | Path | None) -> Path:
    cands = [Path(given)] if given is not None else [path, path.parent / "processor"]
    for cand in cands:
        if (cand / "preprocessor_config.json").exists():
            return cand
    raise ModelFileError(
        f"no image processor (preprocessor_config.json) in {' or '.join(str(c) for c in cands)}; the edit variants "
        "and automatic captioning (--auto-caption-lang) need the Qwen2.5-VL processor files: put them (the processor/ "
        "folder of a Qwen-Image-Edit or -Layered repository) into the text-encoder folder or a processor/ folder beside "
        "it (processor_path when loading in Python), or write the prompt instead of captioning"
    )


def load_text_encoder(
    path: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    fp8: bool = False,
    need_vision: bool = False,
    *,
    tokenizer_path: str | Path | None = None,
    processor_path: str | Path | None = None,
    max_sequence_length: int = TOKENIZER_MAX_LENGTH,
    multimodal_positions: bool = True,
) -> QwenImageTextEncoder:
    """Load Qwen2.5-VL from a local Hugging Face folder (config.json, safetensors, tokenizer files) or a ComfyUI
    single file (``qwen_2.5_vl_7b.safetensors``, its fp8-scaled variant: ``te_files``).

    The tokenizer is read from ``tokenizer_path``, else ``path``, else the sibling ``tokenizer/`` folder
    (diffusers layout); a single file's from ``tokenizer_path``, a ``tokenizer/`` folder beside it (``processor/``
    likewise), else the default Hugging Face repo (``te_files.tokenizer_specs``). With ``need_vision`` (edit modes, Layered captioning) the image processor is read from
    ``processor_path``, else ``path``, else the sibling ``processor/`` folder, and that folder's tokenizer, if
    it has one, tokenises the image prompts as in diffusers; without it the vision tower and the lm_head are
    dropped after loading. With ``fp8`` the language model's linear layers are stored as float8_e4m3fn
    (computing in ``dtype``); the vision tower, embeddings, norms and lm_head stay in ``dtype``.
    """
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    path = Path(path)
    if path.is_file():
        from kern_qwen_image import te_files

        te_files.check_file(path)  # a wrong file is named before any tokenizer is looked for
        tok_dir = te_files.tokenizer_folder(path, tokenizer_path)
        proc_dir = te_files.processor_folder(path, processor_path) if need_vision else None
        model = te_files.load_model(path, dtype, device, fp8, need_vision)
    else:
        _check_is_qwen25vl(path)
        tok_dir = hf.tokenizer_dir(path, tokenizer_path)
        proc_dir = _processor_dir(path, processor_path) if need_vision else None
        model = hf.load_pretrained(
            Qwen2_5_VLForConditionalGeneration, path, dtype, "Qwen2.5-VL text encoder", "Qwen2.5-VL"
        )

    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelFileError(f"{tok_dir}: cannot load the tokenizer ({e})") from e
    image_processor = vl_tokenizer = None
    if need_vision:
        try:
            image_processor = AutoImageProcessor.from_pretrained(proc_dir, local_files_only=True)
            if hf.has_tokenizer(proc_dir) and proc_dir != tok_dir:
                vl_tokenizer = AutoTokenizer.from_pretrained(proc_dir, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ModelFileError(f"{proc_dir}: cannot load the Qwen2.5-VL processor ({e})") from e
        if not hasattr(image_processor, "merge_size"):
            raise ModelFileError(
                f"{proc_dir}: {type(image_processor).__name__} is not a Qwen2-VL image processor (no merge_size)"
            )
    else:
        # Text-only use: neither the vision tower nor the 152k-row lm_head is ever run.
        model.model.visual = None
        model.lm_head = None

    encoder = QwenImageTextEncoder(
        model,
        tokenizer,
        image_processor,
        vl_tokenizer=vl_tokenizer,
        max_sequence_length=max_sequence_length,
        multimodal_positions=multimodal_positions,
    )
    if fp8:
        n = quantize_linears_(model.model.language_model, compute_dtype=dtype, device=device)
        log.info("text encoder linear layers stored as fp8", layers=n)
    return encoder.to(device)
