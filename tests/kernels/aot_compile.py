"""Compile every kernel for an sm_90 GPU (H100/H200) without one, and report what the PTX does.

Run as a script in a process *without* TRITON_INTERPRET (the interpreter would replace the
kernels); prints one JSON object: per kernel, counts of global memory instructions and integer
divisions. The interpreter accepts code that the compiler rejects (e.g. non-constexpr globals)
and says nothing about vectorization, so CI checks both here.
"""

from __future__ import annotations

import json
import os
import re
import sys

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from adafisher.kernels import blend, conv_patch, fused_step, reductions  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
_OPS = re.compile(r"\b((?:ld|st|red|atom)\.global[.\w]*|(?:div|rem)\.[su]\d+)")


def compile_kernel(fn, args: dict[str, object], aligned: tuple[str, ...] = ()) -> dict[str, int]:
    """``args``: name → a signature type ("*fp32", "i32", …) or a constexpr value. Names in
    ``aligned`` get the divisible-by-16 specialization a launch gives aligned pointers and
    multiple-of-16 integers."""
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        value = args[name]
        if isinstance(value, str):
            signature[name] = value
            if name in aligned:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "constexpr"
            constexprs[name] = value
    kernel = triton.compile(ASTSource(fn, signature, constexprs=constexprs, attrs=attrs),
                            target=TARGET, options={"num_warps": 4})
    counts: dict[str, int] = {}
    for match in _OPS.finditer(kernel.asm["ptx"]):
        counts[match.group(1)] = counts.get(match.group(1), 0) + 1
    return counts


def step_cases() -> dict[str, dict[str, int]]:
    out = {}
    slots = [f"{kind}{k}" for kind in "pgm" for k in range(fused_step.SLOTS)]
    for dtype in ("fp32", "bf16"):
        args = dict(**{name: f"*{dtype}" for name in slots}, layout="*i64",
                    coefficients="*fp64", factors="*fp32", blended="*i1", grad_sign="fp32",
                    beta="fp32", one_minus_beta="fp32", weight_decay="fp32", damping="fp32",
                    WD_MODE=2, CHUNK=fused_step.GPU_CHUNK, BLOCK=fused_step.GPU_BLOCK,
                    FIELDS=fused_step.FIELDS)
        out[f"step_{dtype}"] = compile_kernel(fused_step._step_kernel, args, tuple(slots))
    for wd_mode in (0, 1):  # the other weight-decay modes, fp16, unaligned addresses
        args = {**args, **{name: "*fp16" for name in slots if name[0] != "g"},
                **{name: "*fp32" for name in slots if name[0] == "g"}, "WD_MODE": wd_mode}
        out[f"step_fp16_wd{wd_mode}_unaligned"] = compile_kernel(fused_step._step_kernel, args)
    return out


def reduction_cases() -> dict[str, dict[str, int]]:
    base = dict(x_ptr="*bf16", out_ptr="*fp32", A="i32", C="i32", L="i32", s_a="i32",
                s_c="i32", s_l="i32", a_per="i32", l_per="i32", divisor="fp32",
                post_divisor="fp32", second="fp32", h_src="*fp32", h_dst="*fp32", h_len="i32",
                h_parts="i32", h_part_stride="i32", h_groups="i32", h_per="i32",
                count_ptr="*fp32", SQUARE=True, POST=0, TAIL_ONE=False, COMMIT=True, CLEAR=False,
                H_TAIL=True, WIDE=False, BLOCK_A=1, BLOCK_P=64, BLOCK_H=32)
    aligned = ("x_ptr", "out_ptr", "C", "L", "s_a", "s_c", "s_l", "l_per", "h_src")
    return {
        # conv Ŝ at (256, 64, 56, 56): NCHW (positions contiguous) and channels_last
        "reduce_nchw": compile_kernel(reductions._channel_reduce_kernel,
                                      {**base, "s_l": 1, "BLOCK_C": 4, "BLOCK_L": 1024},
                                      aligned),
        "reduce_channels_last": compile_kernel(reductions._channel_reduce_kernel,
                                               {**base, "s_c": 1, "BLOCK_C": 64,
                                                "BLOCK_L": 64}, aligned),
        "reduce_wide": compile_kernel(reductions._channel_reduce_kernel,
                                      {**base, "s_c": 1, "WIDE": True, "BLOCK_C": 128,
                                       "BLOCK_L": 16}, aligned),
        # norm-layer Ĥ (Σ_c of squared channel sums) and Ŝ (squared sums) in one launch
        "reduce_norm_h": compile_kernel(reductions._channel_reduce_kernel,
                                        {**base, "x_ptr": "*fp32", "SQUARE": False, "POST": 2,
                                         "COMMIT": False, "H_TAIL": False, "s_l": 1,
                                         "BLOCK_C": 4, "BLOCK_L": 1024}, aligned),
        "reduce_norm_s": compile_kernel(reductions._channel_reduce_kernel,
                                        {**base, "SQUARE": False, "POST": 1, "s_l": 1,
                                         "CLEAR": True, "H_TAIL": False, "BLOCK_P": 1,
                                         "BLOCK_H": 64, "BLOCK_C": 4096,
                                         "BLOCK_L": 1}, aligned),
    }


