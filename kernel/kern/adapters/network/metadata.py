"""Adapter metadata: every ``ss_*`` (kohya) and ``modelspec.*`` (SAI model spec) key kern writes into an adapter's
safetensors header is computed here, and nowhere else.

:func:`adapter_metadata` builds the header from the network's type and resolved options, plus, when given, the
model-spec keys (:func:`modelspec_metadata`) and the facts of the training run (:class:`TrainingFacts`, with its
datasets as :class:`DatasetFacts`, made by :func:`dataset_facts`). ``Network.save`` and the training driver both
call it, so an adapter describes its network the same way whoever saved it. :func:`safetensors_hashes` adds
``sshs_*`` when the file is written. Readers: kohya's sd-scripts and sd-webui-additional-networks (``ss_*``,
``sshs_*``), A1111 and Civitai (``sshs_model_hash``, ``ss_tag_frequency``, ``ss_datasets``), musubi-tuner and ComfyUI
(``modelspec.*``).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import math
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import attrs
import torch


def adapter_metadata(
    network_type: str,
    options: Mapping[str, Any],
    *,
    modelspec: Mapping[str, str] | None = None,
    training: TrainingFacts | None = None,
) -> dict[str, str]:
    """The metadata of an adapter of ``network_type`` made with resolved ``options``: the ``modelspec`` keys (as
    :func:`modelspec_metadata` returns them), the training run's keys and the ``ss_network_*`` keys. All values are
    strings. The hashes of the tensors are not included: :func:`safetensors_hashes` needs the tensors."""
    md = dict(modelspec or {})
    if training is not None:
        md.update(training.metadata())
    md.update(network_metadata(network_type, options))
    return md


def network_metadata(network_type: str, options: Mapping[str, Any]) -> dict[str, str]:
    """kohya's ``ss_network_*`` keys for a network of ``network_type`` made with resolved ``options``.

    ``ss_network_module`` is the network type (``lora``, ``loha``); ``ss_network_dim`` and ``ss_network_alpha`` are
    the ``rank`` and ``alpha`` options (an unset or zero α is written as r, the α it means: readers parse a number;
    empty for a type without the option); ``ss_network_dropout`` the ``dropout`` option (``"0"`` when unset); ``ss_network_args`` the
    other options as JSON, in the type's option order.
    """
    return {
        "ss_network_module": network_type,
        "ss_network_dim": str(options.get("rank", "")),
        "ss_network_alpha": _alpha(options),
        "ss_network_dropout": str(options.get("dropout") or 0),
        "ss_network_args": json.dumps({k: v for k, v in options.items() if k not in ("rank", "alpha")}, default=str),
    }


@attrs.frozen(kw_only=True)
class DatasetFacts:
    """One dataset of a training run, as kohya records it in ``ss_datasets`` (made by :func:`dataset_facts`)."""

    directory: str  # the image folder's name, or the JSONL file's (kohya keeps only the base name)
    from_folder: bool  # images from a folder with caption files (kohya's DreamBooth-style), else from a JSONL file
    control_directory: str | None
    resolution: tuple[int, int]  # (W, H)
    batch_size: int
    num_repeats: int
    enable_bucket: bool
    bucket_no_upscale: bool
    min_bucket_reso: int | None  # the smallest / largest side of the buckets (None without bucketing)
    max_bucket_reso: int | None
    caption_extension: str | None
    caption_dropout_rate: float
    img_count: int  # images (not counting repeats)
    tag_frequency: Mapping[str, int]
    buckets: tuple[tuple[tuple[int, int], int], ...]  # ((W, H), images trained at it, counting repeats), by size
    mean_ar_error: float  # mean |bucket aspect - image aspect| over the images


@attrs.frozen(kw_only=True)
class TrainingFacts:
    """What a training run records about itself in the adapters it saves (kohya's ``ss_*`` training keys, plus
    ``kern.arch`` / ``kern.variant``, which kern reads back to pick the architecture of a file).

    The fields after ``output_name`` are optional; a key is written only for a fact given. ``steps`` is the
    number of optimizer steps done at the save; with ``num_batches_per_epoch`` (batches of one process in one epoch,
    kohya's ``len(train_dataloader)``) the epochs follow as kern counts them (an epoch is
    ``num_batches_per_epoch`` micro-batches; gradient accumulation runs across epochs)."""

    arch: str
    variant: str
    learning_rate: float
    lr_scheduler: str
    warmup_steps: int
    max_train_steps: int
    steps: int  # steps done when the file was saved
    seed: int
    optimizer: str
    mixed_precision: str
    gradient_checkpointing: bool
    gradient_accumulation_steps: int
    max_grad_norm: float
    timestep_sampling: str
    started_at: float  # time.time() when the run started
    output_name: str
    base_model_version: str = ""  # musubi-tuner's architecture name; "" = "<arch>_<variant>"
    num_batches_per_epoch: int | None = None
    num_processes: int = 1
    datasets: tuple[DatasetFacts, ...] = ()
    timestep_options: Mapping[str, Any] = attrs.field(factory=dict)  # written as ss_<name>, as musubi does
    fp8_base: bool | None = None
    sd_model_name: str | None = None  # the transformer's file (or folder) name
    vae_name: str | None = None
    session_id: int | None = None
    saved_at: float | None = None  # time.time() of the save: ss_training_finished_at

    def metadata(self) -> dict[str, str]:
        md = {
            "kern.arch": self.arch,
            "kern.variant": self.variant,
            "ss_base_model_version": self.base_model_version or f"{self.arch}_{self.variant}".replace("-", "_"),
            "ss_learning_rate": str(self.learning_rate),
            "ss_lr_scheduler": str(self.lr_scheduler),
            "ss_lr_warmup_steps": str(self.warmup_steps),
            "ss_max_train_steps": str(self.max_train_steps),
            "ss_steps": str(self.steps),
            "ss_seed": str(self.seed),
            "ss_optimizer": str(self.optimizer),
            "ss_mixed_precision": str(self.mixed_precision),
            "ss_gradient_checkpointing": str(self.gradient_checkpointing),
            "ss_gradient_accumulation_steps": str(self.gradient_accumulation_steps),
            "ss_max_grad_norm": str(self.max_grad_norm),
            "ss_timestep_sampling": str(self.timestep_sampling),
            "ss_training_started_at": str(self.started_at),
            "ss_output_name": str(self.output_name),
        }
        if self.num_batches_per_epoch:
            md.update(self._epochs())
        if self.datasets:
            md.update(datasets_metadata(self.datasets, self.num_processes * self.gradient_accumulation_steps))
        optional = {
            "ss_fp8_base": self.fp8_base,
            "ss_sd_model_name": self.sd_model_name,
            "ss_vae_name": self.vae_name,
            "ss_session_id": self.session_id,
            "ss_training_finished_at": self.saved_at,
        }
        md.update(ss_metadata({k: v for k, v in optional.items() if v is not None}))
        md.update(ss_metadata(dict(self.timestep_options)))
        return md

    def _epochs(self) -> dict[str, str]:
        """kohya's epoch keys. A save during the run records the epochs completed (sd-scripts' step saves); the
        save at the last step the epochs begun (sd-scripts' final save records ``num_epochs``)."""
        per_epoch = self.num_batches_per_epoch or 1
        micro = self.steps * self.gradient_accumulation_steps
        done = micro // per_epoch if self.steps < self.max_train_steps else math.ceil(micro / per_epoch)
        return {
            "ss_epoch": str(done),
            "ss_num_epochs": str(math.ceil(self.max_train_steps * self.gradient_accumulation_steps / per_epoch)),
            "ss_num_batches_per_epoch": str(per_epoch),
        }


def base_model_version(arch: str, variant: Any) -> str:
    """``ss_base_model_version`` for a ``kern.Variant`` of ``arch``: the variant's ``base_model_version``
    (musubi-tuner's architecture name), else its ``cache_name`` (musubi's name in its cache files, the same name
    where one model has one), else ``<arch>_<variant>``."""
    return variant.base_model_version or variant.cache_name or f"{arch}_{variant.name}".replace("-", "_")


def tag_frequency(captions: Sequence[str]) -> dict[str, int]:
    """kohya's tag count (sd-scripts ``BaseDataset.set_tag_frequency``): each caption split at commas, every
    non-empty tag stripped and lower-cased, and every occurrence counted."""
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in caption.split(","):
            tag = tag.strip().lower()
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return counts


def dataset_facts(specs: Sequence[Any], items: Sequence[Any]) -> tuple[DatasetFacts, ...]:
    """The :class:`DatasetFacts` of a run's datasets: ``specs`` are its ``kern.data.DatasetSpec`` and ``items`` its
    ``kern.data.Item`` (each with ``caption``, ``size``, ``bucket``, ``dataset_index`` and ``step``)."""
    from kern.data.buckets import make_buckets

    out = []
    for spec in specs:
        mine = [it for it in items if it.dataset_index == spec.index]
        counts: dict[tuple[int, int], int] = {}
        for it in mine:
            counts[tuple(it.bucket)] = counts.get(tuple(it.bucket), 0) + spec.num_repeats
        sides = None
        if spec.enable_bucket and mine:
            sides = [side for b in make_buckets(spec.resolution, mine[0].step) for side in b]
        errors = [abs(it.bucket[0] / it.bucket[1] - it.size[0] / it.size[1]) for it in mine]
        source = spec.image_directory if spec.image_directory is not None else spec.image_jsonl_file
        out.append(
            DatasetFacts(
                directory=Path(str(source)).name,
                from_folder=spec.image_directory is not None,
                control_directory=None if spec.control_directory is None else Path(spec.control_directory).name,
                resolution=(int(spec.resolution[0]), int(spec.resolution[1])),
                batch_size=spec.batch_size,
                num_repeats=spec.num_repeats,
                enable_bucket=spec.enable_bucket,
                bucket_no_upscale=spec.bucket_no_upscale,
                min_bucket_reso=min(sides) if sides else None,
                max_bucket_reso=max(sides) if sides else None,
                caption_extension=spec.caption_extension,
                caption_dropout_rate=spec.caption_dropout_rate,
                img_count=len(mine),
                tag_frequency=tag_frequency([it.caption for it in mine]),
                buckets=tuple(sorted(counts.items())),
                mean_ar_error=sum(errors) / len(errors) if errors else 0.0,
            )
        )
    return tuple(out)


def datasets_metadata(datasets: Sequence[DatasetFacts], batches_per_step: int = 1) -> dict[str, str]:
    """kohya's data keys for ``datasets``: ``ss_datasets`` (per dataset the keys sd-scripts' ``train_network.py``
    writes, its one subset included, plus musubi-tuner's own dataset keys), ``ss_tag_frequency`` and
    ``ss_dataset_dirs`` (per folder, the first dataset of a folder counting), ``ss_num_train_images`` (counting
    repeats) and the single-dataset keys sd-scripts writes without a dataset config (``ss_resolution`` ...), here
    from the first dataset. ``batches_per_step``: processes × gradient accumulation, for ``ss_total_batch_size``."""
    entries, tags, dirs = [], {}, {}
    for d in datasets:
        bucket_info = None
        if d.enable_bucket:  # sd-scripts records the buckets only with bucketing; JSON makes the indices strings
            bucket_info = {
                "buckets": {i: {"resolution": list(b), "count": n} for i, (b, n) in enumerate(d.buckets)},
                "mean_img_ar_error": d.mean_ar_error,
            }
        subset = {
            "img_count": d.img_count,
            "num_repeats": d.num_repeats,
            "color_aug": False,
            "flip_aug": False,
            "random_crop": False,
            "shuffle_caption": False,
            "keep_tokens": 0,
            "keep_tokens_separator": "",
            "secondary_separator": None,
            "enable_wildcard": False,
            "caption_prefix": None,
            "caption_suffix": None,
            "resize_interpolation": None,
        }
        if d.from_folder:
            subset.update(image_dir=d.directory, class_tokens=None, is_reg=False)
        else:
            subset["metadata_file"] = d.directory
        entries.append(
            {
                "is_dreambooth": d.from_folder,
                "batch_size_per_device": d.batch_size,
                "num_train_images": d.img_count * d.num_repeats,
                "num_reg_images": 0,
                "resolution": list(d.resolution),
                "enable_bucket": d.enable_bucket,
                "min_bucket_reso": d.min_bucket_reso,
                "max_bucket_reso": d.max_bucket_reso,
                "tag_frequency": {d.directory: dict(d.tag_frequency)},
                "bucket_info": bucket_info,
                "resize_interpolation": None,
                "subsets": [subset],
                # musubi-tuner's dataset keys (its BaseDataset.get_metadata)
                "caption_extension": d.caption_extension,
                "num_repeats": d.num_repeats,
                "bucket_no_upscale": d.bucket_no_upscale,
                "caption_dropout_rate": d.caption_dropout_rate,
                "image_directory" if d.from_folder else "image_jsonl_file": d.directory,
                **({"control_directory": d.control_directory} if d.control_directory else {}),
                "has_control": d.control_directory is not None,
            }
        )
        tags.setdefault(d.directory, dict(d.tag_frequency))
        name, i = d.directory, 2
        while name in dirs:
            name, i = f"{d.directory} ({i})", i + 1
        dirs[name] = {"n_repeats": d.num_repeats, "img_count": d.img_count}
    first = datasets[0]
    return {
        "ss_datasets": json.dumps(entries),
        "ss_tag_frequency": json.dumps(tags),
        "ss_dataset_dirs": json.dumps(dirs),
        "ss_num_train_images": str(sum(d.img_count * d.num_repeats for d in datasets)),
        "ss_num_reg_images": "0",
        "ss_resolution": str(tuple(first.resolution)),
        "ss_batch_size_per_device": str(first.batch_size),
        "ss_total_batch_size": str(first.batch_size * batches_per_step),
        "ss_enable_bucket": str(first.enable_bucket),
        "ss_bucket_no_upscale": str(first.bucket_no_upscale),
        "ss_min_bucket_reso": str(first.min_bucket_reso),
        "ss_max_bucket_reso": str(first.max_bucket_reso),
        "ss_caption_dropout_rate": str(first.caption_dropout_rate),
    }


def modelspec_metadata(
    *,
    architecture: str,
    implementation: str,
    title: str | None = None,
    resolution: str | tuple[int, int] | None = None,
    adapter: str = "lora",
    date: _dt.datetime | None = None,
    author: str | None = None,
    description: str | None = None,
    license: str | None = None,
    tags: str | Sequence[str] | None = None,
    merged_from: str | Sequence[str] | None = None,
    timestep_range: tuple[int, int] | None = None,
) -> dict[str, str]:
    """SAI model-spec keys as musubi-tuner writes them (adapters.md §11.1).

    ``architecture`` is the model-spec name without the suffix (the variant's ``modelspec``);
    ``modelspec.architecture`` becomes ``"<architecture>/<adapter>"`` (``/lora`` for every adapter type, as
    musubi does). ``resolution`` defaults to musubi's fallback ``1280x720``; ``title`` to ``LoRA@<unix time>``;
    ``date`` to now (ISO 8601, local time, no timezone).
    """
    if resolution is None:
        resolution = "1280x720"
    elif not isinstance(resolution, str):
        resolution = f"{int(resolution[0])}x{int(resolution[1])}"
    date = date or _dt.datetime.now()
    md = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{architecture}/{adapter}",
        "modelspec.implementation": implementation,
        "modelspec.title": title or f"LoRA@{int(time.time())}",
        "modelspec.resolution": resolution,
        "modelspec.date": date.replace(microsecond=0, tzinfo=None).isoformat(),
    }
    optional = {
        "modelspec.author": author,
        "modelspec.description": description,
        "modelspec.license": license,
        "modelspec.tags": tags if tags is None or isinstance(tags, str) else ",".join(tags),
        "modelspec.merged_from": merged_from
        if merged_from is None or isinstance(merged_from, str)
        else ",".join(merged_from),
        "modelspec.timestep_range": None if timestep_range is None else f"{timestep_range[0]},{timestep_range[1]}",
    }
    md.update({k: v for k, v in optional.items() if v is not None})
    return md


