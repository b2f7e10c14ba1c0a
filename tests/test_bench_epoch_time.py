"""bench/epoch_time.py, the README's main job. Small runs only (seconds on CPU), always into
tmp_path: the tests never touch the checkout's results/."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")  # the digits data set ships with scikit-learn
pytest.importorskip("matplotlib")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `bench` is a folder of scripts at the repository root

from bench import common, epoch_time  # noqa: E402

TINY = ("--task", "digits", "--seeds", "1", "--device", "cpu", "--no-progress")


def run_main(tmp_path: Path, *extra: str) -> dict:
    return epoch_time.main([*TINY, "--out", str(tmp_path), *extra])


def test_small_run_writes_table_json_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture):
    payload = run_main(tmp_path, "--epochs", "3", "--seeds", "2",
                       "--optimizers", "adam,adafisher-i1")
    out = capsys.readouterr().out
    for text in ("adam", "adafisher-i1", "epoch ms (p10–p90)", "vs adam, paired",
                 "test acc % (mean ± std)", "time to adam's acc", "stored --lr-sweep winners"):
        assert text in out

    saved = json.loads((tmp_path / "epoch_time.json").read_text())
    assert saved["results"].keys() == payload["results"].keys()
    assert (tmp_path / "epoch_time.png").stat().st_size > 1000
    assert saved["env"]["torch"] and saved["config"]["threads"] == 1
    assert saved["results"]["adam"]["ratio_to_reference"]["median"] == pytest.approx(1.0)
    for name, result in saved["results"].items():
        assert result["lr"] == epoch_time.SWEPT_LR["digits"][name]
        assert len(result["per_seed"]) == 2
        for seed in result["per_seed"]:
            assert len(seed["epoch_times_s"]) == len(seed["test_accuracy"]) == 3
        # two timed rounds per seed (the first epoch of each seed is warm-up)
        assert result["epoch_s"]["n"] == result["ratio_to_reference"]["n"] == 4
        assert 0.0 <= result["final_test_accuracy_mean"] <= 1.0
        assert result["final_test_accuracy_std"] >= 0.0


def test_ratios_pair_the_optimizers_round_by_round():
    """A load spike that hits both optimizers in one round leaves the paired ratio alone; the
    ratio of whole-run medians (the old figure) moves."""
    def run(name: str, times: list[float]) -> epoch_time.Run:
        r = epoch_time.Run(name, 1e-3, None, None, None)  # type: ignore[arg-type]
        r.epoch_times, r.test_acc, r.train_loss = times, [0.5] * len(times), [1.0] * len(times)
        return r

    # warm-up, then three rounds: quiet, loaded (everything 10x slower), quiet
    adam = run("adam", [9.0, 1.0, 10.0, 1.0])
    other = run("adafisher", [9.0, 1.2, 12.0, 1.2])
    results = epoch_time.summarize(["adam", "adafisher"], [[adam, other]],
                                   {"adam": 1e-3, "adafisher": 1e-3}, "adam")
    ratio = results["adafisher"]["ratio_to_reference"]
    assert ratio["median"] == pytest.approx(1.2)
    assert ratio["p10"] == pytest.approx(1.2) and ratio["p90"] == pytest.approx(1.2)
    assert ratio["trusted"]


def test_a_wide_spread_is_flagged(capsys):
    wide = common.paired_ratios([1.0, 2.0, 3.0], [1.0, 1.0, 1.0])
    assert not wide["trusted"]
    assert common.format_spread(wide).endswith("!")
    assert common.paired_ratios([1.1, 1.1], [1.0, 1.0])["trusted"]


def test_time_to_reference_accuracy_uses_the_seed_mean_curve():
    def run(name, accs, times):
        r = epoch_time.Run(name, 1e-3, None, None, None)  # type: ignore[arg-type]
        r.epoch_times, r.test_acc, r.train_loss = times, accs, [1.0] * len(accs)
        return r

    adam = ([0.5, 0.7, 0.8], [5, 1, 1])
    seeds = [[run("adam", *adam), run("adafisher", [0.6, 0.8, 0.9], [5, 2, 2])],
             [run("adam", *adam), run("adafisher", [0.7, 0.8, 0.9], [5, 2, 2])]]
    lrs = {"adam": 1, "adafisher": 1}
    results = epoch_time.summarize(["adam", "adafisher"], seeds, lrs, "adam")
    assert results["adafisher"]["epochs_to_reference_accuracy"] == 2
    assert results["adafisher"]["time_to_reference_accuracy_s"] == pytest.approx(4.0)
    assert results["adam"]["epochs_to_reference_accuracy"] == 3


def test_threads_are_pinned_for_the_run_and_restored(tmp_path: Path, monkeypatch):
    seen = []
    real = epoch_time.train_epoch
    monkeypatch.setattr(epoch_time, "train_epoch",
                        lambda *a: seen.append(torch.get_num_threads()) or real(*a))
    before = torch.get_num_threads()
    run_main(tmp_path, "--epochs", "1", "--optimizers", "adam", "--threads", "1")
    assert set(seen) == {1}
    assert torch.get_num_threads() == before


def test_same_seed_gives_the_same_run(tmp_path: Path):
    first = run_main(tmp_path / "a", "--epochs", "1", "--optimizers", "adafisherw")
    second = run_main(tmp_path / "b", "--epochs", "1", "--optimizers", "adafisherw")
    assert (first["results"]["adafisherw"]["per_seed"][0]["step_losses"]
            == second["results"]["adafisherw"]["per_seed"][0]["step_losses"])


def test_every_optimizer_starts_from_the_same_weights(tmp_path: Path):
    payload = run_main(tmp_path, "--epochs", "1", "--optimizers", "adam,adamw",
                       "--lr", "adam=1e-3,adamw=1e-3")
    # same initial weights and batch order: with wd the only difference, step 1 is identical
    losses = [r["per_seed"][0]["step_losses"][0][0] for r in payload["results"].values()]
    assert losses[0] == losses[1]
    assert "overridden by --lr for adam, adamw" in payload["config"]["lr_source"]


def test_lr_sweep_picks_the_best_validation_accuracy(tmp_path: Path, capsys):
    payload = run_main(tmp_path, "--lr-sweep", "--epochs", "1", "--optimizers", "adam")
    table = payload["validation_accuracy"]["adam"]
    assert list(table) == [f"{lr:g}" for lr in epoch_time.LR_GRID["adam"]]
    assert payload["winners"]["adam"] == float(max(table, key=table.__getitem__))
    assert (tmp_path / "lr_sweep.json").exists()
    assert "winners: --lr adam=" in capsys.readouterr().out


def test_validation_split_never_uses_the_test_set():
    data = epoch_time.Data(torch.arange(10.0), torch.arange(10), torch.zeros(3), torch.zeros(3))
    split = data.validation_split(0.2)
    assert split.y_train.tolist() == list(range(8)) and split.y_test.tolist() == [8, 9]


def test_mnist1d_task_is_generated_offline_and_fits_its_model():
    pytest.importorskip("mnist1d")
    data = epoch_time.load_mnist1d(torch.device("cpu"))
    assert data.x_train.shape == (4000, 1, 40) and data.x_test.shape == (1000, 1, 40)
    assert epoch_time.mnist1d_model()(data.x_test[:2]).shape == (2, 10)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--optimizers", "adam,sgd"], "unknown optimizer(s) sgd"),
        (["--optimizers", ","], "unknown optimizer"),
        (["--epochs", "0"], "positive integer"),
        (["--batch-size", "x"], "positive integer"),
        (["--threads", "0"], "positive integer"),
        (["--task", "cifar"], "invalid choice"),
        (["--device", "tpu"], "device 'tpu'"),
        (["--lr", "adafisher=nan"], "finite"),
        (["--lr", "sgd=1e-3"], "NAME=LR"),
    ],
)
def test_bad_options_are_argparse_errors(argv: list[str], message: str, capsys):
    with pytest.raises(SystemExit) as exc:
        epoch_time.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_help_states_the_thread_default(capsys):
    with pytest.raises(SystemExit):
        epoch_time.parse_args(["--help"])
    assert f"default: {epoch_time.DEFAULT_THREADS};" in " ".join(capsys.readouterr().out.split())


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
