"""bench/imagenet.py on CPU with tiny sizes: options, synthetic and ImageFolder runs, resume.

torchvision is optional: without it (or with one built for another torch) the module skips.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

try:
    pytest.importorskip("torchvision")
except Exception as exc:  # a torchvision built for another torch fails with RuntimeError
    pytest.skip(f"torchvision unusable: {exc}", allow_module_level=True)

import torch  # noqa: E402
from torch import nn  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `bench` is a folder of scripts at the repository root

from bench import imagenet  # noqa: E402

TINY = ["--synthetic", "--arch", "resnet18", "--image-size", "32", "--batch-size", "4",
        "--device", "cpu", "--no-progress", "--timing-warmup", "1"]


def test_synthetic_smoke_reports_the_figures(tmp_path: Path, capsys):
    out = tmp_path / "run.json"
    report = imagenet.main([*TINY, "--steps", "3", "--optimizer", "adamw", "--json", str(out)])
    assert json.loads(out.read_text())["timing"] == report["timing"]
    timing = report["timing"]
    assert timing["timed_steps"] == 2  # 3 steps, the first one untimed
    assert timing["step_ms_median"] > 0 and timing["images_per_s"] > 0
    assert timing["opt_step_ms_median"] > 0
    assert report["global_step"] == 3 and len(report["epochs"]) == 1
    assert report["peak_gpu_memory_gib"] is None  # CPU
    assert report["config"]["amp"] == "none" and report["config"]["channels_last"] is True
    assert "images/s" in capsys.readouterr().out


def test_adafisher_checkpoint_resume_continues_epoch_and_step(tmp_path: Path):
    ckpt = tmp_path / "ckpt.pt"
    common = [*TINY, "--steps", "2", "--optimizer", "adafisher", "--factor-interval", "1",
              "--checkpoint", str(ckpt)]
    first = imagenet.main([*common, "--epochs", "1"])
    assert first["global_step"] == 2 and ckpt.is_file()
    state = torch.load(ckpt, weights_only=True)  # plain tensors and containers only
    assert (state["epoch"], state["global_step"]) == (1, 2)
    assert state["scheduler"]["last_epoch"] == 2

    resumed = imagenet.main([*common, "--epochs", "2", "--resume", str(ckpt)])
    assert resumed["start_epoch"] == 1 and resumed["global_step"] == 4
    assert [e["epoch"] for e in resumed["epochs"]] == [1]
    assert torch.load(ckpt, weights_only=True)["global_step"] == 4


def test_adafisher_run_times_statistics_steps_separately(tmp_path: Path):
    report = imagenet.main([*TINY, "--steps", "5", "--optimizer", "adafisherw",
                            "--factor-interval", "2"])
    timing = report["timing"]
    assert timing["timed_steps"] == 4 and timing["stats_steps"] == 2  # steps 2 and 4
    assert timing["step_ms_amortized"] == pytest.approx(
        (timing["step_ms_median_plain"] + timing["step_ms_median_stats"]) / 2)


def make_image_folder(root: Path, classes: int = 2, per_class: int = 4) -> None:
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = torch.randint(0, 256, (40, 40, 3), generator=gen, dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")


def test_image_folder_training_reports_val_accuracy(tmp_path: Path):
    make_image_folder(tmp_path)
    report = imagenet.main(["--data", str(tmp_path), "--arch", "resnet18", "--image-size", "32",
                            "--batch-size", "2", "--workers", "0", "--epochs", "1",
                            "--device", "cpu", "--no-progress", "--optimizer", "sgd"])
    assert report["epochs"][0]["steps"] == 4  # 8 images, batch 2
    assert report["val"]["images"] == 8
    assert 0 <= report["val"]["top1"] <= report["val"]["top5"] == 100  # 2 classes: top-5 is all
    assert report["config"]["lr"] == pytest.approx(0.1 * 2 / 256)  # linear scaling for sgd


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--data", "/nonexistent/imagenet"], "no such folder"),
        (["--synthetic", "--arch", "resnet_9000"], "unknown --arch"),
        (["--synthetic", "--optimizer", "lion"], "invalid choice"),
        (["--synthetic", "--resume", "/nonexistent.pt"], "--resume /nonexistent.pt: no such"),
        (["--synthetic", "--steps", "0"], "positive integer"),
        (["--synthetic", "--label-smoothing", "1.5"], "[0, 1)"),
        (["--synthetic", "--optimizer", "adafisher", "--fused"], "--fused applies to"),
        ([], "one of the arguments --data --synthetic is required"),
    ],
)
def test_bad_options_are_argparse_errors(argv: list[str], message: str, capsys):
    with pytest.raises(SystemExit) as exc:
        imagenet.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_data_folder_missing_val_is_named(tmp_path: Path, capsys):
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(SystemExit):
        imagenet.parse_args(["--data", str(tmp_path)])
    err = capsys.readouterr().err
    assert "train/ and val/" in err and "missing: val/" in err


def test_no_weight_decay_on_norms_and_biases():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    decay, no_decay = imagenet.param_groups(model, 1e-4)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert {p.ndim for p in decay["params"]} == {2, 4}
    assert len(no_decay["params"]) == 4  # conv bias, bn weight and bias, linear bias


def test_cosine_schedule_with_warmup():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = imagenet.cosine_with_warmup(opt, warmup=2, total=6)
    lrs = []
    for _ in range(6):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert lrs[3] == pytest.approx(0.5 * (1 + torch.cos(torch.tensor(torch.pi / 4)).item()))
    assert lrs == sorted(lrs[:2]) + sorted(lrs[2:], reverse=True)


def test_defaults_depend_on_device():
    args = argparse.Namespace(batch_size=None, amp=None, fused=None, epochs=None, steps=None,
                              warmup_epochs=None, lr=None, timing_warmup=None,
                              optimizer="adamw", synthetic=True)
    imagenet.fill_defaults(args, torch.device("cpu"))
    assert (args.batch_size, args.amp, args.fused, args.epochs, args.steps) == (
        16, "none", False, 1, 100)
    args.batch_size = args.amp = args.fused = None
    imagenet.fill_defaults(args, torch.device("cuda"))
    assert (args.batch_size, args.amp, args.fused) == (256, "bf16", True)


def test_runs_as_a_script_and_reports_errors_without_traceback():
    proc = subprocess.run(
        [sys.executable, "bench/imagenet.py", "--data", "/nonexistent/imagenet"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "no such folder" in proc.stderr and "Traceback" not in proc.stderr
