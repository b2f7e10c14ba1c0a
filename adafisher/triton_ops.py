"""The Triton kernels behind the ``adafisher`` op schemas (``adafisher/ops.py``), as their own ops.

- ``adafisher::triton_fused_step``: the schema and semantics of ``adafisher::fused_step``;
- ``adafisher::triton_update_factors``: those of ``adafisher::update_factors``.

Declared with ``torch.library.triton_op`` and launched through ``torch.library.wrap_triton``, so
``torch.compile`` and ``torch.export`` trace into the launches (``triton_kernel_wrapper_*`` nodes)
instead of calling an opaque op. Under the Triton interpreter (``TRITON_INTERPRET=1``, CPU
tensors) ``wrap_triton`` hands back the interpreted kernel itself: eager calls work, tracing sees
no kernel. A torch without ``triton_op`` gets plain custom ops (opaque to compile).

Inside each op, what the kernels do not cover goes through the torch references of ``ops.py``,
per parameter and without host-device synchronization: float64 parameters or factors, gradients
or momenta laid out differently from their parameter, tracked weights neither row-major nor
channels_last, tensors on a device the kernels do not run on (CPU unless interpreted), and
traced calls under the interpreter.
``fused_refusal`` says which and why (the triton backend lists such parameters).

Importing this module imports Triton.
"""

import torch

from . import ops
from .kernels import blend, fused_step
from .kernels._launch import interpreted
from .kernels._tables import device_table

INTERPRETED = interpreted(fused_step._step_kernel)
# torch.library.triton_op/wrap_triton arrived in torch 2.6; older ones get opaque custom ops.
TRACEABLE = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")


def kernels_run_on(device: torch.device) -> bool:
    """Whether the kernels take tensors on ``device``: CUDA, or CPU under the interpreter
    (meta: shapes-only runs, planned as for a GPU)."""
    return device.type == "meta" or device.type == ("cpu" if INTERPRETED else "cuda")


def _traced_under_interpreter(t: torch.Tensor) -> bool:
    """An interpreted kernel cannot be traced (``wrap_triton`` hands it back as it is): a
    traced call (fake tensors, ``torch.compile``) under the interpreter takes the torch
    reference instead, which traces."""
    return INTERPRETED and not _eager(t)


def _launcher(kernel):
    """``kernel`` made traceable (a JIT function); anything else (an interpreted kernel, a
    launch recorder) is launched as it is."""
    from triton.runtime.jit import JITFunction  # noqa: PLC0415

    if TRACEABLE and isinstance(kernel, JITFunction):
        return torch.library.wrap_triton(kernel)
    return kernel


def _eager(t: torch.Tensor) -> bool:
    """A real tensor (parameters included), not a traced one."""
    from torch._subclasses.fake_tensor import FakeTensor  # noqa: PLC0415
    from torch._subclasses.functional_tensor import FunctionalTensor  # noqa: PLC0415

    return not isinstance(t, (FakeTensor, FunctionalTensor))


# (device, layout inputs) → (device tensor, programs); eager calls only (a traced call makes a
# constant). Keyed by the per-slot inputs, not the values: the chunk list grows with the
# parameters' sizes, and a steady-state step should not build it again.
_LAYOUTS: dict[tuple, tuple[torch.Tensor, int]] = {}


def _layout(inputs: tuple, device: torch.device, eager: bool) -> tuple[torch.Tensor, int]:
    """The ``layout`` tensor of ``fused_step.layout_values(*inputs)`` and its program count."""
    if not eager:  # traced: a constant of the graph
        values, programs = fused_step.layout_values(*inputs)
        table = torch.tensor(values, dtype=torch.int64, device=device)
        if _eager(table):  # meta constants are not lifted into a functional trace
            table = torch.empty(len(values), dtype=torch.int64, device=device).copy_(table)
        return table, programs
    key = (device, inputs)
    entry = _LAYOUTS.get(key)
    if entry is None:
        values, programs = fused_step.layout_values(*inputs)
        entry = _LAYOUTS[key] = (device_table(values, device), programs)  # non-blocking
        if len(_LAYOUTS) > 256:  # parameter sets come and go (tests, add_param_group)
            _LAYOUTS.pop(next(iter(_LAYOUTS)))
    return entry


