"""Layer names as in the unwrapped model, so checkpoints move between wrapped and plain models.

``torch.compile`` (``_orig_mod``), ``DistributedDataParallel`` and ``DataParallel`` (``module``)
and activation-checkpoint wrappers insert one level into qualified names. A wrapper is
recognised by its type and contributes no name component, wherever it sits in the tree.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

from torch import nn

# (defining module, class name, attribute holding the wrapped module). Looked up in
# sys.modules: a wrapper class whose module was never imported has no instances.
_WRAPPERS = (
    ("torch._dynamo.eval_frame", "OptimizedModule", "_orig_mod"),
    ("torch.nn.parallel.distributed", "DistributedDataParallel", "module"),
    ("torch.nn.parallel.data_parallel", "DataParallel", "module"),
    ("torch.distributed.algorithms._checkpoint.checkpoint_wrapper", "ActivationWrapper",
     "_checkpoint_wrapped_module"),
)


def wrapped_module(module: nn.Module) -> nn.Module | None:
    """The module a known wrapper wraps, or None when ``module`` is no wrapper."""
    for module_name, class_name, attribute in _WRAPPERS:
        wrapper_class = getattr(sys.modules.get(module_name), class_name, None)
        if wrapper_class is not None and isinstance(module, wrapper_class):
            return getattr(module, attribute)
    return None


def named_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Like ``model.named_modules()`` (each module once, in the same order), with names as in
    the model without its wrappers; wrappers themselves are skipped."""
    seen: set[int] = set()

    def visit(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
        if id(module) in seen:
            return
        seen.add(id(module))
        inner = wrapped_module(module)
        if inner is not None:
            yield from visit(inner, prefix)
            return
        yield prefix, module
        for name, child in module.named_children():
            yield from visit(child, f"{prefix}.{name}" if prefix else name)

    yield from visit(model, "")
