#!/usr/bin/env bash
# Measures this project's training speed and quality on one CUDA GPU and prints them against the
# project's targets (docs/measurements.md says where each figure of the docs came from).
#
#   bash scripts/gpu_check.sh [--data-root DIR] [--out DIR] PART [PART ...]
#
# Parts (run in the order given; each prints its figures, with the GPU's name, and writes JSON):
#   cifar    the CUDA-only tests (no host synchronisation in a trial's or a pack's training step),
#            `study.bench` on CIFAR-10 (one trial fp32/bf16 at batch 64 and 512 against the notebooks'
#            pipeline, fused packs of 4, 8, 16 and 32, torch.compile rows), and a timed
#            `study.run --space report` of its 4 CIFAR-10 cells.                      At most ~8 min.
#   flowers  the bench's Flowers-102 rows (depth-4 UNet at 256x256, trial and pack) and a timed
#            `study.run --space report` of all 8 cells (target: 180 s).               At most ~5 min.
#   mps      part flowers' study again under an NVIDIA MPS daemon of the script's own (private pipe
#            and log folders; the GPU's settings are not changed), against plain time-slicing. Run
#            it after `flowers`.                                                     At most ~4 min.
#   quality  the `full` space with a time budget of GPU_CHECK_QUALITY_S seconds (default 420; trials
#            the budget stops are STOPPED and count with their epochs so far), then `python -m
#            analysis`; prints the best test gain over grayscale per dataset and the most colourful
#            trial that still beats grayscale, against the goals.                    About 9 min.
#   figures  print the figures again from the --out folder.
# Every step has a time limit (so each part ends within the time above); a step that reaches it is
# reported as timed out, which on a slower GPU is itself the answer.
#
# Needs: a CUDA GPU with its driver (`nvidia-smi`); this project installed in the active Python
# (`pip install -c constraints.txt -e '.[test]'`, run from the project's folder: the cifar part
# runs tests/); the data root: a folder with cifar10/ and flowers102/ in the layout
# <split>/<class>/*.jpg, given with --data-root or $COLORIZE_DATA_ROOT (cifar needs cifar10/,
# the others both).
# Writes into --out (default studies/gpu-check/ in the project's folder): the figures (targets.txt, *.json, *.txt), the logs, the
# studies (studies/) and the report of `quality` (quality_report/); decoded images are cached in
# $COLORIZE_CACHE_DIR, else <out>/cache.
# Environment: GPU_CHECK_STEPS (bench steps per row, default 100), GPU_CHECK_COMPILE (torch.compile
# mode of the bench's compiled rows, default "default"; empty: none), GPU_CHECK_QUALITY_S.
set -uo pipefail

usage="usage: bash scripts/gpu_check.sh [--data-root DIR] [--out DIR] cifar|flowers|mps|quality|figures ..."
data=${COLORIZE_DATA_ROOT:-}
out=
parts=()
while [ $# -gt 0 ]; do
  case $1 in
    --data-root) data=${2:?--data-root needs a folder}; shift 2 ;;
    --data-root=*) data=${1#*=}; shift ;;
    --out) out=${2:?--out needs a folder}; shift 2 ;;
    --out=*) out=${1#*=}; shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    cifar|flowers|mps|quality|figures) parts+=("$1"); shift ;;
    *) echo "error: unknown argument $1 ($usage)" >&2; exit 2 ;;
  esac
