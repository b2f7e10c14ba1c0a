"""dev.py, behind the README's quick-start commands: it reuses a ready interpreter, creates
.venv once, and reinstalls only when what the environment was built from changed."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def dev(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("dev_script", ROOT / "dev.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    monkeypatch.setattr(module, "REPO", tmp_path)
    monkeypatch.setattr(module, "VENV", tmp_path / ".venv")
    monkeypatch.setattr(module, "STAMP", tmp_path / ".venv" / "adafisher-dev.stamp")
    monkeypatch.setattr(module, "reachable", lambda url: False)
    commands = []

    def fake_run(command):
        commands.append(command)
        if command[1:3] == ["-m", "venv"]:  # make the interpreter path exist
            module.venv_python().parent.mkdir(parents=True)
            module.venv_python().touch()

    monkeypatch.setattr(module, "run", fake_run)
    module.commands = commands
    return module


def test_the_test_environment_is_ready_as_it_is(dev):
    assert dev.ready_here()  # adafisher installed, with torch and the test tools


def test_creates_the_venv_once_then_reuses_it(dev):
    python = dev.ensure_venv()
    first = [c[:4] for c in dev.commands]
    assert first[0] == [sys.executable, "-m", "venv", str(dev.VENV)]
    assert any("torch==2.13.0" in c for c in dev.commands)
    assert any(f".[{dev.EXTRAS}]" in c for c in dev.commands)
    dev.commands.clear()
    assert dev.ensure_venv() == python
    assert dev.commands == []  # nothing reinstalled


def test_reinstalls_when_pyproject_changes(dev):
    dev.ensure_venv()
    dev.commands.clear()
    (dev.REPO / "pyproject.toml").write_text("[project]\nname = 'y'\n")
    dev.ensure_venv()
    assert dev.commands and not any("venv" == c[2] for c in dev.commands if len(c) > 2)


def test_an_interrupted_install_is_redone(dev, monkeypatch):
    def failing(command):
        if "torch==2.13.0" in command:
            raise dev.subprocess.CalledProcessError(1, command)
        if command[1:3] == ["-m", "venv"]:
            dev.venv_python().parent.mkdir(parents=True)
            dev.venv_python().touch()

    monkeypatch.setattr(dev, "run", failing)
    with pytest.raises(dev.subprocess.CalledProcessError):
        dev.ensure_venv()
    assert not dev.STAMP.exists()


def test_no_arguments_prints_usage(dev, capsys):
    assert dev.main([]) == 2
    assert "python3 dev.py -m pytest -q" in capsys.readouterr().err
