"""FLUX.2 text encoders: Mistral Small 3.x for dev, Qwen3 for klein.

Both turn a batch of prompts into the context the FLUX.2 transformer consumes: 512 token positions (padding
included, no mask), each the concatenation of three intermediate hidden states of the LLM. Tokenisation and
layer selection follow diffusers' ``Flux2Pipeline`` / ``Flux2KleinPipeline`` (themselves ports of BFL's
reference), so the embeddings are identical to theirs; ``tests/flux2/test_text_encoder.py`` checks that.

Decoder layers past the deepest selected one do not influence the selected hidden states, so by default they
are not loaded at all (Mistral: 30 of 40 layers kept, Qwen3: 27 of 36), which saves memory and time without
changing a single value.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import torch
from kern.errors import ModelFileError, UsageError
from kern.gpu.fp8 import quantize_linears_
from kern.log import get_logger
from kern.models import hf
from torch import nn

__all__ = [
    "SYSTEM_MESSAGE",
    "TEXT_ENCODER_KINDS",
    "Flux2TextEncoder",
    "MistralEmbedder",
    "Qwen3Embedder",
    "detect_text_encoder_kind",
    "load_text_encoder",
]

log = get_logger(__name__)

# BFL's system message for dev's text encoding. The line break after "object" is part of the official string
# and changes the tokens, so it must stay.
SYSTEM_MESSAGE = (
    "You are an AI that reasons about image descriptions. You give structured responses focusing on object "
    "relationships, object\nattribution and actions without speculation."
)

MAX_LENGTH = 512


class Flux2TextEncoder(nn.Module):
    """A frozen LLM backbone plus its tokenizer; ``encoder(prompts)`` returns ``{"ctx": (B, L, 3*hidden)}``.

    ``model`` may be the full Hugging Face model (``Mistral3ForConditionalGeneration``, ``Qwen3ForCausalLM``) or
    its decoder; only the decoder is kept (no lm_head, no vision tower). The encoder takes ownership of it: with
    ``drop_unused_layers`` its layers past the deepest selected one are removed in place.
    """

    kind: ClassVar[str]
    default_layers: ClassVar[tuple[int, ...]]

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        *,
        layers: tuple[int, ...] | None = None,
        max_length: int = MAX_LENGTH,
        drop_unused_layers: bool = True,
    ):
        super().__init__()
        self.out_layers = tuple(layers or self.default_layers)
        self.max_length = max_length
        self.tokenizer = tokenizer
        backbone = model.get_decoder() if hasattr(model, "get_decoder") else model
        n_layers = len(backbone.layers)
        if min(self.out_layers) < 0 or max(self.out_layers) > n_layers:
            raise ModelFileError(
                f"{self.kind} text encoder has {n_layers} layers but FLUX.2 reads hidden states {self.out_layers}"
            )
        if drop_unused_layers:
            _drop_layers_after(backbone, max(self.out_layers))
        self.backbone = backbone.eval().requires_grad_(False)

    @property
    def hidden_size(self) -> int:
        return self.backbone.config.hidden_size

    @property
    def ctx_dim(self) -> int:
        return len(self.out_layers) * self.hidden_size

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.get_input_embeddings().weight.dtype

    @property
    def device(self) -> torch.device:
        return self.backbone.get_input_embeddings().weight.device

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Token ids and attention mask, each (B, max_length), exactly as the official pipeline builds them."""
        raise NotImplementedError

    @torch.no_grad()  # not inference_mode: ctx must stay usable as an input to autograd in the DiT
    def forward(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        if isinstance(prompts, str):
            prompts = [prompts]
        enc = self.tokenize(list(prompts))
        device = self.device
        # The mask only keeps the LLM from attending to padding; the DiT gets every position, padding included.
        out = self.backbone(
            input_ids=enc["input_ids"].to(device),
            attention_mask=enc["attention_mask"].to(device),
            output_hidden_states=True,
            use_cache=False,
        )
        # hidden_states[0] is the embedding output, so [k] is the output of decoder layer k (1-based).
        # Concatenating along features gives [h_a ‖ h_b ‖ h_c] per token, the official stacking order.
        ctx = torch.cat([out.hidden_states[k] for k in self.out_layers], dim=-1)
        return {"ctx": ctx.to(self.dtype)}


class MistralEmbedder(Flux2TextEncoder):
    """FLUX.2 dev: Mistral Small 3.x with BFL's system message, hidden states 10, 20 and 30.

    ``tokenizer`` may be the Pixtral processor the official pipeline uses or its bare tokenizer; either way the
    text is encoded as the processor's ``apply_chat_template`` does it, without needing its image half (which
    requires torchvision): render the processor's chat template, then tokenise, adding special tokens only if
    the rendered text does not already start with BOS.
    """

    kind = "mistral3"
    default_layers = (10, 20, 30)

    def __init__(self, model, tokenizer, *, system_message: str = SYSTEM_MESSAGE, chat_template=None, **kwargs):
        # A processor's own template wins over its tokenizer's, as inside the processor.
        template = chat_template or getattr(tokenizer, "chat_template", None)
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        template = template or tokenizer.chat_template
        if template is None:
            raise ModelFileError(
                "the Mistral tokenizer has no chat template (chat_template.jinja or chat_template.json)"
            )
        super().__init__(model, tokenizer, **kwargs)
        self.chat_template = template
        self.system_message = system_message

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        # "[IMG]" is removed because the Pixtral processor counts image tokens and rejects a text whose count
        # changes under truncation; the official pipeline does the same.
        conversations = [
            [
                {"role": "system", "content": [{"type": "text", "text": self.system_message}]},
                {"role": "user", "content": [{"type": "text", "text": p.replace("[IMG]", "")}]},
            ]
            for p in prompts
        ]
        texts = self.tokenizer.apply_chat_template(
            conversations, chat_template=self.chat_template, add_generation_prompt=False, tokenize=False
        )
        # The processor adds BOS only when the template did not write it; it decides once, from the first text.
        bos = self.tokenizer.bos_token
        enc = self.tokenizer(
            texts,
            add_special_tokens=not (bos is not None and texts[0].startswith(bos)),
            return_tensors="pt",
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


class Qwen3Embedder(Flux2TextEncoder):
    """FLUX.2 klein: Qwen3 with a single user turn and thinking disabled, hidden states 9, 18 and 27."""

    kind = "qwen3"
    default_layers = (9, 18, 27)

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        # No system message; the generation prompt with an empty <think></think> block is part of the text.
        texts = [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}],
                tokenize=False,
                add_generation_prompt=True,
                enable_thinking=False,
            )
            for p in prompts
        ]
        enc = self.tokenizer(
            texts, return_tensors="pt", padding="max_length", truncation=True, max_length=self.max_length
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


TEXT_ENCODER_KINDS: dict[str, type[Flux2TextEncoder]] = {"mistral3": MistralEmbedder, "qwen3": Qwen3Embedder}


def _drop_layers_after(backbone: nn.Module, deepest: int) -> None:
    """Keep decoder layers 1..``deepest``; make ``hidden_states[deepest]`` the un-normed output of the last one.

    transformers replaces the last entry of ``hidden_states`` by the final-normed state, so after truncating
    to ``deepest`` layers the final norm becomes the identity to keep that entry the raw layer output.
    """
    if deepest >= len(backbone.layers):
        return  # the final (normed) state itself is requested, or nothing to drop
    backbone.layers = backbone.layers[:deepest]
    _set_num_layers(backbone.config, deepest)
    backbone.norm = nn.Identity()


def _set_num_layers(text_config, n: int) -> None:
    text_config.num_hidden_layers = n
    if getattr(text_config, "layer_types", None) is not None:
        text_config.layer_types = list(text_config.layer_types)[:n]


def detect_text_encoder_kind(path: str | Path) -> str:
    """Return "mistral3" or "qwen3" from the ``config.json`` in ``path``."""
    path = Path(path)
    cfg = hf.read_config(path)
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    if model_type == "mistral3" or "Mistral3ForConditionalGeneration" in archs:
        return "mistral3"
    if model_type == "qwen3" or any(str(a).startswith("Qwen3") for a in archs):
        return "qwen3"
    raise ModelFileError(
        f"{path / 'config.json'}: model_type {model_type!r} is no FLUX.2 text encoder "
        "(expected 'mistral3' for dev or 'qwen3' for klein)"
    )


def _legacy_processor_chat_template(tok_dir: Path) -> str | None:
    # Processors saved by older transformers keep their template in chat_template.json, which the bare tokenizer
    # does not read but the processor prefers over everything else. chat_template.jinja is read by both.
    legacy = tok_dir / "chat_template.json"
    if not legacy.exists():
        return None
    try:
        return json.loads(legacy.read_text())["chat_template"]
    except (OSError, ValueError, KeyError) as e:
        raise ModelFileError(f"{legacy}: unreadable chat template ({e})") from None


def load_text_encoder(
    kind: str | None,
    path: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    fp8: bool = False,
    *,
    tokenizer_path: str | Path | None = None,
    max_length: int = MAX_LENGTH,
    layers: tuple[int, ...] | None = None,
    drop_unused_layers: bool = True,
    variant: str | None = None,
) -> Flux2TextEncoder:
    """Load a FLUX.2 text encoder from a local Hugging Face folder (config.json, safetensors, tokenizer files) or a
    ComfyUI single file (``qwen_3_4b.safetensors``, ``mistral_3_small_flux2_bf16.safetensors``, ...: ``te_files``).

    ``kind`` is "mistral3" (dev), "qwen3" (klein) or None to read it from config.json (or the file's keys). The
    tokenizer is read from ``tokenizer_path``, else from ``path``, else from a sibling ``tokenizer/`` folder
    (diffusers layout); a single file's from ``tokenizer_path``, a ``tokenizer/`` folder beside it, else the
    default Hugging Face repo (``te_files.tokenizer_specs``). ``variant`` (a single file only): the FLUX.2 variant
    the file must fit (a Qwen3 8B file is refused for klein 4B). With ``fp8`` every linear layer of the LLM is
    stored as float8_e4m3fn and computes in ``dtype``; an fp8 file's layers are taken as they are.
    """
    from transformers import AutoConfig, AutoTokenizer, Mistral3ForConditionalGeneration, Qwen3ForCausalLM

    path = Path(path)
    if path.is_file():
        return _load_single_file(
            kind, path, dtype, device, fp8, tokenizer_path, max_length, layers, drop_unused_layers, variant
        )
    detected = detect_text_encoder_kind(path)
    if kind is None or kind == "auto":
        kind = detected
    elif kind not in TEXT_ENCODER_KINDS:
        raise UsageError(f"unknown text encoder kind {kind!r}; expected one of {sorted(TEXT_ENCODER_KINDS)}")
    elif kind != detected:
        raise ModelFileError(f"{path}: expected a {kind} text encoder, config.json describes {detected}")
    cls = TEXT_ENCODER_KINDS[kind]
    out_layers = tuple(layers or cls.default_layers)

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    text_config = config.get_text_config()
    kept = None
    # Skip reading the weights of layers that cannot affect the selected hidden states.
    if drop_unused_layers and max(out_layers) < text_config.num_hidden_layers:
        kept = max(out_layers)
        _set_num_layers(text_config, kept)
    model_cls = Mistral3ForConditionalGeneration if kind == "mistral3" else Qwen3ForCausalLM
    # transformers' report is silenced only when layers are skipped: it would list their weights as unused.
    model = hf.load_pretrained(
        model_cls,
        path,
        dtype,
        f"{kind} text encoder",
        "the model",
        config=config,
        first_layers=kept,
        quiet=kept is not None,
    )
    if kept is not None:
        # The layers are already cut at load time; the final norm must still go (see _drop_layers_after).
        model.get_decoder().norm = nn.Identity()

    tok_dir = hf.tokenizer_dir(path, tokenizer_path)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    extra = {"chat_template": _legacy_processor_chat_template(tok_dir)} if kind == "mistral3" else {}

    encoder = cls(
        model, tokenizer, layers=out_layers, max_length=max_length, drop_unused_layers=drop_unused_layers, **extra
    )
    del model  # drops lm_head and, for Mistral, the vision tower
    if fp8:
        n = quantize_linears_(encoder.backbone, compute_dtype=dtype, device=device)
        log.info("text encoder linear layers stored as fp8", kind=kind, layers=n)
    return encoder.to(device)


def _load_single_file(kind, path, dtype, device, fp8, tokenizer_path, max_length, layers, drop_unused_layers, variant):
    from transformers import AutoTokenizer

    from kern_flux2 import te_files

    if kind not in (None, "auto") and kind not in TEXT_ENCODER_KINDS:
        raise UsageError(f"unknown text encoder kind {kind!r}; expected one of {sorted(TEXT_ENCODER_KINDS)}")
    found, shapes, metadata = te_files.check_file(path, kind, variant)
    cls = TEXT_ENCODER_KINDS[found.kind]
    out_layers = tuple(layers or cls.default_layers)
    model = te_files.load_decoder(
        path, found, shapes, metadata, dtype, device, fp8, out_layers=out_layers, drop_unused_layers=drop_unused_layers
    )
    tok_dir = te_files.tokenizer_folder(found.kind, path, tokenizer_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelFileError(f"{tok_dir}: cannot load the tokenizer of {found.what} ({e})") from e
    extra = {"chat_template": _legacy_processor_chat_template(tok_dir)} if found.kind == "mistral3" else {}
    encoder = cls(
        model, tokenizer, layers=out_layers, max_length=max_length, drop_unused_layers=drop_unused_layers, **extra
    )
    if fp8:  # layers the file held in bf16 / fp32; its fp8 ones are already Float8StorageLinear
        n = quantize_linears_(encoder.backbone, compute_dtype=dtype, device=device)
        log.info("text encoder linear layers stored as fp8", kind=found.kind, layers=n)
    return encoder.to(device)