done
[ ${#parts[@]} -gt 0 ] || { echo "error: no part given ($usage)" >&2; exit 2; }
here=$PWD
absolute() { case $1 in /*) echo "$1" ;; *) echo "$here/$1" ;; esac; }
[ -n "$data" ] && data=$(absolute "$data")
[ -n "$out" ] && out=$(absolute "$out")
cd "$(dirname "$0")/.." || exit 2   # the project's folder: tests/ and search_spaces/ are read from it
OUT=${out:-$PWD/studies/gpu-check}
PY=${PYTHON:-python}
steps=${GPU_CHECK_STEPS:-100}
compile=${GPU_CHECK_COMPILE-default}
log() { echo "[$(date -u +%T)] $*"; }

# Everything a part needs, checked before it starts: one error line and exit 2 otherwise.
need() {  # part: the datasets it reads
  local part=$1 ds
  [ "$part" = figures ] && return 0
  command -v nvidia-smi > /dev/null || { echo "error: $part needs an NVIDIA GPU and its driver (no nvidia-smi)" >&2; exit 2; }
  "$PY" -c "import study, torch; assert torch.cuda.is_available()" 2> /dev/null \
    || { echo "error: $part needs this project installed with a CUDA build of torch in the active Python ($PY); see README.md" >&2; exit 2; }
  for ds in $( [ "$part" = cifar ] && echo cifar10 || echo cifar10 flowers102 ); do
    [ -n "$data" ] && [ -d "$data/$ds" ] || {
      echo "error: $part needs the data root's $ds/ (<split>/<class>/*.jpg); give --data-root DIR or set COLORIZE_DATA_ROOT${data:+ (got $data)}" >&2
      exit 2; }
  done
}
for part in "${parts[@]}"; do need "$part"; done
mkdir -p "$OUT" || { echo "error: cannot create --out $OUT" >&2; exit 2; }
export PYTHONUNBUFFERED=1 COLORIZE_CACHE_DIR=${COLORIZE_CACHE_DIR:-$OUT/cache}

gpu_name() {
  [ -s "$OUT/gpu.txt" ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt"
  cat "$OUT/gpu.txt"
}

# Cores per trial when `conc` trials run at once: the space's 2, fewer on a smaller machine.
cpus_per_trial() { awk -v n="$(nproc)" -v c="$1" 'BEGIN { x = n / c; if (x > 2) x = 2; if (x < 0.5) x = 0.5; print x }'; }

# A timed study of the report space, or of its cells of some datasets; writes $OUT/<name>.json.
timed_report() {  # name datasets(comma-separated) max-concurrent gpus-per-trial limit-seconds
  local name=$1 datasets=$2 conc=$3 gpus=$4 limit=$5 space=$OUT/$1.yaml n
  # The space file with only these datasets (a `by: dataset` case list must match the dataset choice).
  n=$("$PY" - "$datasets" "$space" <<'PY'
import sys, yaml
keep, out = sys.argv[1].split(","), sys.argv[2]
space = yaml.safe_load(open("search_spaces/report.yaml"))
params = space["params"]
params["dataset"] = {"choice": keep}
for k, v in list(params.items()):
    if isinstance(v, dict) and v.get("by") == "dataset":
        v["cases"] = {d: v["cases"][d] for d in keep}
        if len(keep) == 1:
            params[k] = v["cases"][keep[0]]
space["num_samples"] = 4 * len(keep)  # sampling x output per dataset
yaml.safe_dump(space, open(out, "w"), sort_keys=False)
print(space["num_samples"])
PY
) || { log "cannot write the space file for $datasets"; return 1; }
  rm -rf "$OUT/studies/$name"
  log "study $name: $n cells, $conc at once, $gpus GPU each (limit $limit s)"
  local t0 t1 rc
  t0=$(date +%s.%N)
  timeout "$limit" "$PY" -m study.run --space "$space" --name "$name" --num-samples "$n" \
    --max-concurrent "$conc" --gpus-per-trial "$gpus" --cpus-per-trial "$(cpus_per_trial "$conc")" \
    --num-gpus 1 --data-root "$data" --storage "$OUT/studies" > "$OUT/$name.log" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  tail -n 5 "$OUT/$name.log"
  "$PY" - "$name" "$t0" "$t1" "$rc" "$OUT/studies/$name/results/trials.parquet" "$OUT/$name.json" <<'PY'
import json, sys
name, t0, t1, rc, trials, out = sys.argv[1:]
fig = {"study": name, "wall_s": round(float(t1) - float(t0), 1), "rc": int(rc), "timed_out": int(rc) == 124}
try:
    import pandas as pd
    df = pd.read_parquet(trials)
    fig["trials"] = len(df)
    fig["status"] = df["status"].value_counts().to_dict()
    cols = [c for c in ("dataset", "sampling", "output", "status", "epochs_run", "best_val_psnr", "best_test_psnr",
                        "test_gray_psnr", "wall_time_s", "pack_id", "pack_size") if c in df]
    fig["cells"] = df[cols].to_dict("records")
except Exception as e:  # a study that did not finish still reports its wall time
    fig["results_error"] = str(e)
json.dump(fig, open(out, "w"), indent=2, default=str)
print(json.dumps({k: v for k, v in fig.items() if k != "cells"}, default=str))
PY
}

targets() {  # prints the targets from whatever JSON the parts have written
  "$PY" - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
def load(name):
    p = out / name
    return json.loads(p.read_text()) if p.exists() else {}
b = {**load("bench_cifar.json"), **{k: v for k, v in load("bench_flowers.json").items() if k.startswith("flowers")}}
gpu = (out / "gpu.txt").read_text().strip() if (out / "gpu.txt").exists() else b.get("device", "?")
ref = b.get("reference_b64_img_s")
def best(prefix, suffix):
    vals = [v for k, v in b.items() if k.startswith(prefix) and k.endswith(suffix) and isinstance(v, (int, float))]
    return max(vals) if vals else None
lines = [f"GPU: {gpu}; torch {b.get('torch', '?')}"]
if ref:
    lines.append(f"reference pipeline b64: {ref:,.0f} img/s")
    for batch, want in ((64, 3), (512, 15)):
        r = best("trial_", f"_b{batch}_img_s")
        if r:
            lines.append(f"one CIFAR-10 trial b{batch}: {r:,.0f} img/s = x{r / ref:.2f} the reference "
                         f"(target >= x{want}: {'met' if r / ref >= want else 'NOT met'})")
p16 = best("pack16_", "_b64_model_img_s")
if p16:
    lines.append(f"pack of 16 depth-3 UNets b64: {p16:,.0f} model-img/s (target >= 200,000: "
                 f"{'met' if p16 >= 200000 else 'NOT met'})")
for k in (4, 8, 32):
    v = best(f"pack{k}_", "_b64_model_img_s")
    if v:
        lines.append(f"pack of {k}: {v:,.0f} model-img/s")
fl = best("flowers_trial_", "_b64_img_s")
if fl:
    lines.append(f"one Flowers-102 depth-4 trial b64: {fl:,.0f} img/s (target >= 5,000: {'met' if fl >= 5000 else 'NOT met'})")
flp = best("flowers_pack", "_model_img_s")
if flp:
    lines.append(f"Flowers-102 pack: {flp:,.0f} model-img/s")
for name, what in (("report_cifar", "report space, 4 CIFAR-10 cells"), ("report_all", "report space, all 8 cells")):
    s = load(f"{name}.json")
    if s:
        ok = s["rc"] == 0 and s.get("trials") == (4 if "cifar" in name else 8)
        lines.append(f"{what}: {s['wall_s']:.0f} s wall, rc {s['rc']}{' (timed out)' if s.get('timed_out') else ''}, "
                     f"statuses {s.get('status')}"
                     + (f" (target <= 180 s: {'met' if ok and s['wall_s'] <= 180 else 'NOT met'})"
                        if name == "report_all" else ""))
if (out / "mps.txt").exists():
    lines.append((out / "mps.txt").read_text().strip())
q = load("quality.json")
for ds, r in q.get("datasets", {}).items():
    goal = {"cifar10": 1.5, "flowers102": 4.0}.get(ds)
    lines.append(f"quality {ds}: {r['trials']} trials in {q['wall_s']:.0f} s; best test gain {r['best_test_gain']:+.2f} dB"
                 + (f" (goal >= +{goal}: {'met' if r['best_test_gain'] >= goal else 'NOT met'})" if goal else "")
                 + f"; most colourful trial above grayscale: ratio {r['max_colourfulness_above_gray']:.2f} "
                 f"(goal >= 0.8: {'met' if r['max_colourfulness_above_gray'] >= 0.8 else 'NOT met'})")
print("\n".join(lines))
(out / "targets.txt").write_text("\n".join(lines) + "\n")
PY
}

for part in "${parts[@]}"; do
  [ "$part" = figures ] || log "$part on $(gpu_name)"
  case $part in
    cifar)
      "$PY" -c "import ray, optuna, torch; print('ray', ray.__version__, 'optuna', optuna.__version__, 'torch', torch.__version__)"
      if "$PY" -c "import pytest" 2> /dev/null; then
        log "CUDA-only tests: no host sync in a trial's or a pack's steps"
        timeout 90 "$PY" -m pytest -q -p no:cacheprovider tests/test_engine_step.py tests/test_pack.py -k cuda \
          2>&1 | tail -n 15 | tee "$OUT/cuda_tests.txt"
      else
        log "CUDA-only tests skipped: pytest is not installed (pip install -e '.[test]')"
      fi
      log "bench (CIFAR-10 rows)"
      timeout 200 "$PY" -m study.bench --data-root "$data" --cache-dir "$COLORIZE_CACHE_DIR" --steps "$steps" \
        --workers 2 --parts reference,trial,pack ${compile:+--compile "$compile"} --json "$OUT/bench_cifar.json" \
        2>&1 | tee "$OUT/bench_cifar.txt"
      timed_report report_cifar cifar10 4 0.25 150
      ;;
    flowers)
      log "bench (Flowers-102 rows)"
      timeout 60 "$PY" -m study.bench --data-root "$data" --cache-dir "$COLORIZE_CACHE_DIR" --steps "$((steps / 2))" \
        --parts flowers --precisions fp32,bf16 --json "$OUT/bench_flowers.json" 2>&1 | tee "$OUT/bench_flowers.txt"
      timed_report report_all cifar10,flowers102 8 0.125 240
      ;;
    mps)
      # NVIDIA MPS against plain time-slicing for the report's 8 concurrent trials: the same study as
      # part flowers, with an MPS daemon of this script's own, stopped afterwards.
      test -f "$OUT/report_all.json" || { echo "error: run part flowers first (mps compares with its study)" >&2; exit 2; }
      export CUDA_MPS_PIPE_DIRECTORY=$OUT/mps-pipe CUDA_MPS_LOG_DIRECTORY=$OUT/mps-log
      mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
      nvidia-cuda-mps-control -d || { echo "error: cannot start an MPS daemon here" >&2; exit 3; }
      log "MPS daemon started"
      timed_report report_all_mps cifar10,flowers102 8 0.125 240
      echo quit | nvidia-cuda-mps-control
      unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
      log "MPS daemon stopped"
      "$PY" - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
a, b = (json.loads((out / f).read_text()) for f in ("report_all.json", "report_all_mps.json"))
line = (f"report space, 8 cells: time-slicing {a['wall_s']:.0f} s, MPS {b['wall_s']:.0f} s "
        f"(x{a['wall_s'] / b['wall_s']:.2f}; MPS {'wins' if b['wall_s'] < a['wall_s'] else 'does not win'})")
print(line)
(out / "mps.txt").write_text(line + "\n")
PY
      ;;
    quality)
      rm -rf "$OUT/studies/quality" "$OUT/quality_report"
      qs=${GPU_CHECK_QUALITY_S:-420}
      log "study quality: the full space with a time budget of $qs s"
      t0=$(date +%s.%N)
      # the budget ends the study at an epoch's end; the outer limit only guards against a hang
      timeout "$((qs + 300))" "$PY" -m study.run --space full --name quality --time-budget "$qs" \
        --cpus-per-trial "$(cpus_per_trial 8)" --num-gpus 1 --data-root "$data" --storage "$OUT/studies" \
        > "$OUT/quality.log" 2>&1
      rc=$?
      t1=$(date +%s.%N)
      tail -n 5 "$OUT/quality.log"
      timeout 120 "$PY" -m analysis --study "$OUT/studies/quality" --out "$OUT/quality_report" \
        > "$OUT/quality_analysis.log" 2>&1
      "$PY" - "$OUT/studies/quality/results/trials.parquet" "$OUT/quality.json" "$t0" "$t1" "$rc" <<'PY'
import json, sys
import pandas as pd
from study.results.contract import FINISHED, gain
trials, out, t0, t1, rc = sys.argv[1:]
df = pd.read_parquet(trials)
# STOPPED: trials the time budget ended at an epoch's end; their metrics so far are real
df = df[df["status"].isin((*FINISHED, "STOPPED"))].assign(test_gain=lambda d: gain(d, "test"))
fig = {"wall_s": round(float(t1) - float(t0), 1), "rc": int(rc), "datasets": {}}
for ds, d in df.groupby("dataset"):
    above = d[d["test_gain"] > 0]
    fig["datasets"][ds] = {"trials": len(d), "best_test_gain": round(float(d["test_gain"].max()), 3),
                           "max_colourfulness_above_gray": round(float(above["best_test_colourfulness"].max()), 3)
                           if len(above) else 0.0}
json.dump(fig, open(out, "w"), indent=2)
print(json.dumps(fig))
PY
      ;;
    figures) ;;
  esac
done
log "figures (also in $OUT/targets.txt)"
targets
