"""bench/epoch_time.py: the README's first command. Small runs only (a few seconds on CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")  # the digits data set ships with scikit-learn
pytest.importorskip("matplotlib")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `bench` is a folder of scripts at the repository root

from bench import epoch_time  # noqa: E402


def run_main(tmp_path: Path, *extra: str) -> dict:
    return epoch_time.main(["--device", "cpu", "--out", str(tmp_path), "--no-progress", *extra])


def test_small_run_writes_table_json_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture):
    payload = run_main(tmp_path, "--epochs", "2", "--optimizers", "adam,adafisher-i1")
    table = capsys.readouterr().out
    for name in ("adam", "adafisher-i1", "median epoch ms", "test acc %"):
        assert name in table

    saved = json.loads((tmp_path / "epoch_time.json").read_text())
    assert saved["results"].keys() == payload["results"].keys()
    assert (tmp_path / "epoch_time.png").stat().st_size > 1000
    assert saved["env"]["torch"] and saved["env"]["torch_threads"] >= 1
    assert saved["env"]["device"] == "cpu"
    assert saved["results"]["adam"]["ratio_to_adam"] == pytest.approx(1.0)
    for result in saved["results"].values():
        assert len(result["epoch_times_s"]) == len(result["train_loss"]) == 2
        assert result["median_epoch_s"] == result["epoch_times_s"][1]  # first one is warm-up
        assert 0.0 <= result["final_test_accuracy"] <= 1.0
        assert result["final_train_loss"] < result["train_loss"][0] * 1.5  # it trains
        assert result["wall_clock_s"] == sorted(result["wall_clock_s"])


def test_same_seed_gives_the_same_run(tmp_path: Path):
    first = run_main(tmp_path / "a", "--epochs", "1", "--optimizers", "adafisherw")
    second = run_main(tmp_path / "b", "--epochs", "1", "--optimizers", "adafisherw")
    assert first["results"]["adafisherw"]["step_losses"] == second["results"]["adafisherw"][
        "step_losses"]


def test_every_optimizer_starts_from_the_same_weights(tmp_path: Path):
    payload = run_main(tmp_path, "--epochs", "1", "--optimizers", "adam,adamw")
    # same initial weights and batch order: with wd the only difference, step 1 is identical
    losses = [r["step_losses"][0][0] for r in payload["results"].values()]
    assert losses[0] == losses[1]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--optimizers", "adam,sgd"], "unknown optimizer(s) sgd"),
        (["--optimizers", ","], "unknown optimizer"),
        (["--epochs", "0"], "positive integer"),
        (["--batch-size", "x"], "positive integer"),
        (["--seed", "-1"], "integer >= 0"),
        (["--device", "tpu"], "device 'tpu'"),
        (["--adafisher-lr", "nan"], "finite"),
    ],
)
def test_bad_options_are_argparse_errors(argv: list[str], message: str, capsys):
    with pytest.raises(SystemExit) as exc:
        epoch_time.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_cuda_request_without_cuda_is_an_argparse_error(capsys, monkeypatch):
    monkeypatch.setattr(epoch_time.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        epoch_time.parse_args(["--device", "cuda"])
    assert "CUDA is not available" in capsys.readouterr().err


def test_optimizer_list_normalizes_and_drops_repeats():
    assert epoch_time.optimizer_list(" Adam,adafisher,adam ") == ["adam", "adafisher"]


def test_runs_as_a_script_and_reports_errors_without_traceback():
    proc = subprocess.run(
        [sys.executable, "bench/epoch_time.py", "--optimizers", "nope"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "unknown optimizer(s) nope" in proc.stderr
    assert "Traceback" not in proc.stderr
