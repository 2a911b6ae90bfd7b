#!/usr/bin/env bash
# Every GPU measurement the docs wait for, in one command on a GPU machine, within 10 minutes by default:
#   bash benchmarks/on_gpu.sh                  # OUT=DIR collects each step's JSON and on_gpu.log (default benchmarks/results)
# Each step has its own time cap, so one slow step cannot cost the others; the exit status is 1 if any step failed.
# A machine without internet whose image lacks datasets or pydantic gets them as wheels: run benchmarks/gpu_wheels.sh
# where pip works and copy .whl/ along; this script installs them into /tmp/site first. STEPS picks steps by name
# (default: defaults speed stacked loader), e.g. STEPS=table1 BUDGET_MINUTES=8 for the full-scale Table 1 rows that
# fit 8 minutes. DRY_RUN=1 runs the default steps' --dry-run on a CPU, so this script's own plumbing is checked
# without a GPU (tests/test_gpu_speed.py).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
exec > >(tee "$OUT/on_gpu.log") 2>&1
export PYTHONUNBUFFERED=1
DRY=
[ "${DRY_RUN:-0}" = 1 ] && DRY=--dry-run
if [ -d .whl ] && [ -z "$DRY" ]; then  # the wheels are the GPU image's Python's; a dry run uses this environment
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
fi
PY=${PY:-python3}
if [ -n "$DRY" ]; then echo "dry run: every step's --dry-run, on the CPU"; LOADER_GPU=; else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; LOADER_GPU=--gpu; fi
$PY -c "import torch, timm, accelerate, datasets, pydantic; print('torch', torch.__version__, 'timm', timm.__version__,
'accelerate', accelerate.__version__, 'datasets', datasets.__version__, 'pydantic', pydantic.__version__)" || exit 1

failed=0
step() {  # step NAME SECONDS COMMAND...: run it under its cap and say how it ended
  local name=$1 cap=$2; shift 2
  case " ${STEPS:-defaults speed stacked loader} " in *" $name "*) ;; *) return 0 ;; esac
  if [ -n "$DRY" ]; then
    [ "$name" = table1 ] && { echo "== table1: no CPU dry run (reproduce --dry-run plans a CUDA run)"; return 0; }
    cap=$((cap * 2))  # the caps are sized for a GPU machine's 16 cores, not a busy 2-core CPU
  fi
  echo "== $name (at most $cap s): $*"
  local start=$SECONDS status
  timeout "$cap" "$@"; status=$?
  echo "== $name: exit $status after $((SECONDS - start)) s"
  [ "$status" = 0 ] || failed=1
}
step defaults 30 $PY -m benchmarks.gpu_defaults $DRY --out "$OUT/gpu_defaults.json"
step speed 270 $PY -m benchmarks.gpu_speed $DRY --out "$OUT/gpu_speed.json"
step stacked 150 $PY -m benchmarks.stacked_workers $DRY --out "$OUT/stacked_workers.json"
step loader 120 $PY -m benchmarks.loader $LOADER_GPU $DRY --out "$OUT/loader_gpu.json"
step table1 $((60 * ${BUDGET_MINUTES:-8} + 60)) $PY -m benchmarks.reproduce --device cuda --budget-minutes "${BUDGET_MINUTES:-8}"
case " ${STEPS:-} " in *" table1 "*) [ -n "$DRY" ] || cp -r benchmarks/results/reproduce_full "$OUT/" || failed=1 ;; esac
exit $failed
