"""Assemble the figures of a `bench/gpu_check.sh` run into one JSON and one markdown table.

    python bench/summarize.py RESULTS_DIR     # writes gpu_check.json and gpu_check.md there

Reads what the stages left in RESULTS_DIR: `stages/*.json` (exit status and time of each
stage), `env.json`, `tests.xml` (pytest junit), `imagenet_*.json` (bench/imagenet.py runs),
`step.json` and `factors.json` (bench/step.py and bench/factors.py). Anything missing is
reported as missing, never an error: a failed stage must not hide the others' figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

try:
    from bench import common
except ImportError:  # run as `python bench/summarize.py`: bench/ itself is on sys.path
    import common

REFERENCE_RUN = "adamw"
# run name -> maximum step-time ratio to the reference run (the targets on an H200)
STEP_TIME_TARGETS = {"adafisher-i1": 1.10, "adafisher": 1.03}
IMAGENET_RUNS = ("adamw", "adafisher-i1", "adafisher")


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_stages(out: Path) -> list[dict[str, Any]]:
    stages = [read_json(p) for p in sorted((out / "stages").glob("*.json"))]
    return sorted((s for s in stages if s), key=lambda s: s.get("order", 0))


def read_tests(path: Path) -> dict[str, Any] | None:
    """Counts and the first failing test ids from a pytest junit XML file."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites)
              for k in ("tests", "failures", "errors", "skipped")}
    failed = []
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname')}::{case.get('name')}")
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed_ids"] = failed[:20]
    return counts


def imagenet_figures(out: Path) -> dict[str, dict[str, Any]]:
    figures = {}
    for name in IMAGENET_RUNS:
        report = read_json(out / f"imagenet_{name}.json")
        if not report:
            continue
        t = report["timing"]
        figures[name] = {
            "images_per_s": t["images_per_s"],
            "step_ms_median": t["step_ms_median"],
            "step_ms_amortized": t["step_ms_amortized"],
            "step_ms_median_stats": t.get("step_ms_median_stats"),
            "step_ms_median_plain": t.get("step_ms_median_plain"),
            "opt_step_ms_median": t["opt_step_ms_median"],
            "timed_steps": t["timed_steps"],
            "epoch_s": [e["epoch_s"] for e in report["epochs"]],
            "peak_gpu_memory_gib": report.get("peak_gpu_memory_gib"),
            "factor_interval": report["config"].get("factor_interval"),
            "batch_size": report["config"].get("batch_size"),
            "arch": report["config"].get("arch"),
        }
    ref = figures.get(REFERENCE_RUN)
    for fig in figures.values():
        fig["step_time_ratio"] = common.ratio(
            fig["step_ms_amortized"], ref and ref["step_ms_amortized"])
        fig["peak_memory_ratio"] = common.ratio(
            fig["peak_gpu_memory_gib"], ref and ref["peak_gpu_memory_gib"])
    return figures


