"""The wheel: `kernels/` installs as `adafisher.kernels` (nothing named plain `kernels` lands in
site-packages), with its license, type marker and metadata. Built from a copy of the
checkout, so the checkout gets no `build/` folder."""

from __future__ import annotations

import email
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# what a build reads; everything else (venvs, results, caches) stays out of the copy
SOURCES = ("pyproject.toml", "setup.py", "README.md", "LICENSE", "adafisher", "kernels")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("setuptools")
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "src"
    source.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif path.exists():
            shutil.copy2(path, source / name)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp / "dist"), str(source)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "ADAFISHER_BUILD_NATIVE": "0"},  # the wheel's files, not a compile
    )
    assert built.returncode == 0, built.stderr[-2000:]
    (found,) = (tmp / "dist").glob("adafisher-*.whl")
    return found


def test_wheel_contents(wheel: Path):
    names = zipfile.ZipFile(wheel).namelist()
    dist_info = wheel.name.split("-py")[0] + ".dist-info"
    top_level = {n.split("/", 1)[0] for n in names}
    assert top_level == {"adafisher", dist_info}
    assert "adafisher/kernels/fused_step.py" in names
    assert "adafisher/backends/triton_backend.py" in names
    assert "adafisher/py.typed" in names
    assert any(n.startswith(dist_info + "/licenses/LICENSE") for n in names)
    assert not any(n.startswith(("tests/", "bench/", "examples/")) for n in names)


def test_wheel_metadata(wheel: Path):
    import adafisher

    dist_info = wheel.name.split("-py")[0] + ".dist-info"
    meta = email.message_from_bytes(zipfile.ZipFile(wheel).read(dist_info + "/METADATA"))
    assert meta["Version"] == adafisher.__version__  # one source: adafisher/__init__.py
    assert meta["License-Expression"] == "MIT"
    requires = meta.get_all("Requires-Dist") or []
    assert not any(r.startswith("numpy") for r in requires)  # nothing imports it
    # the test extra does not pull Triton or ruff onto CPU machines
    test_extra = [r for r in requires if 'extra == "test"' in r]
    assert test_extra and not any(r.startswith(("triton", "ruff")) for r in test_extra)
    assert any("arxiv.org/abs/2405.16397" in url for url in meta.get_all("Project-URL"))


def test_no_runtime_module_imports_numpy():
    import ast

    for path in [*(ROOT / "adafisher").rglob("*.py"), *(ROOT / "kernels").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] == "numpy" for n in names), path
