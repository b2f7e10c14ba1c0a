"""A literal, slow, float64 implementation of the whole SPEC for trajectory tests.

It captures each layer's input and output gradient with ``retain_grad`` (so the model must not
use in-place ops on layer outputs), computes the statistics with ``definitions``, and applies the
update rules per parameter. It shares no code with the package.
"""

from __future__ import annotations

import torch
from torch import nn

import definitions as ref


def _supported(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, nn.modules.conv._ConvNd):
        return not module.transposed
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.affine
    return isinstance(module, nn.LayerNorm) and module.elementwise_affine


class ReferenceAdaFisher:
    def __init__(self, model, *, lr, beta, damping, gammas, factor_interval, weight_decay,
                 decoupled):
        self.model = model
        self.hp = dict(lr=lr, beta=beta, weight_decay=weight_decay, decoupled=decoupled)
        self.damping, self.gammas, self.interval = damping, gammas, factor_interval
        self.layers = {n: m for n, m in model.named_modules() if _supported(m)}
        self.H: dict[str, torch.Tensor] = {}
        self.S: dict[str, torch.Tensor] = {}
        self.fresh: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.m: dict[nn.Parameter, torch.Tensor] = {}
        self.t: dict[nn.Parameter, int] = {}
        self.k = 0
        for name, module in self.layers.items():
            module.register_forward_hook(self._capture(name))

    def _capture(self, name):
        def hook(module, args, output):
            if self.k % self.interval == 0 and torch.is_grad_enabled():
                output.retain_grad()
                self.captured[name] = (args[0].detach(), output)
        return hook

    def after_backward(self) -> None:
        """Turn this pass's captures into fresh statistics."""
        for name, (x, out) in self.captured.items():
            module, g = self.layers[name], out.grad
            if isinstance(module, nn.Linear):
                h, s = ref.linear_h(x, module.bias is not None), ref.linear_s(g)
            elif isinstance(module, nn.modules.conv._ConvNd):
                h, s = ref.conv_h(module, x), ref.conv_s(module, g)
            elif isinstance(module, nn.LayerNorm):
                batch = x.shape[0]
                h = ref.layernorm_h(x)
                s = ref.layernorm_s(g, len(module.normalized_shape), batch)
            else:
                h, s = ref.batchnorm_h(x), ref.batchnorm_s(g, x.shape[0])
            self.fresh.setdefault(name, []).append((h, s))
        self.captured.clear()

    def _fisher(self, p: nn.Parameter):
        for name, module in self.layers.items():
            if name not in self.H:
                continue
            H, S = self.H[name], self.S[name]
            if p is module.weight:
                if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
                    n_in = H.numel() - (module.bias is not None)
                    return (S[:, None] * H[None, :n_in] + self.damping).view_as(p)
                return S * H[0] + self.damping
            if p is getattr(module, "bias", None):
                if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
                    return S * H[-1] + self.damping
                return S * H[1] + self.damping
        return 1.0

    @torch.no_grad()
    def step(self) -> None:
        for name, passes in self.fresh.items():
            h = torch.stack([p[0] for p in passes]).mean(0)
            s = torch.stack([p[1] for p in passes]).mean(0)
            H0 = self.H.get(name, torch.ones_like(h))
            S0 = self.S.get(name, torch.ones_like(s))
            self.H[name] = ref.blend(H0, h, self.gammas)
            self.S[name] = ref.blend(S0, s, self.gammas)
        self.fresh.clear()
        for p in self.model.parameters():
            if p.grad is None:
                continue
            self.t[p] = self.t.get(p, 0) + 1
            m = self.m.get(p, torch.zeros_like(p))
            new_p, self.m[p] = ref.update(
                p, p.grad, m, self.t[p], self._fisher(p), **self.hp
            )
            p.copy_(new_p)
        self.k += 1
