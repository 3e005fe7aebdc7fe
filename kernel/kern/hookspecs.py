"""Every hook of kern, in one place. Each docstring is the contract a plugin implements.

A plugin is a module (found through the ``kern.plugins`` entry-point group) with functions
decorated ``@kern.hookimpl`` and named like the specs below. It implements only what it brings.

Conventions:

* ``arch`` is an architecture's canonical name and ``variant`` a variant's canonical name, as
  declared in ``register_architectures``; ``network_type`` is a network's canonical name.
* Dispatch: kern calls a hook that takes ``arch`` only on the plugin that registered that architecture,
  and a hook that takes ``network_type`` only on the plugin that registered that network type
  (``kern.core.routing``). So write each hook once, for your own names, with no ``if arch != ...: return
  None`` guard; a plugin written with such guards keeps working. The kernel's own implementations
  (``kern.core.defaults``: ``sample_timesteps``, ``combine_guidance``) are asked last, for every name, and
  give the standard behaviour where your plugin has no hook or returns ``None``. The hooks without either
  argument (``register_*``, ``detect_weights``, ``identify_model_file``) reach every plugin.
* The routed hooks are ``firstresult``: the first answer that is not ``None`` is the result.
  ``detect_weights`` is answered by every network plugin and the kernel arbitrates.
* Tensors crossing hooks are ``torch.Tensor``; images are float in ``[-1, 1]``, shape (B, C, H, W).
* Flow-matching convention: ``x_t = (1 - t) * x0 + t * noise`` with ``t`` in ``[0, 1]`` (1 = pure
  noise); models predict the velocity ``noise - x0``.

The model protocol: what the kernel reads from the transformer ``load_model(part="transformer")`` returns.
The VAE and the text encoder are opaque to the kernel: it only hands them back to your ``encode_latents``,
``decode_latents``, ``encode_text`` and ``caption_image``. The transformer is an ``nn.Module``, and:

* ``block_lists`` (class attribute, optional): names of the ``nn.ModuleList`` attributes that hold the
  repeated blocks, in execution order, e.g. ``("blocks",)`` or ``("double_blocks", "single_blocks")``.
  ``kern.gpu.accel`` wraps each block's ``forward`` in activation checkpointing
  (``train.gradient_checkpointing``, ``"selective"`` included) and compiles blocks one by one
  (``train.compile``, ``generate --compile``); ``kern.gpu.offload.BlockSwap`` streams them from CPU memory
  (``train.blocks_to_swap``); ``kern.gpu.distributed`` shards the frozen base by them (``train.shard_base``).
  Call blocks as ``block(...)`` so the wrappers apply, and keep their forward traceable by ``torch.compile``
  (no ``.item()``, no Python branches on tensor values). Without ``block_lists``, block swap and sharding are
  refused and nothing is compiled.
* ``gradient_checkpointing`` (bool attribute, optional): a model without ``block_lists`` keeps its own
  checkpointing, which ``kern.gpu.accel.apply`` switches with it; with ``block_lists`` it is set to ``False``
  (the per-block wrappers checkpoint instead).
* Module paths: adapters (``kern.adapters.network``) select modules by their dotted paths from the model
  root (``Architecture.default_targets`` / ``default_excludes``, the job's ``network.targets``), name them in
  files after those paths (kohya: ``lora_unet_`` + path with ``_``), and wrap the ``forward`` of the
  ``nn.Linear`` (and ``Conv2d``) modules they select: call those modules, do not read their ``weight``
  yourself. With ``train.base_precision = "fp8"``, ``kern.gpu.fp8`` stores every plain ``nn.Linear`` whose
  sides are multiples of 16 in float8, except those matched by ``Architecture.keep_high_precision``.
* Attention through ``kern.gpu.attention.attention(q, k, v, mask=None)`` gets the job's ``train.attention``
  backend, and selective checkpointing recognises it (it keeps attention outputs).
* ``.variant`` (attribute): when ``load_model`` gets ``variant=None``, set the variant it detected on the
  returned object, so callers can tell what was loaded.
* The kernel calls ``requires_grad_(False)``, ``eval()``, ``to(device)``, ``parameters()`` and
  ``named_modules()`` on it, and may make it a child of another module (data parallel); everything else,
  such as a ``params`` record or the forward's signature, is the plugin's own: only its
  ``predict_velocity`` calls the model.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import pluggy

PROJECT = "kern"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --------------------------------------------------------------------------- registration


@hookspec
def register_architectures(register: Callable[..., None]) -> None:
    """Declare the architectures this plugin brings: call ``register(kern.Architecture(...))`` once each.

    Names and aliases (of architectures and of their variants) must be unique across all installed
    plugins. The built-in distributions load first; a later plugin that declares a name already taken is
    reported (both distributions named) and left out as a whole, so none of its hooks can answer for that name.
    """


@hookspec
def register_networks(register: Callable[..., None]) -> None:
    """Declare the network (adapter) types this plugin brings: ``register(kern.NetworkType(...))``."""


# --------------------------------------------------------------------------- architecture work


@hookspec(firstresult=True)
def load_model(
    arch: str, variant: str | None, part: str, path: str, dtype: Any, device: Any, options: Mapping[str, Any]
) -> Any:
    """Load one part of ``arch`` from ``path`` and return it ready to use (the transformer follows the model
    protocol in the module docstring).

    ``part`` is ``"transformer"``, ``"vae"`` or ``"text_encoder"``. ``path`` is a local file or folder: the kernel
    resolved repo ids and bundles before (``kern.models.sources``). ``options``: ``"fp8"`` (the transformer of an fp8
    training job, or a text encoder stored in float8: keep fp8 weights of the file as they are, see
    ``kern.models.quantized``) and, for the text encoder, ``"caption"`` (it will caption images, so load what that
    needs).
    ``variant`` may be ``None``: then detect it from the file (shapes and keys) and set it on the returned object as ``.variant``.
    Load straight into ``dtype`` on ``device`` without a full-precision copy of the whole model in
    RAM. Bad files raise ``kern.errors.ModelFileError`` naming the file, the assumed variant and the
    offending keys.
    """


@hookspec
def identify_model_file(path: str, shapes: Mapping[str, tuple], metadata: Mapping[str, str]) -> Any:
    """Look at a checkpoint's tensor ``shapes`` (key -> shape, from the safetensors headers of the file ``path`` or
    of all the files of the folder ``path``, keys as stored) and header ``metadata``; return a ``kern.ModelFile``
    saying what it is when it is one of your architecture's parts (or a file users mistake for one), else
    ``None``. Decide what it is from keys and shapes alone, never from the file name; ``path`` is there to say
    which companion files (``ModelFile.needs``) are not already beside it.

    Every plugin is asked. The kernel uses the answers before any model loads: to refuse a file given for the
    wrong part or architecture with a message naming what it is and where it belongs, and to pick each part's
    file in a ComfyUI ``models/`` folder named by ``model.path``.
    """


@hookspec(firstresult=True)
def detect_variant(arch: str, path: str) -> str | None:
    """Name the variant of the ``arch`` checkpoint at ``path`` from its keys and shapes alone (read the
    safetensors header, not the tensors), or ``None`` to use the default variant. Raise
    ``kern.errors.ModelFileError`` when the file is yours to judge but fits no variant."""


@hookspec(firstresult=True)
def encode_text(arch: str, variant: str, encoder: Any, prompts: list[str], options: Mapping[str, Any]) -> dict | None:
    """Encode ``prompts`` with the loaded text ``encoder``; return what the transformer consumes.

    The result is a dict of tensors with batch dimension ``len(prompts)`` (e.g. ``{"ctx": ...}`` or
    ``{"ctx": ..., "mask": ...}``); the kernel caches each prompt's slice as safetensors and batches
    them again. Keys must be stable for an architecture; a sequence length may differ between
    prompts: when batching, the kernel right-pads such tensors with zeros, so a mask marks padding
    with 0. For a variant with ``text_images``, ``options["images"]`` holds one list of Pillow images
    (the prompt's control images, in order) per prompt.
    """


@hookspec(firstresult=True)
def encode_latents(arch: str, variant: str, vae: Any, images: Any) -> Any:
    """Encode ``images`` (B, C, H, W) in ``[-1, 1]`` into normalised latents, the space the model is trained in.
    C is 3, or 4 for a variant whose ``image_mode`` is ``"RGBA"``."""


@hookspec(firstresult=True)
def decode_latents(arch: str, variant: str, vae: Any, latents: Any) -> Any:
    """Decode latents from ``encode_latents``' space back to images in ``[-1, 1]`` (B, C, H, W)."""


@hookspec(firstresult=True)
def predict_velocity(
    arch: str,
    variant: str,
    model: Any,
    latents: Any,
    timesteps: Any,
    text: Mapping[str, Any],
    references: list | None,
    options: Mapping[str, Any],
) -> Any:
    """Run the transformer on noisy ``latents`` at ``timesteps`` (shape (B,), in ``[0, 1]``) and return
    the predicted velocity with the same shape as ``latents``.

    ``text`` is a collated ``encode_text`` result; ``references`` is a list of clean reference/control
    latents (one tensor per reference, batch-first) or ``None``. ``options`` carries per-call values
    such as ``guidance`` for guidance-embedded variants. Packing, position ids and any slicing off of
    reference tokens happen here, so the kernel's train and generate loops stay architecture-free.
    """


@hookspec(firstresult=True)
def sample_timesteps(
    arch: str, method: str, batch_size: int, latent_shape: tuple, generator: Any, options: Mapping[str, Any]
) -> Any:
    """Draw training timesteps ``t`` in ``[0, 1]``, shape ``(batch_size,)``, with ``method``.

    The kernel ships the methods every architecture has (``kern.maths.timesteps.METHODS``) as a last-resort
    implementation; a plugin may override a method for its architecture or add its own (a shift that depends on
    its token count). To add methods, answer with ``kern.maths.timesteps.sample(method, batch_size, latent_shape,
    generator, options, methods={**timesteps.METHODS, **yours})``: the range options, buckets and the
    unknown-method error (which lists the methods) then cover yours too. ``latent_shape`` is the shape of one
    item's latent (resolution-dependent methods read it). Return ``None`` to decline.
    """


@hookspec(firstresult=True)
def reference_sizes(arch: str, variant: str, sizes: list, target: tuple) -> list | None:
    """The (width, height) each reference/control image is resized to before ``encode_latents``, given
    their original sizes and the (width, height) asked for the output, for generation. Sizes must be
    multiples of the architecture's resolution step. The kernel resizes to cover and centre-crops;
    without an answer it only crops to the step. When the variant requires references (or its text encoder reads
    them) and the request sets no size, the output takes the last reference's size from here (as the edit
    pipelines do)."""


@hookspec(firstresult=True)
def latent_shape(arch: str, variant: str, width: int, height: int, options: Mapping[str, Any]) -> tuple | None:
    """The shape, without batch, of the latents one image of ``width`` x ``height`` is denoised in, when it
    is not ``(latent_channels, height / latent_downscale, width / latent_downscale)``: e.g. a variant that makes
    a composite plus layers, ``(layers + 1, C, h, w)``. ``decode_latents`` then returns one more dimension, (B, frames, C, H, W), and
    the kernel saves every frame."""


@hookspec(firstresult=True)
def caption_image(arch: str, variant: str, encoder: Any, image: Any, language: str) -> str | None:
    """Describe ``image`` (a Pillow image) in ``language`` (``"en"`` or ``"zh"``) with the loaded text encoder,
    for prompts left empty under ``kern generate --auto-caption-lang`` (e.g. a variant that splits its input
    image into layers captions that image). ``None``: this architecture cannot caption."""


@hookspec(firstresult=True)
def generation_schedule(arch: str, variant: str, steps: int, latent_shape: tuple, options: Mapping[str, Any]) -> Any:
    """Return the sigma schedule for ``steps`` denoising steps: a 1-D tensor of ``steps + 1`` values from
    about 1 down to exactly 0, for a target latent of ``latent_shape`` (C, h, w) — resolution-dependent
    schedules derive their token count from it."""


@hookspec(firstresult=True)
def combine_guidance(arch: str, variant: str, cond: Any, uncond: Any, scale: float, options: Mapping[str, Any]) -> Any:
    """Combine the conditional and unconditional velocities of a true-CFG step (same shape as the
    latents). The kernel's own answer, tried last, is ``uncond + scale * (cond - uncond)``; an
    architecture overrides it for extra steps such as a per-token norm rescale."""


@hookspec(firstresult=True)
def adapter_module_map(arch: str, variant: str, layout: str) -> list | None:
    """How this architecture's native module paths map to another naming, for adapter conversion.

    ``layout`` is e.g. ``"diffusers"``. Return a list of ``(native_path, [(other_path, rows)], ...)``
    tuples where ``rows`` is the ``(start, stop)`` slice of the native module's output rows that
    ``other_path`` holds (``None`` for the whole module): a fused qkv module maps to three projections
    this way; an empty list says the module exists but the other naming cannot hold an adapter on it.
    Return ``None`` if the naming is not yours.
    """


# --------------------------------------------------------------------------- network work


@hookspec(firstresult=True)
def make_network(network_type: str, model: Any, targets: Any, options: Mapping[str, Any]) -> Any:
    """Build a trainable adapter of ``network_type`` on ``model``'s modules selected by ``targets``
    (a ``kern.TargetSpec``), with resolved ``options``; return a ``kern.adapters.network.Network``.

    The adapter must be a no-op until trained (one factor initialised to zero).
    """


@hookspec
def detect_weights(keys: frozenset, metadata: Mapping[str, str]) -> Any:
    """Look at a weights file's tensor ``keys`` (and safetensors ``metadata``); return a
    ``kern.WeightsClaim`` if the file is an adapter of your type, else ``None``.

    Every network plugin is asked; the kernel uses the one claim, and reports a clear error when
    there is none or more than one. Decide from keys alone: no tensor data is read.
    """


@hookspec(firstresult=True)
def load_network(
    network_type: str,
    model: Any,
    state_dict: Mapping[str, Any],
    metadata: Mapping[str, str],
    claim: Any,
    multiplier: float,
) -> Any:
    """Apply the adapter in ``state_dict`` (claimed by ``claim``) to ``model`` unmerged, scaled by
    ``multiplier``; return the applied ``kern.adapters.network.Network``. Keys that match no module raise
    ``kern.errors.AdapterError`` naming them."""


@hookspec(firstresult=True)
def weight_delta(network_type: str, tensors: Mapping[str, Any], base_shape: tuple, base: Any) -> Any:
    """Return the full-size weight update ``ΔW`` (float32, ``base_shape``) of one module, from its
    tensors in kohya naming (suffix → tensor, e.g. ``{"lora_down.weight": A, "lora_up.weight": B,
    "alpha": a}``), without the user multiplier. Used by the streaming merge. ``base`` is the base weight the
    update applies to (float32, dequantised, read-only), for types whose ΔW depends on it (DoRA's ``W' − W``
    normalises ``W + BA``); an implementation that does not need it leaves the argument out."""


@hookspec(firstresult=True)
def weight_shape(network_type: str, tensors: Mapping[str, Any]) -> tuple | None:
    """The shape of the base weight one module's ``tensors`` update, read off the tensors alone: ``(out, in)``, or
    ``(out, in, kh, kw)`` for a conv (``(out, in · kh · kw)`` when the file stores the kernel flattened into a factor).
    ``tensors`` are one module's tensors by suffix as its file holds them (kohya suffixes or another spelling your
    type reads). ``None`` when the tensors do not tell. Used where no model is at hand: ``kern convert`` and the
    module-map mapping read a module's output rows (``shape[0]``) from it to match fused modules' row slices;
    without an answer they take the largest first dimension of the tensors."""


@hookspec(firstresult=True)
def weight_rank(network_type: str, tensors: Mapping[str, Any]) -> int | None:
    """The rank one module's ``tensors`` were made at, as your type's ``rank`` option means it (a LoRA's inner
    dimension, a LoKr's low-rank side), read off the tensors alone; ``None`` when the module has no rank (a LoKr of
    two full matrices). Used before a model is built: ``network.init_weights`` takes the job's rank (and rank
    patterns) from the file with it."""


@hookspec(firstresult=True)
def convert_weights(
    network_type: str,
    state_dict: Mapping[str, Any],
    metadata: Mapping[str, str],
    claim: Any,
    to_layout: str,
    module_map: list | None,
    base: Any,
) -> Any:
    """Rewrite an adapter into ``to_layout`` (``kohya``, ``diffusers``, ``comfyui``); return
    ``(state_dict, metadata)``. ``module_map`` comes from ``adapter_module_map``. Convert losslessly
    or raise ``kern.errors.AdapterError`` saying why the target layout cannot hold this adapter.

    ``base`` is None or a function ``name → base weight`` (float32, dequantised, read-only; ``name`` a native
    module path or a module name as the file writes it, layout prefix and kohya flattening included;
    ``kern.errors.ModelFileError`` when the base has no such weight): the base checkpoint of ``kern convert
    --model`` or ``kern merge``, for types whose files in some layout depend on the base weights (DoRA for
    ComfyUI, which normalises by ``‖W‖``, not ``‖W + BA‖``). Such a type raises an error that is also a
    ``kern.errors.UsageError`` when it needs ``base`` and got None; an implementation that never needs it
    leaves the argument out."""
