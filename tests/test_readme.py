"""The README's examples run as written."""

from __future__ import annotations

import ast
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
