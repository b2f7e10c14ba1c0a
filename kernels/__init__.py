"""Triton kernels for AdaFisher; installed as ``adafisher.kernels``.

- ``reductions``: per-channel sums (of squares) behind the Linear, BatchNorm, LayerNorm and
  conv-Ŝ statistics, with the pass commit fused in;
- ``conv_patch``: the im2col-free conv Ĥ (one read of the activation);
- ``layer_statistics``: Ĥ / Ŝ per layer kind on those kernels (the backend's statistics verbs);
- ``blend``: normalize + blend of every layer's factors in one launch;
- ``fused_step``: the AdaFisher / AdaFisherW update, one launch per device and dtype group.

Importing a module here imports Triton and builds its kernels, interpreted (CPU tensors) when
``TRITON_INTERPRET=1`` was set before the import.
"""
