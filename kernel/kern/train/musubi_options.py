"""musubi-tuner's training options: which take a value, which kern ignores or refuses (and why), and the command
line split as argparse reads it. Source: musubi-tuner ``src/musubi_tuner/training/parser_common.py`` and the
``*_train_network.py`` parsers (commit 30c658c). The translation itself is :mod:`kern.train.musubi_args`.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any, Mapping, Sequence

import attrs

from kern.errors import UsageError

FLAG, VALUE, LIST = "flag", "value", "list"
_FLAGS = """sdpa flash_attn sage_attn xformers flash3 split_attn compile compile_fullgraph cuda_allow_tf32
cuda_cudnn_benchmark dynamo_fullgraph dynamo_dynamic persistent_data_loader_workers gradient_checkpointing
gradient_checkpointing_cpu_offload log_config ddp_gradient_as_bucket_view ddp_static_graph sample_at_first fp8_base
full_fp16 full_bf16 use_pinned_memory_for_block_swap block_swap_h2d_only img_in_txt_in_offloading disable_numpy_memmap
preserve_distribution_shape no_metadata dim_from_weights save_state save_state_on_train_end save_state_to_huggingface
resume_from_huggingface async_upload fp8_scaled fp8_text_encoder fp8_vl remove_first_image_from_target edit
edit_plus"""
_LISTS = "optimizer_args lr_scheduler_args network_args base_weights base_weights_multiplier"
_VALUES = """config_file dataset_config compile_backend compile_mode compile_dynamic compile_cache_size_limit
dynamo_backend dynamo_mode max_train_steps max_train_epochs max_data_loader_n_workers seed gradient_accumulation_steps
mixed_precision save_precision logging_dir log_with log_prefix log_tracker_name wandb_run_name log_tracker_config
wandb_api_key ddp_timeout sample_every_n_steps sample_every_n_epochs sample_prompts optimizer_type learning_rate
max_grad_norm lr_scheduler lr_warmup_steps lr_decay_steps lr_scheduler_num_cycles lr_scheduler_power
lr_scheduler_timescale lr_scheduler_min_lr_ratio lr_scheduler_type blocks_to_swap block_swap_ring_size guidance_scale
flow_shift timestep_sampling discrete_flow_shift sigmoid_scale weighting_scheme logit_mean logit_std mode_scale
min_timestep max_timestep num_timestep_buckets show_timesteps network_weights network_module network_dim network_alpha
network_dropout training_comment scale_weight_norms output_dir output_name resume save_every_n_epochs
save_every_n_steps save_last_n_epochs save_last_n_epochs_state save_last_n_steps save_last_n_steps_state
metadata_title metadata_author metadata_description metadata_license metadata_tags metadata_reso metadata_arch
huggingface_repo_id huggingface_repo_type huggingface_path_in_repo huggingface_token huggingface_repo_visibility dit
vae vae_dtype text_encoder num_layers model_version"""
OPTIONS: dict[str, str] = {
    **{n: FLAG for n in _FLAGS.split()},
    **{n: LIST for n in _LISTS.split()},
    **{n: VALUE for n in _VALUES.split()},
}

# Options with no meaning in kern: dropped, listed on stderr.
IGNORED = {
    "sdpa": "kern's attention is SDPA by default (train.attention = auto)",
    "split_attn": "kern needs no split attention; the result is the same",
    "max_data_loader_n_workers": "kern reads cached tensors in the training loop; there are no loader workers",
    "persistent_data_loader_workers": "kern reads cached tensors in the training loop; there are no loader workers",
    "fp8_scaled": "kern's fp8 base (train.base_precision = fp8) always keeps per-row scales",
    "use_pinned_memory_for_block_swap": "kern's block swap picks its own transfers",
    "block_swap_h2d_only": "kern's block swap picks its own transfers",
    "block_swap_ring_size": "kern's block swap picks its own transfers",
    "img_in_txt_in_offloading": "kern's block swap picks its own transfers",
    "disable_numpy_memmap": "kern reads checkpoints its own way",
    "compile_backend": "kern compiles the repeated blocks itself (train.compile)",
    "compile_mode": "kern compiles the repeated blocks itself (train.compile)",
    "compile_dynamic": "kern compiles the repeated blocks itself (train.compile)",
    "compile_fullgraph": "kern compiles the repeated blocks itself (train.compile)",
    "compile_cache_size_limit": "kern compiles the repeated blocks itself (train.compile)",
    "dynamo_backend": "kern compiles the repeated blocks itself (train.compile)",
    "dynamo_mode": "kern compiles the repeated blocks itself (train.compile)",
    "dynamo_fullgraph": "kern compiles the repeated blocks itself (train.compile)",
    "dynamo_dynamic": "kern compiles the repeated blocks itself (train.compile)",
    "cuda_allow_tf32": "kern sets the matmul precision itself",
    "cuda_cudnn_benchmark": "kern sets the cuDNN flags itself",
    "logging_dir": "kern logs into the run folder (save.out)",
    "log_prefix": "kern names its logs after the run",
    "wandb_run_name": "kern names the tracker run after the run folder",
    "log_config": "kern writes the resolved job into every run folder",
    "ddp_timeout": "kern sets its DDP options itself",
    "ddp_gradient_as_bucket_view": "kern sets its DDP options itself",
    "ddp_static_graph": "kern sets its DDP options itself",
    "save_state": "kern saves the training state with every checkpoint (kern train --resume)",
    "save_state_on_train_end": "kern always checkpoints the last step",
    "save_last_n_epochs_state": "kern keeps the state with each kept checkpoint (save.keep_last)",
    "save_last_n_steps_state": "kern keeps the state with each kept checkpoint (save.keep_last)",
}

# Options kern cannot reproduce: the import stops (exit 2) and names each.
REFUSED = {
    "xformers": "kern has no xformers attention; use --sdpa (kern's default) or --flash_attn",
    "sage_attn": "kern has no SageAttention; use --sdpa (kern's default) or --flash_attn",
    "flash3": "kern has no FlashAttention-3 backend; use --sdpa (kern's default) or --flash_attn",
    "full_fp16": "kern keeps the adapter in float32 (model.dtype sets the frozen base)",
    "full_bf16": "kern keeps the adapter in float32 (model.dtype sets the frozen base)",
    "vae_dtype": "kern runs the VAE in its own precision when caching latents; no key sets it",
    "flow_shift": "a sampling-time shift of musubi's previews; kern's samples use the architecture's schedule",
    "show_timesteps": "a diagnostic mode of musubi (plot and exit); kern has none",
    "sample_at_first": "kern samples every sample.every_n_steps and at the end, not before the first step",
    "lr_scheduler_timescale": "kern has no inverse-sqrt timescale; set train.lr_scheduler_args by hand",
    "lr_scheduler_type": "kern takes transformers' schedules by name (train.lr_scheduler), not a class",
    "scale_weight_norms": "kern has no max-norm regularisation of the adapter",
    "resume": "kern resumes its own checkpoints (kern train --resume); musubi's state folder cannot be read",
    "no_metadata": "kern always writes its adapter metadata",
    "training_comment": "kern writes its own adapter metadata; no key sets it",
    "log_tracker_config": "kern has no tracker config file; set train.log_with and train.tracker_project",
    "wandb_api_key": "give wandb its key in the environment (WANDB_API_KEY), not in the job",
    "num_layers": "kern trains the model's full depth",
    "remove_first_image_from_target": "kern has no such option",
    "edit": "an old spelling: give --model_version instead",
    "edit_plus": "an old spelling: give --model_version instead",
    **{
        f"metadata_{k}": "kern writes its own adapter metadata; no key sets it"
        for k in ("title", "author", "description", "license", "tags", "reso", "arch")
    },
    **{
        k: "kern does not upload to the Hugging Face Hub"
        for k in (
            "huggingface_repo_id",
            "huggingface_repo_type",
            "huggingface_path_in_repo",
            "huggingface_token",
            "huggingface_repo_visibility",
            "save_state_to_huggingface",
            "resume_from_huggingface",
            "async_upload",
        )
    },
}


@attrs.frozen
class Command:
    """A musubi command line, split: the script's stem ("" when none was given), its options, the launcher's."""

    script: str
    options: dict[str, Any]
    launcher: dict[str, Any] = attrs.Factory(dict)


def split_command(tokens: Sequence[str]) -> Command:
    """Launcher tokens (``accelerate launch --mixed_precision bf16``), the script (a ``.py`` path or ``-m module``),
    then its options. Tokens with no script are all script options."""
    tokens = list(tokens)
    at = next((i for i, t in enumerate(tokens) if t.endswith(".py")), None)
    stem, start = "", 0
    if at is not None:
        stem, start = Path(tokens[at]).stem, at + 1
    else:
        for i in range(len(tokens) - 1):
            if tokens[i] == "-m" and not tokens[i + 1].startswith("accelerate"):
                stem, start, at = tokens[i + 1].rsplit(".", 1)[-1], i + 2, i
                break
    launcher = _launcher_options(tokens[:at] if at is not None else [])
    return Command(stem, parse_options(tokens[start:]), launcher)


def _launcher_options(tokens: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        t = tokens[i]
        if t.startswith("--"):
            name, eq, value = t[2:].partition("=")
            if not eq and i + 1 < len(tokens) and not tokens[i + 1].startswith("-"):
                value, i = tokens[i + 1], i + 1
            out[name.replace("-", "_")] = value if (eq or value) else True
        i += 1
    return out


def parse_options(tokens: Sequence[str]) -> dict[str, Any]:
    """``--name value`` / ``--name=value`` / ``--flag`` / ``--list a b c`` as argparse reads musubi's parser.
    An unknown option keeps its values (a list) so that the translation can refuse it by name."""
    out: dict[str, Any] = {}
    i, tokens = 0, list(tokens)
    while i < len(tokens):
        t = tokens[i]
        if not t.startswith("--"):
            raise UsageError(
                f"musubi command: {t!r} is not an option (options start with --); quote values with spaces"
            )
        name, eq, value = t[2:].partition("=")
        kind = OPTIONS.get(name)
        values = [value] if eq else []
        i += 1
        while not eq and i < len(tokens) and not _is_option(tokens[i]) and (kind != VALUE or not values):
            values.append(tokens[i])
            i += 1
        if kind == FLAG:
            if values:
                raise UsageError(f"musubi command: --{name} is a flag and takes no value (got {values})")
            out[name] = True
        elif kind == VALUE:
            if not values:
                raise UsageError(f"musubi command: --{name} needs a value")
            out[name] = values[0]
        else:
            out[name] = values if kind == LIST or len(values) != 1 else values[0]
    return out


def _is_option(token: str) -> bool:
    return token.startswith("--") and len(token) > 2


def config_file_options(data: Mapping[str, Any]) -> dict[str, Any]:
    """musubi's ``--config_file`` TOML as options: tables are flattened (their keys are option names), as in its
    ``read_config_from_file``. The command line's options override these."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(value if isinstance(value, dict) else {key: value})
    return out


