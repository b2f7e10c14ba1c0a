"""Run a Python command of this repository, setting up what it needs first.

    python3 dev.py bench/epoch_time.py      # the main job
    python3 dev.py -m pytest -q             # the tests

Everything after ``dev.py`` is passed to Python. Needs only Python 3 (>= 3.9, with its
``venv`` module). If the interpreter running this script already has ``adafisher`` installed
with torch and the test tools (an activated environment, CI), the command runs with it.
Otherwise it runs in ``.venv/`` at the repository root, created on the first call with the CPU
build of torch (``ADAFISHER_TORCH``, default ``torch==2.13.0``, from PyTorch's CPU wheel index
``ADAFISHER_TORCH_INDEX``, an extra index: empty to use only your pip configuration) and this
checkout installed editable with its ``test`` and ``bench`` extras; later calls reuse it and
reinstall only when ``pyproject.toml``, ``setup.py`` or those two variables changed.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent
VENV = REPO / ".venv"
STAMP = VENV / "adafisher-dev.stamp"
TORCH = os.environ.get("ADAFISHER_TORCH", "torch==2.13.0")
# PyTorch's CPU wheels: a plain `pip install torch` on Linux pulls the ~5 GB CUDA build. An
# extra index (not a replacement), so that a local mirror or wheel folder still works.
CPU_INDEX = os.environ.get("ADAFISHER_TORCH_INDEX", "https://download.pytorch.org/whl/cpu")
EXTRAS = "test,bench"


# what the running interpreter must have for it to be used as it is (the test extra's
# imports; the checkout's own folder does not count as an installed adafisher)
NEEDED_MODULES = ("torch", "pytest", "sklearn", "matplotlib")


def ready_here() -> bool:
    """Can the running interpreter run the repository's commands as it is?"""
    try:
        importlib.metadata.distribution("adafisher")
    except importlib.metadata.PackageNotFoundError:
        return False
    return all(importlib.util.find_spec(name) is not None for name in NEEDED_MODULES)


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def wanted_stamp() -> str:
    """What the environment was built from; a change means: install again."""
    digest = hashlib.sha256()
    for name in ("pyproject.toml", "setup.py"):
        path = REPO / name
        digest.update(path.read_bytes() if path.exists() else b"")
    digest.update(f"{TORCH}\n{CPU_INDEX}\n{EXTRAS}".encode())
    return digest.hexdigest()


def reachable(url: str) -> bool:
    """Is the CPU wheel index reachable? Offline (a local mirror or wheel folder in pip's
    configuration), pip would otherwise retry it for every package."""
    import urllib.request

    try:
        urllib.request.urlopen(url, timeout=10).close()
        return True
    except OSError:
        return False


def run(command: list[str]) -> None:
    print("dev.py:", " ".join(command), file=sys.stderr, flush=True)
    subprocess.run(command, check=True, cwd=REPO)


def ensure_venv() -> Path:
    """Create or update .venv if needed; returns its interpreter."""
    python = venv_python()
    if not python.exists():
        run([sys.executable, "-m", "venv", str(VENV)])
    stamp = wanted_stamp()
    if STAMP.exists() and STAMP.read_text().strip() == stamp:
        return python
    pip = [str(python), "-m", "pip", "install", "-q"]
    run([*pip, "--upgrade", "pip"])
    index = ["--extra-index-url", CPU_INDEX] if CPU_INDEX and reachable(CPU_INDEX) else []
    run([*pip, *index, TORCH])
    # The compiled kernels (adafisher._C) build only when torch is visible to the build: no
    # build isolation, so the build tools come first (without a compiler the package still
    # installs, on the pure-PyTorch backend).
    run([*pip, "setuptools>=77", "wheel", "ninja"])
    run([*pip, "--no-build-isolation", "-e", f".[{EXTRAS}]"])
    STAMP.write_text(stamp + "\n")  # last: an interrupted install is redone next time
    return python


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    python = Path(sys.executable) if ready_here() else ensure_venv()
    return subprocess.run([str(python), *argv]).returncode


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except subprocess.CalledProcessError as exc:
        sys.exit(f"dev.py: setting up {VENV} failed ({exc}); see the output above")
    except KeyboardInterrupt:
        sys.exit(130)
