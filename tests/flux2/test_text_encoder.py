"""FLUX.2 text encoding: kern's embeddings equal diffusers' ``encode_prompt`` bit for bit.

No hub access: each test builds a tiny byte-level BPE tokenizer whose chat template mimics the real one
(Mistral Small 3.1's ``[SYSTEM_PROMPT]…[/SYSTEM_PROMPT][INST]…[/INST]``, Qwen3's ``<|im_start|>`` turns with the
empty ``<think>`` block), a tiny random LLM deep enough to have the hidden states FLUX.2 reads (32 layers,
width 32), saves them with ``save_pretrained`` and loads them back through ``load_text_encoder``. The
reference is the official pipeline class run on the same files, at the official length of 512 tokens.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import Flux2KleinPipeline, Flux2Pipeline  # noqa: E402
from kern.errors import ModelFileError, UsageError  # noqa: E402
from kern.gpu.fp8 import Float8StorageLinear  # noqa: E402
from kern.models.tiny import byte_level_bpe  # noqa: E402
from kern_flux2.text_encoder import (  # noqa: E402
    SYSTEM_MESSAGE,
    MistralEmbedder,
    Qwen3Embedder,
    detect_text_encoder_kind,
    load_text_encoder,
)
from kern_flux2.tiny import QWEN3_SPECIALS, QWEN3_TEMPLATE  # noqa: E402  (close to Qwen3's, enable_thinking too)
from tokenizers import Tokenizer, processors  # noqa: E402
from transformers import (  # noqa: E402
    AutoTokenizer,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MistralConfig,
    PixtralVisionConfig,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

N_LAYERS = 32  # deeper than 30 so hidden_states[30] is a raw layer output, as in the 40-layer Mistral
WORDS = "a red fox jumping over the lazy dog photo of cat in style an oil painting very long prompt about many colorful things"
PROMPTS = [
    "a red fox jumping over the lazy dog",
    "a photo of [IMG] a cat, in the style of an oil painting",  # [IMG] is stripped for Mistral only
    "",
    " ".join(["a very long prompt about many colorful things"] * 120),  # > 512 tokens: truncated
]

# Close to Mistral-Small-3.1's template: BOS, system prompt block, [INST] turns with list-of-blocks content.
MISTRAL_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- if messages[0]['content'] is string %}{%- set sys = messages[0]['content'] %}"
    "{%- else %}{%- set sys = messages[0]['content'][0]['text'] %}{%- endif %}"
    "{{- '[SYSTEM_PROMPT]' + sys + '[/SYSTEM_PROMPT]' }}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if message['content'] is string %}{{- '[INST]' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST]' }}{%- for block in message['content'] %}"
    "{%- if block['type'] == 'text' %}{{- block['text'] }}{%- elif block['type'] == 'image' %}{{- '[IMG]' }}{%- endif %}"
    "{%- endfor %}{{- '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- message['content'] + eos_token }}{%- endif %}"
    "{%- endfor %}"
)

MISTRAL_SPECIALS = [
    "<unk>",
    "<s>",
    "</s>",
    "<pad>",
    "[INST]",
    "[/INST]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
    "[IMG]",
    "[IMG_BREAK]",
    "[IMG_END]",
]


def _bpe(specials: list[str], bos: str | None) -> Tokenizer:
    # Byte-level BPE like both real tokenizers, so the system message's newline is a token of its own.
    tok = byte_level_bpe([SYSTEM_MESSAGE, WORDS, *PROMPTS[:2]] * 3, 420, specials)
    if bos is not None:  # Mistral's tokenizer adds BOS itself; the chat template writes it too
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    return tok


def _mistral_tokenizer(padding_side: str, template: str | None) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=_bpe(MISTRAL_SPECIALS, "<s>"),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side=padding_side,
        chat_template=template,
    )


def _mistral_folder(root, padding_side: str, legacy_template: bool):
    """Tiny Mistral3 + tokenizer. With ``legacy_template`` the chat template is only in a processor-style
    chat_template.json (as processors saved by older transformers keep it), else in the tokenizer files."""
    tok = _mistral_tokenizer(padding_side, None if legacy_template else MISTRAL_TEMPLATE)
    text = MistralConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=1024,
        sliding_window=None,
        initializer_range=0.1,
        pad_token_id=tok.pad_token_id,
        rope_theta=1e9,
    )
    vision = PixtralVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
    )
    config = Mistral3Config(
        text_config=text,
        vision_config=vision,
        image_token_index=tok.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=2,
    )
    torch.manual_seed(0)
    Mistral3ForConditionalGeneration(config).save_pretrained(root)
    tok.save_pretrained(root)
    if legacy_template:
        (root / "chat_template.json").write_text(json.dumps({"chat_template": MISTRAL_TEMPLATE}))
    return root


def _qwen3_folder(root, padding_side: str):
    tok = PreTrainedTokenizerFast(
        tokenizer_object=_bpe(QWEN3_SPECIALS, None),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side=padding_side,
        chat_template=QWEN3_TEMPLATE,
    )
    config = Qwen3Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=1024,
        initializer_range=0.1,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).save_pretrained(root)
    tok.save_pretrained(root)
    return root


@pytest.fixture(scope="module", params=[("left", True), ("right", False)], ids=["left-legacy", "right-tokenizer"])
def mistral_dir(request, tmp_path_factory):
    side, legacy = request.param
    return _mistral_folder(tmp_path_factory.mktemp(f"mistral_{side}"), side, legacy)


@pytest.fixture(scope="module", params=["right", "left"])
def qwen3_dir(request, tmp_path_factory):
    return _qwen3_folder(tmp_path_factory.mktemp(f"qwen3_{request.param}"), request.param)


def _diffusers_dev(path, tokenizer=None) -> torch.Tensor:
    """diffusers' Flux2Pipeline.encode_prompt on the same files. Its tokenizer component is normally the
    Pixtral processor, which needs torchvision (absent here); the bare tokenizer carrying the processor's
    template is equivalent for text (transformers' processor renders the same template and adds no second BOS),
    and test_mistral_processor_matches checks the processor itself where torchvision exists."""
    te = Mistral3ForConditionalGeneration.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if (path / "chat_template.json").exists():
            tokenizer.chat_template = json.loads((path / "chat_template.json").read_text())["chat_template"]
    pipe = Flux2Pipeline(scheduler=None, vae=None, text_encoder=te, tokenizer=tokenizer, transformer=None)
    embeds, _ = pipe.encode_prompt(PROMPTS, device=torch.device("cpu"), max_sequence_length=512)
    return embeds


def _diffusers_klein(path) -> torch.Tensor:
    te = Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    pipe = Flux2KleinPipeline(scheduler=None, vae=None, text_encoder=te, tokenizer=tok, transformer=None)
    embeds, _ = pipe.encode_prompt(PROMPTS, device=torch.device("cpu"), max_sequence_length=512)
    return embeds


def test_system_message_is_the_official_one():
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE as OFFICIAL

    assert SYSTEM_MESSAGE == OFFICIAL
    assert "object\nattribution" in SYSTEM_MESSAGE


@pytest.mark.parametrize("drop_unused_layers", [True, False])
def test_mistral_matches_diffusers(mistral_dir, drop_unused_layers):
    enc = load_text_encoder("mistral3", mistral_dir, torch.float32, "cpu", drop_unused_layers=drop_unused_layers)
    assert isinstance(enc, MistralEmbedder) and enc.max_length == 512
    assert len(enc.backbone.layers) == (30 if drop_unused_layers else N_LAYERS)
    ctx = enc(PROMPTS)["ctx"]
    assert ctx.shape == (len(PROMPTS), 512, 3 * 32) and ctx.dtype == torch.float32
    torch.testing.assert_close(ctx, _diffusers_dev(mistral_dir), rtol=0, atol=0)

    ids = enc.tokenize(PROMPTS)
    # The fixture is meaningful: one BOS and one system block each, [IMG] gone, the long prompt fills all 512.
    for special, count in (("<s>", 1), ("[SYSTEM_PROMPT]", 1), ("[IMG]", 0)):
        token_id = enc.tokenizer.convert_tokens_to_ids(special)
        assert (ids["input_ids"] == token_id).sum(1).tolist() == [count] * len(PROMPTS), special
    assert ids["attention_mask"].sum(1).tolist()[3] == 512
    assert ids["attention_mask"].sum(1).tolist()[0] < 512


def test_mistral_processor_matches(tmp_path):
    """The real tokenizer component is a PixtralProcessor: kern given the processor equals diffusers given it."""
    pytest.importorskip("torchvision")
    from transformers import PixtralImageProcessor, PixtralProcessor

    path = _mistral_folder(tmp_path, "left", legacy_template=False)
    proc = PixtralProcessor(
        image_processor=PixtralImageProcessor(patch_size=8, size={"longest_edge": 32}),
        tokenizer=AutoTokenizer.from_pretrained(path),
        patch_size=8,
        spatial_merge_size=2,
        chat_template=MISTRAL_TEMPLATE,
    )
    te = Mistral3ForConditionalGeneration.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    ctx = MistralEmbedder(te, proc)(PROMPTS)["ctx"]
    torch.testing.assert_close(ctx, _diffusers_dev(path, tokenizer=proc), rtol=0, atol=0)


@pytest.mark.parametrize("drop_unused_layers", [True, False])
def test_qwen3_matches_diffusers(qwen3_dir, drop_unused_layers):
    enc = load_text_encoder(None, qwen3_dir, torch.float32, "cpu", drop_unused_layers=drop_unused_layers)
    assert isinstance(enc, Qwen3Embedder)
    assert len(enc.backbone.layers) == (27 if drop_unused_layers else N_LAYERS)
    ctx = enc(PROMPTS)["ctx"]
    assert ctx.shape == (len(PROMPTS), 512, 3 * 32) and ctx.dtype == torch.float32
    torch.testing.assert_close(ctx, _diffusers_klein(qwen3_dir), rtol=0, atol=0)

    ids = enc.tokenize(PROMPTS)
    think = enc.tokenizer.convert_tokens_to_ids("</think>")
    # Every prompt but the truncated one ends its text with the empty think block.
    assert (ids["input_ids"] == think).sum(1).tolist() == [1, 1, 1, 0]
    assert ids["attention_mask"].sum(1).tolist()[3] == 512


def test_stacking_order_is_per_token_layer_concat(qwen3_dir):
    """ctx[..., i*H:(i+1)*H] is hidden_states[layers[i]] of the untouched model."""
    enc = load_text_encoder("qwen3", qwen3_dir, torch.float32, "cpu")
    full = Qwen3ForCausalLM.from_pretrained(qwen3_dir, dtype=torch.float32, local_files_only=True)
    ids = enc.tokenize(PROMPTS[:2])
    with torch.no_grad():
        hs = full(**ids, output_hidden_states=True, use_cache=False).hidden_states
    ctx = enc(PROMPTS[:2])["ctx"]
    for i, k in enumerate((9, 18, 27)):
        assert torch.equal(ctx[..., i * 32 : (i + 1) * 32], hs[k])
    assert not torch.equal(ctx[..., 64:], hs[28])  # an off-by-one layer would be caught


def test_shorter_max_length(qwen3_dir):
    enc = load_text_encoder("qwen3", qwen3_dir, torch.float32, "cpu", max_length=64)
    assert enc(PROMPTS[:2])["ctx"].shape == (2, 64, 96)


def test_bf16_and_fp8(qwen3_dir):
    ref = load_text_encoder("qwen3", qwen3_dir, torch.bfloat16, "cpu")
    q = load_text_encoder("qwen3", qwen3_dir, torch.bfloat16, "cpu", fp8=True)
    n_fp8 = sum(isinstance(m, Float8StorageLinear) for m in q.backbone.modules())
    assert n_fp8 == 27 * 7  # q, k, v, o, gate, up, down per kept layer; embeddings and norms untouched
    a, b = ref(PROMPTS)["ctx"], q(PROMPTS)["ctx"]
    assert a.dtype == b.dtype == torch.bfloat16 and q.dtype == torch.bfloat16
    # e4m3 rounds each weight by at most 2**-4 relative, ≈2.5 % RMS error per matmul (tests/kernel/test_fp8.py).
    # The residual stream accumulates one such error per layer, roughly as a random walk: ≈2.5 % × √27 ≈ 13 %
    # at layer 27 in the worst case; this fixture measures ≈9 %. 15 % bound; a wrong scale/layout gives O(100 %).
    rel = ((a.float() - b.float()).norm() / a.float().norm()).item()
    assert rel < 0.15, rel


def test_detect_kind_and_errors(mistral_dir, qwen3_dir, tmp_path):
    assert detect_text_encoder_kind(mistral_dir) == "mistral3"
    assert detect_text_encoder_kind(qwen3_dir) == "qwen3"
    with pytest.raises(ModelFileError, match="expected a mistral3"):
        load_text_encoder("mistral3", qwen3_dir, torch.float32, "cpu")
    with pytest.raises(UsageError, match="unknown text encoder kind"):
        load_text_encoder("t5", qwen3_dir, torch.float32, "cpu")
    with pytest.raises(ModelFileError, match="config.json"):
        detect_text_encoder_kind(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(ModelFileError, match="no FLUX.2 text encoder"):
        detect_text_encoder_kind(tmp_path)


def test_missing_weight_is_an_error(tmp_path):
    from safetensors.torch import load_file, save_file

    path = _qwen3_folder(tmp_path, "right")
    weights = load_file(path / "model.safetensors")
    del weights["model.layers.3.mlp.up_proj.weight"]
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelFileError, match="missing"):
        load_text_encoder("qwen3", path, torch.float32, "cpu")


def test_diffusers_layout_finds_sibling_tokenizer(tmp_path):
    """text_encoder/ without tokenizer files picks up ../tokenizer/, as in the FLUX.2 Hugging Face repos."""
    src = _qwen3_folder(tmp_path / "flat", "right")
    (tmp_path / "repo" / "text_encoder").mkdir(parents=True)
    (tmp_path / "repo" / "tokenizer").mkdir()
    for f in src.iterdir():
        is_model = f.name == "config.json" or f.suffix == ".safetensors" or f.name == "generation_config.json"
        f.rename(tmp_path / "repo" / ("text_encoder" if is_model else "tokenizer") / f.name)
    enc = load_text_encoder("qwen3", tmp_path / "repo" / "text_encoder", torch.float32, "cpu", max_length=32)
    assert enc(["a cat"])["ctx"].shape == (1, 32, 96)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_pickled_weights_are_never_loaded(tmp_path):
    """A text-encoder folder holding pytorch_model.bin (a pickle) instead of safetensors is refused, unopened."""
    path = _qwen3_folder(tmp_path, "right")
    (path / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    torch.save({"model.embed_tokens.weight": _Payload(marker)}, path / "pytorch_model.bin")
    with pytest.raises(ModelFileError, match="cannot load"):
        load_text_encoder("qwen3", path, torch.float32, "cpu")
    assert not marker.exists()
