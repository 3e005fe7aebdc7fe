"""Text encoding of the edit variants, with and without control images.

An edit prompt is encoded together with its control images. A prompt without any (a text-only training item,
or ``kern generate`` without ``--ref``) is encoded the way the edit model sees text alone, and the transformer
then gets no reference latents:

==================  =====================================================  =========================================
variant             text-only form                                         the same as
==================  =====================================================  =========================================
edit-2509 / 2511    the Edit-Plus template (edit system prompt), no         diffusers' ``QwenImageEditPlusPipeline``
(``edit_plus``)     "Picture N:" labels and no image tokens; 64 dropped     ``.encode_prompt(prompt, image=None)``;
                                                                            ComfyUI's TextEncodeQwenImageEditPlus
                                                                            with no image
edit (2508)         the T2I template (``t2i`` mode: T2I system prompt,     ComfyUI's TextEncodeQwenImageEdit with no
                    34 dropped)                                             image; musubi-tuner's text-only items
==================  =====================================================  =========================================

Why 2508 differs: its template has the image slot built in, and diffusers' Edit ``encode_prompt(image=None)``
keeps that slot as a bare ``<|image_pad|>`` token with no image behind it, an input the model never saw;
ComfyUI switches to the T2I template instead, which is what users generate with. (Neither diffusers edit
pipeline's ``__call__`` runs without an image.) musubi-tuner (PR #704, for its issues #669 / #682) encodes every
edit variant's text-only items with the T2I template; kern follows the pipeline for Edit-Plus, so a musubi text
cache of a text-only Edit-Plus item differs from kern's (kern reuses musubi caches as they are).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from kern.errors import UsageError

# The encoder mode of a text-only prompt, per edit mode (see the table above).
TEXT_ONLY_MODE = {"edit": "t2i", "edit_plus": "edit_plus"}


def encode(encoder, prompts: list[str], images: Sequence[Sequence], mode: str) -> dict[str, torch.Tensor]:
    """``{"ctx", "mask"}`` for ``prompts``, each with its list of control images (empty: text-only).

    Edit-Plus encodes a mixed batch in one call (its encoder takes any image count per prompt). Edit 2508 encodes
    the prompts with one image and those without separately, in their own templates, and puts the rows back in
    order, right-padded with zeros to the longest (mask 0 on the padding), as the encoder pads a batch."""
    if mode == "edit_plus":
        return encoder(prompts, images=[list(i) for i in images], mode=mode)
    counts = [len(i) for i in images]
    if any(n > 1 for n in counts):
        raise UsageError(
            f"Qwen-Image-Edit (2508) takes one control image per prompt, got {max(counts)};"
            " for several use the Edit-Plus variants (edit-2509, edit-2511)"
        )
    with_image = [k for k, n in enumerate(counts) if n == 1]
    text_only = [k for k, n in enumerate(counts) if n == 0]
    parts = []
    if with_image:
        out = encoder([prompts[k] for k in with_image], images=[images[k][0] for k in with_image], mode=mode)
        parts.append((with_image, out))
    if text_only:
        parts.append((text_only, encoder([prompts[k] for k in text_only], mode=TEXT_ONLY_MODE[mode])))
    if len(parts) == 1:
        return parts[0][1]
    return _merge(parts, len(prompts))


def _merge(parts: list[tuple[list[int], dict[str, torch.Tensor]]], n: int) -> dict[str, torch.Tensor]:
    """Rows of several encodings back in prompt order, padded to the longest."""
    first = parts[0][1]["ctx"]
    length = max(out["ctx"].shape[1] for _, out in parts)
    ctx = first.new_zeros(n, length, first.shape[-1])
    mask = torch.zeros(n, length, dtype=torch.int64, device=first.device)
    for rows, out in parts:
        width = out["ctx"].shape[1]
        for j, k in enumerate(rows):
            ctx[k, :width] = out["ctx"][j]
            mask[k, :width] = out["mask"][j]
    return {"ctx": ctx, "mask": mask}
