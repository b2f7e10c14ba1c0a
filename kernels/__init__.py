"""Triton kernels for AdaFisher; installed as ``adafisher.kernels``.

- ``reductions``: per-channel sums (of squares) behind the Linear, BatchNorm, LayerNorm and
  conv-Ŝ statistics, with the pass commit fused in;
- ``conv_patch``: the im2col-free conv Ĥ (one read of the activation);
- ``blend``: normalize + blend of every layer's factors in one launch;
- ``fused_step``: the AdaFisher / AdaFisherW update, one launch per device and dtype group.

These modules see tensors and integers only; the translation from the optimizer's objects
(modules, flat-buffer slots, factor indices) lives in ``adafisher.backends``.

Importing a module here imports Triton and builds its kernels, interpreted (CPU tensors) when
``TRITON_INTERPRET=1`` was set before the import.
"""
