"""The ``adafisher`` custom ops: one schema each, declared here and nowhere else.

The schemas are the seam between the optimizer and its kernels: they carry tensors, ints and
floats only. Each op has

- a fake (meta) implementation, so ``torch.compile`` traces through it;
- a pure-PyTorch reference implementation (``CompositeExplicitAutograd``), which runs wherever
  no native kernel is registered;
- native kernels for CPU and CUDA from the optional C++/CUDA extension ``adafisher._C``
  (``csrc/``), registered with ``TORCH_LIBRARY_IMPL`` when the extension is imported below.

``fused_step`` (docs/algorithm.md §5–§6), for every parameter ``i`` of one group: it counts the step
(``steps[i] += 1``), then with ``t = steps[i]`` and ``F = S ⊗ H + damping`` read from ``factors`` at
``s_offsets[i]`` (``rows[i]`` entries) and ``h_offsets[i]`` (``numel / rows`` entries), or
``F = 1`` when ``layers[i] < 0`` or that layer's two segments are not both ``blended`` yet::

    g ← −g                               (maximize)
    g ← g + wd·p                         (L2, not decoupled)
    m ← β·m + (1−β)·g
    p ← p·(1 − lr·wd)                    (decoupled)
    p ← p − lr/(1−βᵗ) · m / F

``update_factors`` (docs/algorithm.md §3), for every segment ``k`` (``[segment_offsets[k],
segment_offsets[k+1])``; segment ``2l`` is layer ``l``'s H, ``2l + 1`` its S) whose layer has
``pending_count[l] > 0``: average, discard and count non-finite vectors (``nonfinite[k] += 1``),
min-max normalize, blend ``factors ← gamma_keep·factors + gamma_new·normalized``, mark
``blended[k]``. Then it clears ``pending`` and ``pending_count``. It is always safe to launch:
with nothing pending it changes nothing.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import torch

# A fragment: other modules (e.g. torch.library.triton_op wrappers) may add ops to the namespace.
_LIB = torch.library.Library("adafisher", "FRAGMENT")  # noqa: TOR901

_LIB.define(
    "fused_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] steps, "
    "Tensor factors, Tensor blended, int[] layers, int[] h_offsets, int[] s_offsets, "
    "int[] rows, Tensor lr, float beta, float damping, float weight_decay, bool decoupled, "
    "bool maximize) -> ()"
)
_LIB.define(
    "update_factors(Tensor(a!) factors, Tensor(b!) pending, Tensor(c!) pending_count, "
    "Tensor(d!) blended, Tensor(e!) nonfinite, Tensor segment_offsets, float gamma_keep, "
    "float gamma_new, float eps) -> ()"
)


# --------------------------------------------------------------------------------- fakes
@torch.library.register_fake("adafisher::fused_step")
def _fused_step_fake(
    params, grads, exp_avgs, steps, factors, blended, layers, h_offsets, s_offsets, rows, lr,
    beta, damping, weight_decay, decoupled, maximize,
) -> None:
    return None


@torch.library.register_fake("adafisher::update_factors")
def _update_factors_fake(
    factors, pending, pending_count, blended, nonfinite, segment_offsets, gamma_keep, gamma_new,
    eps,
) -> None:
    return None


# ------------------------------------------------------------------ reference implementations
def _compute_dtype(param: torch.Tensor) -> torch.dtype:
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def fused_step_reference(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    steps: list[torch.Tensor],
    factors: torch.Tensor,
    blended: torch.Tensor,
    layers: list[int],
    h_offsets: list[int],
    s_offsets: list[int],
    rows: list[int],
    lr: torch.Tensor,
    beta: float,
    damping: float,
    weight_decay: float,
    decoupled: bool,
    maximize: bool,
) -> None:
    """The update in plain PyTorch ops (the same arithmetic as ``functional.adafisher_update``),
    choosing F on the device: no host read of ``blended``, ``steps`` or ``lr``."""
    ready = blended.view(-1, 2).all(1) if blended.numel() else blended
    one = torch.ones((), dtype=factors.dtype, device=factors.device)
    for i, param in enumerate(params):
        dtype = _compute_dtype(param)
        p = param.to(dtype)
        m = exp_avgs[i].to(dtype)
        g = grads[i].to(dtype)
        if maximize:
            g = -g
        if weight_decay != 0 and not decoupled:
            g = g.add(p, alpha=weight_decay)
        m.mul_(beta).add_(g, alpha=1 - beta)
        lr_value = lr.to(device=param.device, dtype=torch.float64)
        steps[i].add_(1)
        bias = 1 - torch.pow(beta, steps[i].to(device=param.device, dtype=torch.float64))
        step_size = (lr_value / bias).to(dtype)
        if weight_decay != 0 and decoupled:
            p.mul_((1 - lr_value * weight_decay).to(dtype))
        if layers[i] < 0:
            p.sub_(m * step_size)
        else:
            n_rows = rows[i]
            n_cols = param.numel() // n_rows if n_rows else 0
            s = factors[s_offsets[i] : s_offsets[i] + n_rows]
            h = factors[h_offsets[i] : h_offsets[i] + n_cols]
            fisher = torch.outer(s, h).add_(damping).view(param.shape)
            fisher = torch.where(ready[layers[i]], fisher, one).to(param.device)
            p.sub_(m / fisher * step_size)
        if p is not param:
            param.copy_(p)
        if m is not exp_avgs[i]:
            exp_avgs[i].copy_(m)


def update_factors_reference(
    factors: torch.Tensor,
    pending: torch.Tensor,
    pending_count: torch.Tensor,
    blended: torch.Tensor,
    nonfinite: torch.Tensor,
    segment_offsets: torch.Tensor,
    gamma_keep: float,
    gamma_new: float,
    eps: float,
) -> None:
    """Normalize and blend every segment with pending statistics in a few whole-buffer ops."""
    n_segments = segment_offsets.numel() - 1
    if n_segments <= 0:
        return
    device = factors.device
    lengths = segment_offsets.diff().to(device)
    segments = torch.repeat_interleave(torch.arange(n_segments, device=device), lengths)
    count = pending_count.repeat_interleave(2)
    active = count > 0
    fresh = pending / count.clamp_min(1.0)[segments]
    finite = torch.isfinite(fresh)
    bad = torch.zeros(n_segments, device=device).index_add_(0, segments, (~finite).float()) > 0
    clean = torch.where(finite, fresh, 0.0)
    low = torch.full((n_segments,), torch.inf, device=device, dtype=factors.dtype)
    low = low.scatter_reduce(0, segments, clean, "amin")
    high = torch.full((n_segments,), -torch.inf, device=device, dtype=factors.dtype)
    high = high.scatter_reduce(0, segments, clean, "amax")
    normalized = (clean - low[segments]) / (high - low + eps)[segments]
    blend = active & ~bad
    blended_value = factors * gamma_keep + normalized * gamma_new
    factors.copy_(torch.where(blend[segments], blended_value, factors))
    nonfinite.add_(active & bad)
    blended.logical_or_(blend)
    pending.zero_()
    pending_count.zero_()


_LIB.impl("fused_step", fused_step_reference, "CompositeExplicitAutograd")
_LIB.impl("update_factors", update_factors_reference, "CompositeExplicitAutograd")


# The statistics ops (their schemas, fakes and references) before the kernels that serve them.
from . import statistic_ops  # noqa: E402, F401


# --------------------------------------------------------------------- native extension
def _load_native() -> str | None:
    """Import ``adafisher._C`` (registers the CPU/CUDA kernels); the reason when it cannot."""
    spec = importlib.util.find_spec(f"{__package__}._C")
    if spec is None or spec.origin is None:
        return "adafisher._C was not built"
    built_for = Path(spec.origin).with_name("_C.torch_version")
    if built_for.is_file() and built_for.read_text().strip() != torch.__version__:
        # Loading it would register kernels compiled against another torch's C++ ABI.
        return (f"adafisher._C was built for torch {built_for.read_text().strip()}, this is "
                f"torch {torch.__version__}; rebuild it")
    try:
        from . import _C  # noqa: F401, PLC0415
    except ImportError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


_NATIVE_ERROR = _load_native()
_WARNED = False


def native_available(device_type: str = "cpu") -> bool:
    """Whether the compiled kernels of ``adafisher._C`` serve ``device_type`` ("cpu",
    "cuda"; "meta" runs the fake implementations)."""
    if _NATIVE_ERROR is not None:
        return False
    if device_type in ("cpu", "meta"):  # meta: the fakes (shapes only, e.g. host timing)
        return True
    if device_type == "cuda":
        from . import _C  # noqa: PLC0415

        return bool(getattr(_C, "WITH_CUDA", False)) and torch.cuda.is_available()
    return False


def native_function(name: str):
    """The function ``name`` of ``adafisher._C`` when it loaded and has it (an older build may
    not), else None."""
    if _NATIVE_ERROR is not None:
        return None
    from . import _C  # noqa: PLC0415

    return getattr(_C, name, None)


def native_unavailable_reason() -> str | None:
    """Why ``adafisher._C`` did not load (None when it did)."""
    return _NATIVE_ERROR


def warn_native_unavailable() -> None:
    """Say once per process that the compiled kernels are missing and why."""
    global _WARNED
    if _WARNED or _NATIVE_ERROR is None:
        return
    _WARNED = True
    warnings.warn(
        "adafisher: the compiled extension adafisher._C is not available "
        f"({_NATIVE_ERROR}); CPU parameters use the pure-PyTorch backend, which is slower. "
        "Reinstall with a C++ compiler and torch present at build time "
        "(pip install --no-build-isolation -e .) to build it.",
        stacklevel=3,
    )
