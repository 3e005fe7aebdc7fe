"""FLUX.2 native (BFL) ↔ diffusers module map for adapter conversion.

:func:`flux2_module_map` returns the ``adapter_module_map`` hook's format: a list of
``(native_path, [(diffusers_path, rows), ...])`` where ``rows`` is the ``(start, stop)`` slice of the native
module's output rows that the diffusers module holds (``None``: the whole module). An empty list marks a native
module without an exact diffusers counterpart for adapters.

* ``double_blocks.{i}.img_attn.qkv`` [3D, D] → ``transformer_blocks.{i}.attn.to_q/to_k/to_v`` (rows 0:D, D:2D,
  2D:3D); ``txt_attn.qkv`` → ``attn.add_q_proj/add_k_proj/add_v_proj``.
* ``img_attn.proj`` → ``attn.to_out.0``, ``txt_attn.proj`` → ``attn.to_add_out``, ``img_mlp.0/.2`` →
  ``ff.linear_in/out``, ``txt_mlp.0/.2`` → ``ff_context.linear_in/out``.
* ``single_blocks.{i}.linear1`` → ``single_transformer_blocks.{i}.attn.to_qkv_mlp_proj`` (no split),
  ``linear2`` → ``attn.to_out``.
* Top level: ``img_in`` → ``x_embedder``, ``txt_in`` → ``context_embedder``, ``time_in.{in,out}_layer`` →
  ``time_guidance_embed.timestep_embedder.linear_{1,2}``, ``guidance_in.*`` → ``...guidance_embedder.*`` (dev),
  ``*_modulation.lin`` → ``*_modulation.linear``, ``final_layer.linear`` → ``proj_out``.
* ``final_layer.adaLN_modulation.1`` ↔ ``norm_out.linear`` is listed **without** a counterpart: diffusers
  stores its output halves swapped ((shift, scale) → (scale, shift)), which a row slice cannot express, so an
  adapter on it can be converted between kohya and ComfyUI but not to diffusers.
"""

from __future__ import annotations

Rows = tuple[int, int] | None


def flux2_module_map(depth: int, depth_single: int, hidden_size: int) -> list[tuple[str, list[tuple[str, Rows]]]]:
    """The BFL → diffusers module map of a FLUX.2 transformer with ``depth`` double blocks, ``depth_single``
    single blocks and hidden size ``hidden_size`` (dev 8/48/6144, klein 9B 8/24/4096, klein 4B 5/20/3072)."""
    d = int(hidden_size)
    entries: list[tuple[str, list[tuple[str, Rows]]]] = [
        ("img_in", [("x_embedder", None)]),
        ("txt_in", [("context_embedder", None)]),
        ("time_in.in_layer", [("time_guidance_embed.timestep_embedder.linear_1", None)]),
        ("time_in.out_layer", [("time_guidance_embed.timestep_embedder.linear_2", None)]),
        ("guidance_in.in_layer", [("time_guidance_embed.guidance_embedder.linear_1", None)]),
        ("guidance_in.out_layer", [("time_guidance_embed.guidance_embedder.linear_2", None)]),
        ("double_stream_modulation_img.lin", [("double_stream_modulation_img.linear", None)]),
        ("double_stream_modulation_txt.lin", [("double_stream_modulation_txt.linear", None)]),
        ("single_stream_modulation.lin", [("single_stream_modulation.linear", None)]),
        ("final_layer.linear", [("proj_out", None)]),
        ("final_layer.adaLN_modulation.1", []),
    ]
    qkv = ((0, d), (d, 2 * d), (2 * d, 3 * d))
    for i in range(depth):
        n, o = f"double_blocks.{i}", f"transformer_blocks.{i}"
        entries += [
            (f"{n}.img_attn.qkv", [(f"{o}.attn.{p}", r) for p, r in zip(("to_q", "to_k", "to_v"), qkv)]),
            (f"{n}.img_attn.proj", [(f"{o}.attn.to_out.0", None)]),
            (f"{n}.img_mlp.0", [(f"{o}.ff.linear_in", None)]),
            (f"{n}.img_mlp.2", [(f"{o}.ff.linear_out", None)]),
            (
                f"{n}.txt_attn.qkv",
                [(f"{o}.attn.{p}", r) for p, r in zip(("add_q_proj", "add_k_proj", "add_v_proj"), qkv)],
            ),
            (f"{n}.txt_attn.proj", [(f"{o}.attn.to_add_out", None)]),
            (f"{n}.txt_mlp.0", [(f"{o}.ff_context.linear_in", None)]),
            (f"{n}.txt_mlp.2", [(f"{o}.ff_context.linear_out", None)]),
        ]
    for i in range(depth_single):
        n, o = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        entries += [
            (f"{n}.linear1", [(f"{o}.attn.to_qkv_mlp_proj", None)]),
            (f"{n}.linear2", [(f"{o}.attn.to_out", None)]),
        ]
    return entries
