"""Build script. The package is pure Python plus the optional extension ``adafisher._C``
(``csrc/``: C++ CPU kernels, and CUDA kernels when a CUDA toolkit and a CUDA build of torch are
present), compiled with ``torch.utils.cpp_extension`` and ninja.

Environment:
    ADAFISHER_BUILD_NATIVE=0/1  skip / require the extension (default: build it when torch is
                                importable at build time and a C++ compiler exists; a failed
                                optional build leaves the pure-PyTorch package).
    ADAFISHER_BUILD_CUDA=0/1    skip / require the CUDA kernels (default: when torch has CUDA
                                and a toolkit is found).

torch must be importable while building: install torch first, then
``pip install --no-build-isolation -e .`` (with build isolation pip hides it, and the package
installs without the extension; ``adafisher.native_available()`` then says why).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup

TORCH_VERSION_FILE = "_C.torch_version"


def _flag(name):
    value = os.environ.get(name, "").strip()
    if value not in ("", "0", "1"):
        raise SystemExit(f"{name} must be 0 or 1, got {value!r}")
    return None if value == "" else value == "1"


def _note(message):
    print(f"adafisher setup: {message}", file=sys.stderr)


def _openmp_arguments(compiler, torch):
    """``(compile args, link args, why not)`` that let ``at::parallel_for`` use threads.

    ATen's ``at::parallel_for`` is a header template: built without ``-fopenmp`` it runs its body
    inline, so every kernel of ``adafisher._C`` would run on one thread whatever
    ``torch.set_num_threads`` says. GCC's OpenMP (libgomp) is what torch's Linux wheels use; the
    extension links the libgomp torch ships, so both share one thread pool (and
    ``torch.set_num_threads`` governs it). Other compilers and platforms build without OpenMP
    (their OpenMP runtime would not be torch's), and the build says so."""
    if not torch.backends.openmp.is_available():
        return [], [], "torch is built without OpenMP"
    if not sys.platform.startswith("linux"):
        return [], [], f"OpenMP is only used on Linux, not {sys.platform}"
    try:
        macros = subprocess.run([compiler, "-dM", "-E", "-x", "c++", os.devnull],
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        return [], [], f"could not query the compiler ({exc})"
    if "__GNUC__" not in macros or "__clang__" in macros:
        return [], [], f"{compiler!r} is not GCC (torch's OpenMP runtime is GCC's libgomp)"
    torch_gomp = sorted(Path(torch.__file__).parent.joinpath("lib").glob("libgomp*.so*"))
    return ["-fopenmp"], [str(torch_gomp[0])] if torch_gomp else ["-fopenmp"], None


def native_extensions():
    want_native, want_cuda = _flag("ADAFISHER_BUILD_NATIVE"), _flag("ADAFISHER_BUILD_CUDA")
    if want_native is False:
        _note("ADAFISHER_BUILD_NATIVE=0: pure-PyTorch package, no adafisher._C")
        return {}
    try:
        import torch  # noqa: F401
        from torch.utils import cpp_extension
    except ImportError:
        if want_native:
            raise SystemExit("ADAFISHER_BUILD_NATIVE=1 needs torch at build time "
                             "(pip install --no-build-isolation ...)") from None
        _note("torch is not importable at build time (build isolation?): no adafisher._C; "
              "use `pip install --no-build-isolation` to build it")
        return {}
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        if want_native:
            raise SystemExit(f"ADAFISHER_BUILD_NATIVE=1 but no C++ compiler ({compiler!r})")
        _note(f"no C++ compiler ({compiler!r}): no adafisher._C")
        return {}

    csrc = Path("csrc")
    sources = sorted(str(p) for p in csrc.glob("*.cpp"))
    cuda_sources = sorted(str(p) for p in csrc.glob("*.cu"))
    has_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if want_cuda and not has_cuda:
        raise SystemExit("ADAFISHER_BUILD_CUDA=1 needs a CUDA build of torch and a CUDA toolkit "
                         "(CUDA_HOME)")
    use_cuda = has_cuda if want_cuda is None else want_cuda
    openmp_compile, openmp_link, no_openmp = _openmp_arguments(compiler, torch)
    cxx = ["-O3", *openmp_compile]
    if use_cuda:
        ext = cpp_extension.CUDAExtension(
            "adafisher._C", sources + cuda_sources,
            define_macros=[("ADAFISHER_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]}, extra_link_args=openmp_link,
        )
    else:
        ext = cpp_extension.CppExtension("adafisher._C", sources, extra_compile_args=cxx,
                                         extra_link_args=openmp_link)
    _note(f"building adafisher._C ({'CPU + CUDA' if use_cuda else 'CPU'})")
    if no_openmp:
        _note(f"without OpenMP ({no_openmp}): the C++ CPU kernels run on one thread")

    class BuildExtension(cpp_extension.BuildExtension):
        """A failed optional build leaves the pure-PyTorch package instead of failing."""

        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as exc:  # noqa: BLE001
                if want_native:
                    raise
                _note(f"building adafisher._C failed ({exc}); installing without it")
                self.extensions = []
                return
            self._write_torch_version()

        def copy_extensions_to_source(self):
            super().copy_extensions_to_source()  # inplace / editable: beside the source too
            self._write_torch_version()

        def _write_torch_version(self):
            # The torch it was built against: adafisher/ops.py refuses to load the extension
            # into another torch (a C++ ABI mismatch crashes instead of failing cleanly).
            for built in self.extensions:
                sidecar = Path(self.get_ext_fullpath(built.name)).with_name(TORCH_VERSION_FILE)
                sidecar.write_text(torch.__version__)

        def get_outputs(self):
            return super().get_outputs() if self.extensions else []

    build = BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)
    return {"ext_modules": [ext], "cmdclass": {"build_ext": build}}


setup(**native_extensions())
