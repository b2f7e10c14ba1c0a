#!/usr/bin/env bash
# The one script for a lent GPU: every figure the project needs from it, in one run (< 8 min).
#
#   bash bench/gpu_check.sh                 # on the GPU machine, from the repository root
#   PYTHON=/path/to/python bash bench/gpu_check.sh --cpu-dry-run   # rehearsal on CPU, tiny sizes
#
# Stages (each one's failure or timeout is recorded and the script goes on to the next):
#   env        versions and GPU name                          -> env.json
#   imagenet_* bench/imagenet.py --synthetic, ResNet-50, batch 256, bf16, channels_last:
#              adamw (fused), adafisher at factor_interval=1, adafisher at the default
#                                                             -> imagenet_<run>.json
#   step       bench/step.py --json step.json      (if present; --cpu-dry-run passed through)
#   factors    bench/factors.py --json factors.json (likewise)
#   tests      pytest tests/ on the GPU (the remaining time) -> tests.xml
#   summary    bench/summarize.py                  -> gpu_check.json, gpu_check.md, printed last
# The timing runs go first so that a slow or hanging test suite cannot eat the measurements.
# Output folder: $OUT if set (the GPU runner sets it), else ./results. Logs: $OUT/logs/.
# Time limits (seconds) can be overridden: BUDGET_S, IMAGENET_S, STEP_S, FACTORS_S, TESTS_S.
set -u -o pipefail

usage() { awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"; }
DRY=0
for arg in "$@"; do
    case "$arg" in
        --cpu-dry-run) DRY=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check.sh: unknown option $arg (try --help)" >&2; exit 2 ;;
    esac
done

cd "$(dirname "$0")/.." || exit 2
OUT="${OUT:-./results}"
mkdir -p "$OUT/logs" "$OUT/stages" || exit 2
PY="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the checkout's adafisher and bench
export PYTHONDONTWRITEBYTECODE=1
START=$(date +%s)
BUDGET_S="${BUDGET_S:-430}"  # a margin under the 8-minute target (kills take up to 10 s)
ORDER=0

if [ "$DRY" = 1 ]; then
    # tiny sizes on CPU: exercises every code path and the output files, measures nothing
    NET=(--device cpu --arch resnet18 --image-size 64 --batch-size 8 --steps 6
         --timing-warmup 1 --amp bf16)
    DEFAULT_FI=(--factor-interval 4)  # so that a statistics step falls among the timed ones
    PASS=(--cpu-dry-run)
    TESTS=(--collect-only -q)
else
    NET=(--arch resnet50 --image-size 224 --batch-size 256 --steps 110 --timing-warmup 10
         --amp bf16)
    DEFAULT_FI=()  # factor_interval 100: step 100 (statistics) is among the 100 timed steps
    PASS=()
    TESTS=(-q -rfE)
fi

json_str() {  # a JSON string literal
    local s=${1//\\/\\\\}
    s=${s//\"/\\\"}
    printf '"%s"' "${s//$'\n'/ }"
}

record() {  # record NAME RC SECONDS TIMED_OUT LIMIT SKIPPED_REASON CMD
    ORDER=$((ORDER + 1))
    printf '{"order": %d, "name": %s, "rc": %s, "seconds": %s, "timed_out": %s, "limit_s": %s, '\
'"skipped": %s, "log": %s, "command": %s}\n' "$ORDER" "$(json_str "$1")" "$2" "$3" "$4" "$5" \
        "$6" "$(json_str "$OUT/logs/$1.log")" "$(json_str "$7")" >"$OUT/stages/$1.json"
}

stage() {  # stage NAME LIMIT_S CMD...: run with a time limit, record the outcome, never abort
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET_S - ($(date +%s) - START)))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 15 ]; then
        echo "== $name: skipped, time budget spent" >&2
        record "$name" null 0 false "$limit" '"time budget spent"' "$*"
        return
    fi
    echo "== $name (limit ${limit}s): $*" >&2
    local t0 rc timed_out=false
    t0=$(date +%s.%N)
    timeout --kill-after=10 "$limit" "$@" >"$OUT/logs/$name.log" 2>&1
    rc=$?
    [ "$rc" = 124 ] || [ "$rc" = 137 ] && timed_out=true
    local secs
    secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    record "$name" "$rc" "$secs" "$timed_out" "$limit" null "$*"
    if [ "$rc" != 0 ]; then
        echo "== $name FAILED (rc $rc, timed out: $timed_out); last lines of its log:" >&2
        tail -n 15 "$OUT/logs/$name.log" | sed 's/^/   | /' >&2
    fi
}

optional_script() {  # optional_script NAME LIMIT: bench/NAME.py if another change added it
    if [ -f "bench/$1.py" ]; then
        stage "$1" "$2" "$PY" "bench/$1.py" --json "$OUT/$1.json" "${PASS[@]}"
    else
        record "$1" null 0 false "$2" '"bench/'"$1"'.py not present"' ""
        echo "== $1: skipped, bench/$1.py not present" >&2
    fi
}

ENV_PY='
import json, platform, subprocess, sys
import torch
info = {"python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0)
        if torch.cuda.is_available() else None}
for mod in ("triton", "torchvision"):
    try:
        info[mod] = __import__(mod).__version__
    except Exception as exc:
        info[mod] = f"unavailable ({type(exc).__name__})"
try:
    info["nvidia_smi"] = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
         "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
except Exception:
    info["nvidia_smi"] = None
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(info)
'
printf '%s' "$ENV_PY" >"$OUT/logs/env.py"
stage env 60 "$PY" "$OUT/logs/env.py" "$OUT/env.json"

IMAGENET_S="${IMAGENET_S:-75}"
SYN=("$PY" bench/imagenet.py --synthetic "${NET[@]}" --channels-last --no-progress)
stage imagenet_adamw "$IMAGENET_S" "${SYN[@]}" --optimizer adamw --fused \
    --json "$OUT/imagenet_adamw.json"
stage imagenet_adafisher-i1 "$IMAGENET_S" "${SYN[@]}" --optimizer adafisher \
    --factor-interval 1 --json "$OUT/imagenet_adafisher-i1.json"
stage imagenet_adafisher "$IMAGENET_S" "${SYN[@]}" --optimizer adafisher "${DEFAULT_FI[@]}" \
    --json "$OUT/imagenet_adafisher.json"

optional_script step "${STEP_S:-60}"
optional_script factors "${FACTORS_S:-60}"

# the suite gets what is left of the budget, keeping 20 s for the summary
TESTS_S="${TESTS_S:-$((BUDGET_S - ($(date +%s) - START) - 20))}"
stage tests "$TESTS_S" "$PY" -m pytest tests -p no:cacheprovider --junitxml="$OUT/tests.xml" \
    "${TESTS[@]}"

echo "== total $(($(date +%s) - START)) s; summary:" >&2
"$PY" bench/summarize.py "$OUT"
