import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

# Triton's interpreter must be chosen before triton is first imported: on a machine without a
# GPU every kernel test runs on the CPU through it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# tests import their float64 SPEC definitions as a plain module
sys.path.insert(0, str(Path(__file__).parent))

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def one_thread():
    """Tiny ops: thread hand-offs cost more than they save; the setting is restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# Hypothesis keeps its example database in ./.hypothesis by default: keep it in a temporary
# folder instead, so that the test run leaves nothing in the checkout.
_HYPOTHESIS_HOME = tempfile.mkdtemp(prefix="adafisher-hypothesis-")
try:
    from hypothesis import configuration as _hypothesis_configuration

    _hypothesis_configuration.set_hypothesis_home_dir(_HYPOTHESIS_HOME)
except ImportError:  # hypothesis is a test extra
    pass

# What the run may leave in the checkout: caches of the tools that run it, and virtual
# environments (not written by tests).
_ALLOWED = ("__pycache__", ".pytest_cache", ".ruff_cache", ".git", ".venv", ".venv-vision")


def _checkout_files() -> dict[str, int] | None:
    """{path: mtime} of every file in the checkout that git does not track (ignored ones
    included), or None outside a git checkout."""
    try:
        tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True,
                                 check=True, timeout=60).stdout.decode().split("\0")
    except (OSError, subprocess.SubprocessError):
        return None
    tracked_set = set(tracked)
    files = {}
    for root, dirs, names in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in _ALLOWED and not d.endswith(".egg-info")]
        for name in names:
            path = os.path.relpath(os.path.join(root, name), REPO)
            if path not in tracked_set:
                files[path] = os.stat(os.path.join(root, name)).st_mtime_ns
    return files


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config._untracked_before = _checkout_files()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Tests write only under tmp paths: fail the run if it created or rewrote an untracked
    file in the checkout (results/, build/, .hypothesis/, ...)."""
    shutil.rmtree(_HYPOTHESIS_HOME, ignore_errors=True)
    before = getattr(session.config, "_untracked_before", None)
    after = _checkout_files()
    if before is None or after is None:
        return
    written = sorted(p for p, mtime in after.items() if before.get(p) != mtime)
    if written:
        shown = "\n  ".join(written[:20]) + ("\n  ..." if len(written) > 20 else "")
        sys.stderr.write(f"\nERROR: the test run wrote into the checkout:\n  {shown}\n")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
