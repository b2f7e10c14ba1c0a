"""The README's examples run as written."""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_usage_example_runs(capsys):
    usage = python_blocks()[0]
    exec(compile(usage, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip() == "['0', '1', '5']"


def test_signature_block_matches_the_code():
    import inspect

    from adafisher import AdaFisher

    # the block is a call whose keywords spell out the defaults: compare them as values
    block = python_blocks()[1].replace("*, ", "")
    call = ast.parse(block).body[0].value
    documented = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
    actual = {
        name: param.default
        for name, param in inspect.signature(AdaFisher.__init__).parameters.items()
        if param.default is not inspect.Parameter.empty
    }
    assert documented == actual


def test_quick_start_has_exactly_two_commands():
    quick = README.read_text().split("## Quick start", 1)[1].split("```bash\n", 1)[1]
    commands = [line for line in quick.split("```", 1)[0].splitlines() if line.strip()]
    assert len(commands) == 2
    assert commands[1].startswith("python -m pytest -q")


def bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)


def test_triton_interpreter_example_runs():
    import subprocess

    block = next(b for b in bash_blocks() if "TRITON_INTERPRET=1 python" in b)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(["bash", "-c", block], capture_output=True, text=True, env=env,
                         cwd=README.parent, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "triton"


def test_main_job_quick_start_command_runs_as_written():
    """The first quick-start command, exactly as written (a full default run, ~1 min)."""
    import subprocess

    quick = README.read_text().split("## Quick start", 1)[1].split("```bash\n", 1)[1]
    command = quick.split("```", 1)[0].splitlines()[0].split("#", 1)[0].strip()
    assert command == "python bench/epoch_time.py"
    out = subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                         cwd=README.parent, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    for name in ("adam", "adamw", "adafisher", "adafisherw"):
        assert name in out.stdout
    assert (README.parent / "results" / "epoch_time.json").exists()
