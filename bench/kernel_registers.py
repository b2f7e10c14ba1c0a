"""Registers and spills of exactly the kernel variants real models launch, compiled for sm_90.

1. Records the specialization key of every Triton launch (constexprs, which integers Triton
   specializes — equal to 1, divisible by 16 — and which pointers are 16-byte aligned) during a
   statistics pass and a step of ResNet-50 (batch 256, 224², bf16, channels_last) and a
   GPT-2-small-shaped model (batch 8, context 1024, bf16), on the meta device (shapes only,
   nothing runs; see ``bench/launch_census.py``).
2. Compiles each distinct variant for an H100/H200 (``GPUTarget("cuda", 90, 32)``) with
   Triton's ahead-of-time API, no GPU needed, and reads registers per thread and local memory
   (where spills go) of the cubin Triton built, with ``cuobjdump --dump-resource-usage``.

Target: no spills, at most 128 registers per thread. Run without TRITON_INTERPRET:
``python -m bench.kernel_registers`` prints a table (``--json`` for JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402

from bench import launch_census  # noqa: E402

TARGET_ARCH = 90
_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)")


def record_keys(model: str, batch: int) -> dict[tuple, int]:
    """(kernel name, argument keys, constexprs) → launches, for one steady pass and a step."""
    from adafisher import AdaFisherW  # noqa: PLC0415

    torch.manual_seed(0)
    net, x = launch_census.build(model, batch, torch.device("meta"), torch.bfloat16, False)
    keys: dict[tuple, int] = {}
    with launch_census.meta_planning(), launch_census.LaunchCensus(run=False) as census:
        opt = AdaFisherW(net, backend="triton", factor_interval=1)
        for i in range(2):
            with census.count() as seen:
                net(x).float().square().mean().backward()
                opt.step()
            opt.zero_grad()
            if i == 1:
                for (name, key), n in seen.keys.items():
                    keys[(name, *key)] = keys.get((name, *key), 0) + n
    return keys


def _kernel(name: str) -> Any:
    for module in launch_census._kernel_modules():
        kernel = getattr(module, f"_{name}", None)
        if kernel is not None:
            return kernel
    raise KeyError(name)


def _signature(kernel: Any, arg_keys: tuple[str, ...], constexprs: tuple) -> tuple:
    """Triton's ``(signature, constexprs, attrs)`` for one recorded launch."""
    names = kernel.arg_names
    unspecialized = {names[i] if isinstance(i, int) else i
                     for i in getattr(kernel, "do_not_specialize", ())}
    signature, values, attrs = {}, {}, {}
    for i, (name, key) in enumerate(zip(names, arg_keys)):
        aligned = key.endswith(":16") and name not in unspecialized
        base = key.removesuffix(":16")
        if base == "1" and name not in unspecialized:
            signature[name], values[name] = "constexpr", 1
            continue
        if base.startswith("*"):
            dtype = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "int64": "i64",
                     "bool": "i1", "float64": "fp64", "int32": "i32"}[base[1:]]
            signature[name] = f"*{dtype}"
        elif base == "1":
            signature[name] = "i32"
        else:
            signature[name] = base
        if aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    options = {}
    for name, value in constexprs:
        if name.startswith("num_"):
            options[name] = value
        else:
            signature[name], values[name] = "constexpr", value
    return signature, values, attrs, options


def _cuobjdump() -> str:
    """Triton's bundled cuobjdump (the toolkit's when absent)."""
    import triton  # noqa: PLC0415

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else "cuobjdump"


def compile_variant(name: str, arg_keys: tuple[str, ...], constexprs: tuple) -> dict[str, Any]:
    import triton  # noqa: PLC0415
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415
    from triton.compiler import ASTSource  # noqa: PLC0415

    kernel = _kernel(name)
    signature, values, attrs, options = _signature(kernel, arg_keys, constexprs)
    compiled = triton.compile(ASTSource(kernel, signature, constexprs=values, attrs=attrs),
                              target=GPUTarget("cuda", TARGET_ARCH, 32),
                              options={"num_warps": options.get("num_warps", 4)})
    # The cubin Triton itself built with its ptxas: what a launch would load.
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", str(cubin)],
                             capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"cuobjdump failed for {name}: {out.stderr[-2000:]}")
    usage = _USAGE.search(out.stdout)
    if usage is None:
        raise RuntimeError(f"no resource usage for {name}: {out.stdout[-2000:]}")
    registers, stack, local = (int(v) for v in usage.groups())
    # spilled registers live in local memory (and on the stack frame)
    return {"registers": registers, "local_bytes": local, "stack_bytes": stack}


def _variant_label(constexprs: tuple, arg_keys: tuple[str, ...]) -> str:
    flags = ",".join(f"{k}={v}" for k, v in constexprs if not k.startswith("BLOCK_H"))
    aligned = sum(k.endswith(":16") for k in arg_keys)
    return f"{flags} [{aligned} aligned args]"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    variants: dict[tuple, dict[str, int]] = {}
    for model, batch in (("resnet50", 256), ("gpt", 8)):
        for key, n in record_keys(model, batch).items():
            variants.setdefault(key, {})[model] = n
    rows = []
    if not args.json:
        print(f"{len(variants)} distinct variants launched; compiling for sm_{TARGET_ARCH}",
              flush=True)
    for (name, arg_keys, constexprs), launches in sorted(variants.items(), key=str):
        facts = compile_variant(name, arg_keys, constexprs)
        r = {"kernel": name, "variant": _variant_label(constexprs, arg_keys),
             "launches_per_pass": launches, **facts}
        rows.append(r)
        if not args.json:  # as they compile: a compile takes seconds
            print(f"{r['kernel']:<22} regs {r['registers']:>3}  local/stack "
                  f"{r['local_bytes']}/{r['stack_bytes']}  launches {r['launches_per_pass']}"
                  f"  {r['variant']}", flush=True)
    ok = all(r["registers"] <= 128 and r["local_bytes"] == r["stack_bytes"] == 0 for r in rows)
    if args.json:
        json.dump({"target": f"sm_{TARGET_ARCH}", "variants": rows, "within_target": ok},
                  sys.stdout, indent=1)
        print()
    else:
        print(f"{len(rows)} variants; target (no spills, <= 128 registers): "
              f"{'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