# ------------------------------------------------------------------------------ fused step
def fused_refusal(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    tracked: bool,
    factors: torch.Tensor,
) -> str | None:
    """Why the fused kernel cannot update ``param`` (None when it can). Reads metadata only."""
    dtypes = fused_step.FUSED_DTYPES
    if param.dtype not in dtypes or grad.dtype not in dtypes or exp_avg.dtype != param.dtype:
        return f"dtype {param.dtype} / gradient {grad.dtype}"
    if not kernels_run_on(param.device):
        return f"device {param.device}"
    if _traced_under_interpreter(param):
        return "traced under the Triton interpreter"
    if grad.device != param.device or exp_avg.device != param.device:
        return "gradient or momentum on another device"
    if grad.shape != param.shape or exp_avg.shape != param.shape:
        return "gradient shape differs"
    if param.numel() == 0:
        return None  # nothing to update: only the step is counted
    if grad.stride() != param.stride() or exp_avg.stride() != param.stride():
        return "gradient or momentum strides differ from the parameter's"
    if not tracked:
        return None if _dense(param) else "not dense in memory"
    if factors.device != param.device:
        return "its layer's factors live on another device"
    if factors.dtype != torch.float32:
        return f"float64 factors ({factors.dtype})"
    if _inner(param, 1) is None:
        return "layout neither row-major nor channels_last"
    return None