def ss_metadata(values: Mapping[str, Any]) -> dict[str, str]:
    """kohya training keys: ``{"learning_rate": 1e-4, "datasets": [...]}`` → ``{"ss_learning_rate": "0.0001", ...}``.

    Strings stay as they are, dicts/lists become JSON, ``None`` becomes ``"None"`` (as sd-scripts writes it).
    """
    out = {}
    for k, v in values.items():
        key = k if k.startswith("ss_") else f"ss_{k}"
        if isinstance(v, str):
            out[key] = v
        elif isinstance(v, (dict, list, tuple)):
            out[key] = json.dumps(v, default=str)
        else:
            out[key] = str(v)
    return out


def safetensors_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, str]:
    """``sshs_model_hash`` / ``sshs_legacy_hash`` as sd-scripts precomputes them for sd-webui-additional-networks:
    the file is serialised with only the ``ss_*`` metadata; the model hash is the SHA-256 of everything after the
    header, the legacy hash the first 8 hex digits of the SHA-256 of bytes 0x100000..0x110000."""
    from safetensors.torch import save as _save

    # An empty dict, not None: sd-scripts passes a dict, and "__metadata__": {} changes the header's length and so
    # the legacy hash.
    ss = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    blob = _save({k: v.contiguous() for k, v in tensors.items()}, metadata=ss)
    b = io.BytesIO(blob)
    n = int.from_bytes(b.read(8), "little")
    model_hash = hashlib.sha256(blob[8 + n :]).hexdigest()
    legacy = hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]
    return {"sshs_model_hash": model_hash, "sshs_legacy_hash": legacy}