def check_targets(figures: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    checks = []
    for name, limit in STEP_TIME_TARGETS.items():
        value = figures.get(name, {}).get("step_time_ratio")
        checks.append({"target": f"{name} step time <= {limit:.2f}x {REFERENCE_RUN}",
                       "value": value, "ok": None if value is None else value <= limit})
    for name in STEP_TIME_TARGETS:
        value = figures.get(name, {}).get("peak_memory_ratio")
        checks.append({"target": f"{name} peak memory <= {REFERENCE_RUN}'s",
                       "value": value, "ok": None if value is None else value <= 1.0})
    return checks


def flatten(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Scalars of a nested JSON value as (dotted.key, value) pairs."""
    if isinstance(obj, dict):
        return [kv for k, v in obj.items() for kv in flatten(v, f"{prefix}{k}.")]
    if isinstance(obj, list) and len(obj) <= 8 and all(not isinstance(v, dict) for v in obj):
        return [(prefix.rstrip("."), ", ".join(_num(v) for v in obj))]
    if isinstance(obj, list):
        return [kv for i, v in enumerate(obj) for kv in flatten(v, f"{prefix}{i}.")]
    return [(prefix.rstrip("."), obj)]


def render_other(name: str, payload: Any, limit: int = 60) -> list[str]:
    """Another script's JSON: its `rows` (a list of dicts) as a table, else its scalars."""
    lines = [f"### {name}", ""]
    if payload is None:
        return lines + ["(no figures: the stage was skipped or failed; see its log)", ""]
    rows = payload.get("rows") if isinstance(payload, dict) else None
    if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
        headers = list(dict.fromkeys(k for r in rows for k in r))
        table = common.format_table(headers, ([_num(r.get(h)) for h in headers] for r in rows))
        return lines + [table, ""]
    pairs = [(k, v) for k, v in flatten(payload) if k != "env" and not k.startswith("env.")]
    table = common.format_table(("figure", "value"), ([k, _num(v)] for k, v in pairs[:limit]))
    more = [f"({len(pairs) - limit} more in {name}.json)"] if len(pairs) > limit else []
    return lines + [table, *more, ""]


def _num(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown(summary: dict[str, Any]) -> str:
    env = summary.get("env") or {}
    lines = ["# GPU check", ""]
    if env:
        lines += [", ".join(f"{k} {v}" for k, v in env.items() if k != "nvidia_smi"), ""]
    stage_rows = [[s["name"], _status(s), f"{s.get('seconds', 0):.0f}"]
                  for s in summary["stages"]]
    lines += ["## Stages", "", common.format_table(("stage", "status", "s"), stage_rows), ""]
    tests = summary.get("tests")
    if tests:
        lines += ["## Tests", "", "{passed} passed, {failures} failed, {errors} errors, "
                  "{skipped} skipped".format(**tests), ""]
        lines += [f"- FAILED {t}" for t in tests["failed_ids"]] + ([""] if tests["failed_ids"]
                                                                   else [])
    lines += ["## Synthetic ImageNet training step", ""]
    figs = summary["imagenet"]
    if figs:
        any_fig = next(iter(figs.values()))
        lines += [f"{any_fig['arch']}, batch {any_fig['batch_size']}; step time = median "
                  "synchronized training step (AdaFisher at interval > 1: amortized over the "
                  "interval); ratios against " + REFERENCE_RUN, ""]
        headers = ("run", "images/s", "step ms", "amortized ms", "stats-step ms", "opt ms",
                   "peak GiB", "step ratio", "memory ratio")
        rows = [[name, _f(f["images_per_s"], ".0f"), _f(f["step_ms_median"], ".1f"),
                 _f(f["step_ms_amortized"], ".1f"), _f(f["step_ms_median_stats"], ".1f"),
                 _f(f["opt_step_ms_median"], ".2f"), _f(f["peak_gpu_memory_gib"], ".2f"),
                 _f(f["step_time_ratio"], ".3f"), _f(f["peak_memory_ratio"], ".3f")]
                for name, f in figs.items()]
        lines += [common.format_table(headers, rows), ""]
        target_rows = [[c["target"], _f(c["value"], ".3f"),
                        {True: "PASS", False: "FAIL", None: "-"}[c["ok"]]]
                       for c in summary["targets"]]
        lines += [common.format_table(("target", "value", "result"), target_rows), ""]
    else:
        lines += ["(no figures: see the imagenet stages' logs)", ""]
    for name in ("step", "factors"):
        lines += render_other(name, summary.get(name))
    return "\n".join(lines)


def _status(stage: dict[str, Any]) -> str:
    if stage.get("skipped"):
        return f"skipped ({stage['skipped']})"
    if stage.get("timed_out"):
        return f"TIMEOUT ({stage.get('limit_s')} s)"
    return "ok" if stage.get("rc") == 0 else f"FAILED (rc {stage.get('rc')})"


def _f(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def summarize(out: Path) -> dict[str, Any]:
    figures = imagenet_figures(out)
    return {
        "env": read_json(out / "env.json"),
        "stages": read_stages(out),
        "tests": read_tests(out / "tests.xml"),
        "imagenet": figures,
        "targets": check_targets(figures),
        "step": read_json(out / "step.json"),
        "factors": read_json(out / "factors.json"),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the results folder of a gpu_check run")
    args = parser.parse_args(argv)
    if not args.out.is_dir():
        parser.error(f"{args.out}: no such folder")
    summary = summarize(args.out)
    common.write_json(args.out / "gpu_check.json", summary)
    text = markdown(summary)
    (args.out / "gpu_check.md").write_text(text + "\n")
    print(text)
    sys.stdout.flush()
    return summary


if __name__ == "__main__":
    main()
