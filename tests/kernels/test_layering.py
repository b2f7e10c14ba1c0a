"""``kernels/`` sees tensors and integers only: no module there imports the optimizer's
objects (``adafisher.factors``, ``adafisher.layers``, …); the translation lives in
``adafisher.backends``. An AST scan, so it runs without importing Triton."""

from __future__ import annotations

import ast
from pathlib import Path

KERNELS = Path(__file__).resolve().parents[2] / "kernels"


def _imports(path: Path) -> list[str]:
    """Absolute names of the modules imported by ``path`` (relative ones resolved)."""
    package = ["adafisher", "kernels"]
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.append(module)
            # `from adafisher import factors` names the module in the alias
            names += [f"{module}.{alias.name}" for alias in node.names if module == "adafisher"]
    return names


def test_kernels_import_nothing_from_the_front_end() -> None:
    files = sorted(KERNELS.glob("*.py"))
    assert files, KERNELS
    offenders = {
        path.name: name
        for path in files
        for name in _imports(path)
        if (name == "adafisher" or name.startswith("adafisher."))
        and not (name == "adafisher.kernels" or name.startswith("adafisher.kernels."))
    }
    assert offenders == {}


def test_the_scan_sees_front_end_imports(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from adafisher.factors import FactorBuffers\nfrom .. import layers\n"
                   "from adafisher import hooks\nfrom ._launch import pow2\n")
    assert _imports(bad) == ["adafisher.factors", "adafisher", "adafisher.layers", "adafisher",
                             "adafisher.hooks", "adafisher.kernels._launch"]
