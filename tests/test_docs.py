"""The documents a user looks for exist, agree with each other and name nothing that only
exists on a developer's machine."""

from __future__ import annotations

import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "bench" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SOURCES = [*(ROOT / "adafisher").rglob("*.py"), *(ROOT / "kernels").rglob("*.py"),
           *(ROOT / "bench").glob("*.py"), *(ROOT / "examples").glob("*.py")]


def test_no_machine_specific_paths():
    for path in DOCS + SOURCES:
        text = path.read_text()
        assert not re.search(r"/work/|/home/\w|/root/|/tmp/docs", text), path


def test_no_reference_to_the_unshipped_spec():
    for path in SOURCES + DOCS:
        assert "SPEC §" not in path.read_text() and "SPEC.md" not in path.read_text(), path


def test_relative_links_resolve():
    for path in DOCS:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", path.read_text()):
            assert (path.parent / target).exists(), (path, target)


def test_license_citation_and_bibtex_agree():
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    cff = (ROOT / "CITATION.cff").read_text()
    title = "AdaFisher: Adaptive Second Order Optimization via Fisher Information"
    assert title in cff and "2405.16397" in cff
    bibtex = re.search(r"```bibtex\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    assert title.replace("AdaFisher", "{AdaFisher}") in bibtex and "2405.16397" in bibtex


def test_algorithm_doc_sections_cited_by_docstrings_exist():
    headings = re.findall(r"^## (\d+)\.", (ROOT / "docs/algorithm.md").read_text(), re.M)
    cited = {n for path in SOURCES for n in re.findall(r"algorithm\.md §(\d)", path.read_text())}
    cited |= {n for path in SOURCES
              for group in re.findall(r"algorithm\.md §\d(?:, §\d)+", path.read_text())
              for n in re.findall(r"§(\d)", group)}
    assert cited and cited <= set(headings)


def test_repr_shows_the_optimizer_wide_settings():
    from adafisher import AdaFisher, AdaFisherW

    text = repr(AdaFisher(torch.nn.Linear(2, 2), factor_interval=7, gammas=(0.5, 0.25),
                          backend="torch"))
    for piece in ("factor_interval: 7", "gammas: (0.5, 0.25)", "backend: torch", "lr: 0.001"):
        assert piece in text
    assert repr(AdaFisherW(torch.nn.Linear(2, 2))).startswith("AdaFisherW (")
    assert "decoupled" in AdaFisherW.__doc__ and len(AdaFisherW.__doc__.splitlines()) > 5
