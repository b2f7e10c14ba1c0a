"""``torch.compiler.disable`` without importing ``torch._dynamo`` at ``import adafisher``."""

from __future__ import annotations

import functools
import sys

import torch


def outside_compiled_graphs(fn):
    """``torch.compiler.disable(fn)``, applied on first use rather than at import.

    Why: ``torch.compiler.disable`` imports ``torch._dynamo``, which more than doubles the time of
    ``import adafisher``. While ``torch._dynamo`` is not imported nothing can be compiling, so
    ``fn`` runs as is; once it is, traced calls go through the disabled wrapper (created once).
    Eager calls skip the disabled wrapper (it swaps the frame evaluator on every call, and
    ``torch.optim.Optimizer`` imports ``torch._dynamo``, so it is nearly always loaded): while
    dynamo traces ``call``, ``is_compiling()`` is True and the traced path takes the wrapper.
    """
    disabled = None

    @functools.wraps(fn)
    def call(*args, **kwargs):
        nonlocal disabled
        if "torch._dynamo" not in sys.modules or not torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        if disabled is None:
            disabled = torch.compiler.disable(fn)
        return disabled(*args, **kwargs)

    def prepare() -> None:
        # creating the wrapper inside a traced hook costs one extra graph break: do it eagerly
        # when torch._dynamo is already loaded
        nonlocal disabled
        if disabled is None and "torch._dynamo" in sys.modules:
            disabled = torch.compiler.disable(fn)

    call.prepare = prepare
    return call
