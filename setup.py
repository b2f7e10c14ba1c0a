"""Build script. The package is pure Python; the optional CUDA extension in ``csrc/`` is built
only when asked for (``ADAFISHER_BUILD_CUDA=1``) and when its sources exist."""

import os
from pathlib import Path

from setuptools import setup


def cuda_extensions():
    sources = sorted(str(p) for p in Path("csrc").glob("*.cu*")) if Path("csrc").is_dir() else []
    if os.environ.get("ADAFISHER_BUILD_CUDA") != "1" or not sources:
        return {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    ext = CUDAExtension("adafisher._C", sources, extra_compile_args={"nvcc": ["-O3"]})
    build = BuildExtension.with_options(use_ninja=True)
    return {"ext_modules": [ext], "cmdclass": {"build_ext": build}}


setup(**cuda_extensions())
