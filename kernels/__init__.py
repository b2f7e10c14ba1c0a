"""Triton kernels for AdaFisher; installed as ``adafisher.kernels``."""