def command_tokens(text: str) -> list[str]:
    """A command as a shell would split it (backslash-newline continuations, quotes, ``#`` comments)."""
    try:
        return shlex.split(text.replace("\\\r\n", " ").replace("\\\n", " "), comments=True)
    except ValueError as exc:
        raise UsageError(f"musubi command: cannot split it as a shell would: {exc}") from None


# --------------------------------------------------------------------------- LoKr, LyCORIS and DoRA network_args

LYCORIS = "lycoris.kohya"
# LyCORIS' algo= values kern trains (lycoris/kohya.py create_network; its default algo is lora, i.e. LoCon).
LYCORIS_ALGOS = {"lora": "lora", "locon": "lora", "loha": "loha", "lokr": "lokr"}


def _lycoris_bool(value: str) -> bool:
    return str(value).strip().lower() != "false"  # lycoris.utils.str_bool: anything but "false" is true


def adapter_args(module: str, kind: str, pairs: dict[str, str]) -> tuple[dict[str, Any], list, list]:
    """The LoKr / LyCORIS / DoRA entries of ``--network_args`` as kern network keys: (keys, ignored, refused), each
    list of (argument, why). The entries it reads are removed from ``pairs``. Sources: LyCORIS ``lycoris/kohya.py``
    ``create_network`` and ``modules/lokr.py``, ``modules/locon.py`` (commit f49d30d); musubi ``networks/lokr.py``
    (30c658c), which reads ``factor`` only."""
    keys: dict[str, Any] = {}
    ignored: list[tuple[str, str]] = []
    refused: list[tuple[str, str]] = []
    lycoris = module == LYCORIS
    if "factor" in pairs:
        raw = pairs.pop("factor")
        try:
            factor = int(raw)
        except ValueError:
            refused.append(("network_args factor", f"wants an integer, got {raw!r}"))
        else:
            if kind != "lokr":
                ignored.append(("network_args factor", "only LoKr reads it"))
            elif factor == 0:
                refused.append(
                    ("network_args factor", "0 splits nothing; give -1 (most balanced) or a positive factor")
                )
            else:  # LyCORIS and musubi treat every negative factor as -1
                keys["factor"] = max(factor, -1)
    for key, option in (("decompose_both", "decompose_both"), ("full_matrix", "full_matrix")):
        if key not in pairs:
            continue
        raw = pairs.pop(key)
        if kind != "lokr" or not lycoris:
            ignored.append((f"network_args {key}", f"{module} reads it only for algo=lokr" if lycoris else
                            f"{module} does not read it" if kind == "lokr" else "only LoKr reads it"))  # fmt: skip
        elif key == "decompose_both" and raw.strip().lower() in ("false", "0", "no", ""):
            refused.append((
                "network_args decompose_both",
                f"LyCORIS passes decompose_both={raw!r} to LokrModule as a string, which Python reads as true unless "
                "empty: LyCORIS decomposed both sides. Write decompose_both=True to train that, or remove the entry",
            ))  # fmt: skip
        else:
            keys[option] = True if key == "decompose_both" else _lycoris_bool(raw)
    if "rs_lora" in pairs:
        raw = pairs.pop("rs_lora")
        if lycoris:
            keys["use_rslora"] = _lycoris_bool(raw)
        else:
            refused.append(("network_args rs_lora", f"{module} does not read it (LyCORIS does); kern: use_rslora"))
    dora = _lycoris_bool(pairs.pop("dora_wd")) if "dora_wd" in pairs else False
    if dora and not lycoris:
        refused.append(("network_args dora_wd", f"{module} has no DoRA; LyCORIS' is --network_module {LYCORIS} "
                        "with dora_wd=True"))  # fmt: skip
    elif dora and kind != "lora":
        refused.append(("network_args dora_wd", f"kern's DoRA is an option of the lora network; a DoRA {kind} "
                        "(LyCORIS weight decomposition on LoHa / LoKr) has no kern counterpart"))  # fmt: skip
    elif dora:
        keys["dora"] = True
    if "wd_on_output" in pairs:
        on_out = _lycoris_bool(pairs.pop("wd_on_output"))
        if dora and not on_out:
            refused.append(("network_args wd_on_output", "wd_on_output=False keeps one magnitude per input column; "
                            "kern's DoRA (as PEFT and the DoRA paper) keeps one per output row, LyCORIS' default "
                            "wd_on_output=True: remove the entry"))  # fmt: skip
        elif not dora:
            ignored.append(("network_args wd_on_output", "only DoRA (dora_wd=True) reads it"))
    if "wd_on_out" in pairs:
        pairs.pop("wd_on_out")
        ignored.append(("network_args wd_on_out", "LyCORIS does not read it (its argument is wd_on_output)"))
    return keys, ignored, refused