def _alpha(options: Mapping[str, Any]) -> str:
    if "alpha" not in options:
        return ""
    alpha, rank = options["alpha"], options.get("rank")
    if (alpha is None or float(alpha) == 0) and rank:
        alpha = float(rank)
    return str(alpha)


# --------------------------------------------------------------------------- reading


def made_for(metadata: Mapping[str, str]) -> str:
    """The architecture an adapter's metadata says it was trained for (``kern.arch``, else the first part of
    ``modelspec.architecture``); ``""`` when it does not say."""
    return metadata.get("kern.arch") or metadata.get("modelspec.architecture", "").split("/")[0]


def is_for(made: str, arch: Any) -> bool:
    """Whether ``made`` (:func:`made_for`) names ``arch`` (a ``kern.Architecture``): its name, an alias, a variant's
    alias or modelspec name, spelled with any case, dots, dashes or underscores."""
    names = {arch.name, *arch.aliases, *(a for v in arch.variants for a in (*v.aliases, v.modelspec) if a)}
    norm = lambda s: s.lower().replace(".", "").replace("-", "").replace("_", "")  # noqa: E731
    made = norm(made)
    return any(made == norm(n) or made.startswith(norm(arch.name)) for n in names)


def saved_steps(metadata: Mapping[str, str]) -> int | None:
    """The optimizer steps a trained adapter's metadata records (``ss_steps``); None when it does not say."""
    try:
        return int(metadata["ss_steps"])
    except (KeyError, ValueError, TypeError):
        return None
