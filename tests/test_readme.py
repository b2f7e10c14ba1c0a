"""The README's examples run as written.

Shell blocks run with the environment of the interpreter running the tests (its folder first
on PATH), so that `python` in them is this interpreter even when it was called by path.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)


def quick_start_commands() -> list[str]:
    quick = README.read_text().split("## Quick start", 1)[1].split("```bash\n", 1)[1]
    lines = [line.split("#", 1)[0].strip() for line in quick.split("```", 1)[0].splitlines()]
    return [line for line in lines if line]


def shell_env(**extra: str) -> dict[str, str]:
    """This interpreter's environment: its bin folder first on PATH (and no inherited
    TRITON_INTERPRET, which the README sets where it needs it)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.update(extra)
    return env


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


def test_quick_start_has_two_commands_and_ci_runs_the_test_command_as_written():
    commands = quick_start_commands()
    assert commands == ["python3 dev.py bench/epoch_time.py", "python3 dev.py -m pytest -q"]
    ci_lines = [line.split("||")[0].strip() for line in (REPO / ".ci/run").read_text().splitlines()]
    assert commands[1] in ci_lines


def test_shell_blocks_use_the_running_interpreter(tmp_path):
    """The old test ran `python` from the caller's PATH: with the venv's interpreter called by
    path, that was another Python (`No module named 'torch'`)."""
    env = shell_env(PATH=os.path.dirname(sys.executable) + os.pathsep + "/usr/bin:/bin")
    out = subprocess.run(["bash", "-c", "python -c 'import sys; print(sys.prefix)'"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.stdout.strip() == sys.prefix


def test_triton_interpreter_example_runs():
    block = next(b for b in bash_blocks() if "TRITON_INTERPRET=1 python" in b)
    out = subprocess.run(["bash", "-c", block], capture_output=True, text=True, env=shell_env(),
                         cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "triton"


def test_main_job_quick_start_command_runs_as_written(tmp_path):
    """The first quick-start command as written, in a copy of the scripts (it writes
    results/ under its working folder: the checkout's results/ stay untouched), with options
    appended that shrink it to the seconds-long smoke task; the default task is exercised by
    tests/test_bench_epoch_time.py."""
    command = quick_start_commands()[0]
    shutil.copy2(REPO / "dev.py", tmp_path / "dev.py")
    shutil.copytree(REPO / "bench", tmp_path / "bench",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shrink = " --task digits --epochs 2 --seeds 1 --optimizers adam,adafisher --no-progress"
    out = subprocess.run(["bash", "-c", command + shrink], capture_output=True, text=True,
                         cwd=tmp_path, env=shell_env(), timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    for name in ("adam", "adafisher", "vs adam, paired"):
        assert name in out.stdout
    assert (tmp_path / "results" / "epoch_time.json").exists()
    assert not (tmp_path / ".venv").exists()  # dev.py used the running interpreter