def conv_cases() -> dict[str, dict[str, int]]:
    squares = dict(x_ptr="*bf16", out_ptr="*fp32", B="i32", C="i32", L="i32", s_b="i32",
                   s_c="i32", s_l="i32", per_group="i32", o_sc="i32", o_sl="i32", b_per="i32",
                   fold="i32", GROUPED=False, FOLD=False, WIDE=False, BLOCK_B=1)
    aligned = ("x_ptr", "out_ptr", "C", "L", "s_b", "s_c", "s_l", "per_group", "o_sc", "o_sl")
    ints = {name: "i32" for name in ("B", "C", "L", "s_b", "s_c", "s_l", "b_per", "row", "n_k",
                                      "L2", "L3", "K2", "K3", "S1", "S2", "S3", "D1", "D2",
                                      "D3", "P1", "P2", "P3", "N1", "N2", "N3")}
    partials = dict(x_ptr="*bf16", part_ptr="*fp32", divisor="fp32", **ints, POINTWISE=False,
                    WIDE=False, BLOCK_B=1)
    partials_aligned = ("x_ptr", "part_ptr", "C", "L", "s_b", "s_c", "s_l")
    return {
        "batch_squares_nchw": compile_kernel(conv_patch._batch_squares_kernel,
                                             {**squares, "s_l": 1, "o_sl": 1, "BLOCK_C": 4,
                                              "BLOCK_L": 1024}, aligned),
        # a whole sample as one flat run (NCHW, or channels_last without groups)
        "batch_squares_flat": compile_kernel(conv_patch._batch_squares_kernel,
                                             {**squares, "C": 1, "s_l": 1, "per_group": 1,
                                              "o_sl": 1, "FOLD": True, "BLOCK_C": 1,
                                              "BLOCK_L": 4096}, aligned),
        "batch_squares_channels_last": compile_kernel(conv_patch._batch_squares_kernel,
                                                      {**squares, "s_c": 1, "o_sl": 1,
                                                       "BLOCK_C": 64, "BLOCK_L": 64}, aligned),
        "batch_squares_wide": compile_kernel(conv_patch._batch_squares_kernel,
                                             {**squares, "s_l": 1, "o_sl": 1, "WIDE": True,
                                              "BLOCK_C": 4, "BLOCK_L": 1024}, aligned),
        # conv Ĥ at (256, 64, 56, 56) 3×3: channels_last and NCHW tiles, a strided 1×1, wide
        "patch_partials_channels_last": compile_kernel(
            conv_patch._patch_partials_kernel,
            {**partials, "s_c": 1, "BLOCK_C": 64, "BLOCK_L": 64}, partials_aligned),
        "patch_partials_nchw": compile_kernel(
            conv_patch._patch_partials_kernel,
            {**partials, "s_l": 1, "BLOCK_C": 4, "BLOCK_L": 1024}, partials_aligned),
        "patch_partials_pointwise": compile_kernel(
            conv_patch._patch_partials_kernel,
            {**partials, "s_c": 1, "POINTWISE": True, "BLOCK_C": 128, "BLOCK_L": 32},
            partials_aligned),
        "patch_partials_wide": compile_kernel(
            conv_patch._patch_partials_kernel,
            {**partials, "s_l": 1, "WIDE": True, "BLOCK_C": 4, "BLOCK_L": 1024},
            partials_aligned),
    }


def blend_cases() -> dict[str, dict[str, int]]:
    args = dict(factors="*fp32", pending="*fp32", count_ptr="*fp32", blended="*i1",
                nonfinite="*i64", segment_offsets="*i64", keep="fp32", new="fp32", eps="fp32",
                BLOCK=1024)
    return {"blend": compile_kernel(blend._blend_kernel, args)}


if __name__ == "__main__":
    try:
        report = {**step_cases(), **reduction_cases(), **conv_cases(), **blend_cases()}
    except (TypeError, ImportError, AttributeError) as exc:  # another Triton's AOT API
        print(f"unsupported Triton compile API: {exc!r}", file=sys.stderr)
        sys.exit(3)
    json.dump(report, sys.stdout, indent=1, sort_keys=True)