def _inner(param: torch.Tensor, cols: int) -> int | None:
    """How F's ``cols`` columns run in memory within a row: all ``cols`` in order for
    row-major weights, C_in innermost for channels_last conv weights (memory order
    (k…, c_in)); None for other layouts."""
    if param.is_contiguous():
        return cols
    layout = {4: torch.channels_last, 5: torch.channels_last_3d}.get(param.dim())
    if layout is not None and param.is_contiguous(memory_format=layout):
        return param.shape[1]
    return None


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense in some dim order (an elementwise update may run over memory)."""
    expected = 1
    for stride, size in sorted((s, n) for n, s in zip(t.shape, t.stride()) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _aligned(t: torch.Tensor) -> bool:
    if t.device.type == "meta":  # allocations are aligned; views keep their offset
        return t.storage_offset() * t.element_size() % 16 == 0
    return t.data_ptr() % 16 == 0


def _check_lists(params, grads, exp_avgs, steps, layers, h_offsets, s_offsets, rows) -> None:
    n = len(params)
    for name, values in (("grads", grads), ("exp_avgs", exp_avgs), ("steps", steps),
                         ("layers", layers), ("h_offsets", h_offsets),
                         ("s_offsets", s_offsets), ("rows", rows)):
        if len(values) != n:
            raise ValueError(f"{name} has {len(values)} entries, params {n}: one per parameter")


def triton_fused_step(
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
    """``adafisher::fused_step`` (see ``ops.py``) with the Triton kernel: one launch per
    ``fused_step.SLOTS`` parameters of one (device, dtype, gradient dtype, alignment)."""
    _check_lists(params, grads, exp_avgs, steps, layers, h_offsets, s_offsets, rows)
    groups: dict[tuple, list[tuple[int, int, int]]] = {}  # key → (index, cols, inner)
    counted: list[int] = []  # fused or empty: the op counts their steps here
    slow: list[int] = []
    for i, param in enumerate(params):
        tracked = layers[i] >= 0 and param.numel() > 0
        if tracked:
            n_rows = rows[i]
            if n_rows < 1 or param.numel() % n_rows:
                raise ValueError(f"rows[{i}] must be ≥ 1 and divide numel {param.numel()}, "
                                 f"got {n_rows}")
            cols = param.numel() // n_rows
            if (min(h_offsets[i], s_offsets[i]) < 0 or h_offsets[i] + cols > factors.numel()
                    or s_offsets[i] + n_rows > factors.numel()
                    or 2 * layers[i] + 2 > blended.numel()):
                raise ValueError(f"parameter {i}'s factor offsets or layer lie outside factors "
                                 f"({factors.numel()}) / blended ({blended.numel()})")
        if fused_refusal(param, grads[i], exp_avgs[i], tracked, factors) is not None:
            slow.append(i)
            continue
        counted.append(i)
        if param.numel() == 0:
            continue
        eager = _eager(param)
        aligned = not eager or all(_aligned(t) for t in (param, grads[i], exp_avgs[i]))
        key = (param.device, param.dtype, grads[i].dtype, aligned)
        if tracked:
            groups.setdefault(key, []).append((i, cols, _inner(param, cols)))
        else:
            groups.setdefault(key, []).append((i, 1, 1))
    if slow:  # the torch reference counts their steps itself
        pick = lambda values: [values[i] for i in slow]  # noqa: E731
        ops.fused_step_reference(
            pick(params), pick(grads), pick(exp_avgs), pick(steps), factors, blended,
            pick(layers), pick(h_offsets), pick(s_offsets), pick(rows), lr, beta, damping,
            weight_decay, decoupled, maximize)
    if counted:
        torch._foreach_add_([steps[i] for i in counted], 1)
    for (device, p_dtype, g_dtype, _), members in groups.items():
        _launch_group(members, params, grads, exp_avgs, steps, factors, blended, layers,
                      h_offsets, s_offsets, lr, beta, damping, weight_decay, decoupled,
                      maximize, device, p_dtype, g_dtype)


def _launch_group(members, params, grads, exp_avgs, steps, factors, blended, layers, h_offsets,
                  s_offsets, lr, beta, damping, weight_decay, decoupled, maximize, device,
                  p_dtype, g_dtype) -> None:
    eager = _eager(params[members[0][0]])
    # Per-step values on the device, from the (already counted) step counts and lr: nothing
    # is read on the host, so a captured or compiled step replays with the current ones.
    counts = torch.stack([steps[i] if steps[i].device == device else steps[i].to(device)
                          for i, _, _ in members]).to(torch.float64)
    lr64 = lr.to(device=device, dtype=torch.float64)
    coefficients = torch.cat([(1 - lr64 * weight_decay).reshape(1),
                              lr64 / (1 - torch.pow(beta, counts))])
    if factors.device != device or factors.numel() == 0 or blended.numel() < 2:
        # only untracked parameters here: the kernel reads blended[0:2] and never factors
        factors = torch.zeros(2, dtype=torch.float32, device=device)
        blended = torch.zeros(2, dtype=torch.bool, device=device)
    block, chunk = fused_step.tile_sizes(max(params[i].numel() for i, _, _ in members),
                                         gpu=device.type != "cpu")
    wd_mode = 0 if weight_decay == 0 else (2 if decoupled else 1)
    kernel = _launcher(fused_step._step_kernel)
    slots = fused_step.SLOTS
    for first in range(0, len(members), slots):
        batch = members[first:first + slots]
        inputs = (
            tuple(params[i].numel() for i, _, _ in batch), tuple(c for _, c, _ in batch),
            tuple(inner for _, _, inner in batch),
            tuple(s_offsets[i] if layers[i] >= 0 else 0 for i, _, _ in batch),
            tuple(h_offsets[i] if layers[i] >= 0 else 0 for i, _, _ in batch),
            tuple(layers[i] for i, _, _ in batch),
            tuple(range(1 + first, 1 + first + len(batch))), chunk)
        layout, programs = _layout(inputs, device, eager)
        # Unused slots get stand-ins that are never read or written (distinct from every real
        # tensor: a functionalized launch writes each mutated argument back).
        pad = slots - len(batch)
        p_pad = [torch.empty(1, dtype=p_dtype, device=device)] * pad
        g_pad = [torch.empty(1, dtype=g_dtype, device=device)] * pad
        kernel[(programs,)](
            *[params[i] for i, _, _ in batch], *p_pad, *[grads[i] for i, _, _ in batch],
            *g_pad, *[exp_avgs[i] for i, _, _ in batch], *p_pad,
            layout, coefficients, factors, blended,
            -1.0 if maximize else 1.0, beta, 1 - beta, weight_decay, damping,
            WD_MODE=wd_mode, CHUNK=chunk, BLOCK=block, FIELDS=fused_step.FIELDS, num_warps=4,
        )


# -------------------------------------------------------------------------- factor update
def triton_update_factors(
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
    """``adafisher::update_factors`` (see ``ops.py``) with the Triton kernel: one launch, one
    program per layer."""
    n_layers = pending_count.numel()
    if segment_offsets.numel() != 2 * n_layers + 1:
        raise ValueError(f"segment_offsets must hold 2·layers + 1 = {2 * n_layers + 1} bounds, "
                         f"got {segment_offsets.numel()}")
    device = factors.device
    kinds = ((factors, torch.float32), (pending, torch.float32),
             (pending_count, torch.float32), (blended, torch.bool), (nonfinite, torch.int64))
    if (not kernels_run_on(device) or _traced_under_interpreter(factors)
            or any(t.dtype != d or t.device != device for t, d in kinds)):
        ops.update_factors_reference(factors, pending, pending_count, blended, nonfinite,
                                     segment_offsets, gamma_keep, gamma_new, eps)
        return
    if n_layers == 0:
        return
    offsets = segment_offsets.to(device=device, dtype=torch.int64)
    longest = factors.numel()
    if _eager(segment_offsets) and segment_offsets.device.type == "cpu":
        longest = int(segment_offsets.diff().max())  # a host tensor: no synchronization
    block = blend.tile_size(longest, gpu=device.type != "cpu")
    _launcher(blend._blend_kernel)[(n_layers,)](
        factors, pending, pending_count, blended, nonfinite, offsets, gamma_keep, gamma_new,
        eps, BLOCK=block,
    )


# ------------------------------------------------------------------------------ the ops
def _declare(name: str, fn, mutates: tuple[str, ...]):
    if TRACEABLE:
        return torch.library.triton_op(f"adafisher::{name}", mutates_args=mutates)(fn)
    op = torch.library.custom_op(f"adafisher::{name}", mutates_args=mutates)(fn)
    op.register_fake(lambda *args, **kwargs: None)
    return op


_declare("triton_fused_step", triton_fused_step, ("params", "exp_avgs", "steps"))
_declare("triton_update_factors", triton_update_factors,
         ("factors", "pending", "pending_count", "blended", "nonfinite"))
