"""``torch.compiler.disable`` without importing ``torch._dynamo`` at ``import adafisher``."""

from __future__ import annotations

import functools
import sys

import torch


def outside_compiled_graphs(fn):
    """``torch.compiler.disable(fn)``, applied on first use rather than at import.

    Why: ``torch.compiler.disable`` imports ``torch._dynamo``, which more than doubles the time of
    ``import adafisher``. While ``torch._dynamo`` is not imported nothing can be compiling, so
    ``fn`` runs as is; once it is, calls go through the disabled wrapper (created then, once).
    """
    disabled = None

    @functools.wraps(fn)
    def call(*args, **kwargs):
        nonlocal disabled
        if disabled is None:
            if "torch._dynamo" not in sys.modules:
                return fn(*args, **kwargs)
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
