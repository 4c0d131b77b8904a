#!/usr/bin/env bash
# The GPU figures of issue 9 in two commands on the lent GPU machine (see ../shared/GPU.md).
# Prepare here first (project root):   bash ../shared/tools/gpu-pack.sh
# Then, through the device tool, each with timeout_s 540, the second sent right after the first returns
# (the machine keeps /tmp/x only while it stays in use):
#   1. carry [".carry/site.tar.xz", ".carry/cifar10.tar.xz"]:   bash scripts/gpu_check.sh cifar
#      the CUDA-only tests (no host sync in a trial's or a pack's step), study.bench on CIFAR-10 with
#      every variant (trials fp32/bf16 at b64 and b512, packs of 4, 8, 16 and 32, torch.compile rows)
#      and a timed `study.run --space report` of the 4 CIFAR-10 cells.
#   2. carry [".carry/flowers102.tar.xz"]:                       bash scripts/gpu_check.sh flowers
#      the bench's Flowers-102 rows and a timed `study.run --space report` of all 8 cells.
# Each part prints the figures the issue's targets need, with the GPU's name, and leaves JSON (and the
# results tables, not checkpoints) under $OUT. Every step has its own timeout: part 1 ends within about
# 7.5 minutes, part 2 within about 5.5, so both and the machine's start fit the 15 minutes of device time.
# `bash scripts/gpu_check.sh mps` (a third command, after part 2, when device time allows) reruns part 2's
# study under an NVIDIA MPS daemon of its own and prints MPS against time-slicing.
# `bash scripts/gpu_check.sh quality` (issue 13; a later command or session: it needs most of the device
# time) runs the `full` space for GPU_CHECK_QUALITY_S seconds (default 420), then `analysis`, and prints the
# best test gain over grayscale per dataset and the most colourful front member against the goals. After
# parts 1 and 2 on a warm machine it reuses their unpacked files; alone, carry all three .carry archives.
# `bash scripts/gpu_check.sh figures` prints the figures again from $OUT.
# Environment: GPU_CHECK_STEPS (bench steps per row, default 100), GPU_CHECK_COMPILE (torch.compile mode
# of the bench's compiled rows, default "default"; empty: none).
set -uo pipefail
part=${1:?usage: bash scripts/gpu_check.sh cifar|flowers|mps|quality|figures}
X=/tmp/x
OUT=${OUT:-$X/out}
mkdir -p "$OUT" "$X/site" "$X/data" "$X/cache"
export PYTHONPATH=$X/site PYTHONUNBUFFERED=1 COLORIZE_CACHE_DIR=$X/cache
steps=${GPU_CHECK_STEPS:-100}
compile=${GPU_CHECK_COMPILE-default}
log() { echo "[$(date -u +%T)] $*"; }

[ "$part" = figures ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
  | tee "$OUT/gpu.txt"

# A timed study of the report space, or of its cells of some datasets; writes $OUT/<name>.json.
timed_report() {  # name datasets(comma-separated) max-concurrent gpus-per-trial limit-seconds
  local name=$1 datasets=$2 conc=$3 gpus=$4 limit=$5 space=$X/$1.yaml n
  # The space file with only these datasets (a `by: dataset` case list must match the dataset choice).
  n=$(python3 - "$datasets" "$space" <<'PY'
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
  rm -rf "$X/studies/$name"
  log "study $name: $n cells, $conc at once, $gpus GPU each"
  local t0 t1 rc
  t0=$(date +%s.%N)
  timeout "$limit" python3 -m study.run --space "$space" --name "$name" --num-samples "$n" \
    --max-concurrent "$conc" --gpus-per-trial "$gpus" --num-cpus 16 --num-gpus 1 \
    --data-root "$X/data" --storage "$X/studies" --cache-dir "$X/cache" > "$X/$name.log" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  tail -n 3000 "$X/$name.log" > "$OUT/$name.log"  # what comes back is size-limited
  tail -n 5 "$X/$name.log"
  python3 - "$name" "$t0" "$t1" "$rc" "$X/studies/$name/results/trials.parquet" "$OUT/$name.json" <<'PY'
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
  # The tables without the preview PNGs (Flowers previews alone are hundreds of MB).
  tar -C "$X/studies/$name" --exclude='previews*' -cJf "$OUT/$name-results.tar.xz" results 2>/dev/null || true
}

targets() {  # prints the issue's targets from whatever JSON this part has written
  python3 - "$OUT" <<'PY'
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
        lines.append(f"{what}: {s['wall_s']:.0f} s wall, rc {s['rc']}, statuses {s.get('status')}"
                     + (f" (target <= 180 s: {'met' if ok and s['wall_s'] <= 180 else 'NOT met'})"
                        if name == "report_all" else ""))
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

case $part in
  cifar)
    log "unpacking site and CIFAR-10"
    tar -C "$X/site" -xJf .carry/site.tar.xz && tar -C "$X/data" -xJf .carry/cifar10.tar.xz || exit 3
    python3 -c "import ray, optuna, torch; print('ray', ray.__version__, 'optuna', optuna.__version__, 'torch', torch.__version__)" \
      || exit 3
    log "CUDA-only tests: no host sync in a trial's or a pack's steps"
    timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_engine_step.py tests/test_pack.py -k cuda \
      2>&1 | tail -n 15 | tee "$OUT/cuda_tests.txt"
    log "bench (CIFAR-10 rows)"
    timeout 200 python3 -m study.bench --data-root "$X/data" --cache-dir "$X/cache" --steps "$steps" \
      --workers 2 --parts reference,trial,pack ${compile:+--compile "$compile"} --json "$OUT/bench_cifar.json" \
      2>&1 | tee "$OUT/bench_cifar.txt"
    timed_report report_cifar cifar10 4 0.25 150
    ;;
  flowers)
    test -d "$X/site/ray" || { echo "part 1 (cifar) must run first, on the same warm machine" >&2; exit 3; }
    log "unpacking Flowers-102"
    tar -C "$X/data" -xJf .carry/flowers102.tar.xz || exit 3
    log "bench (Flowers-102 rows)"
    timeout 60 python3 -m study.bench --data-root "$X/data" --cache-dir "$X/cache" --steps "$((steps / 2))" \
      --parts flowers --precisions fp32,bf16 --json "$OUT/bench_flowers.json" 2>&1 | tee "$OUT/bench_flowers.txt"
    timed_report report_all cifar10,flowers102 8 0.125 240
    ;;
  mps)
    # NVIDIA MPS against plain time-slicing for the report's 8 concurrent trials (issue 9 item 4): the same
    # study as part 2 with an MPS daemon of our own (private pipe and log folders, no change to the GPU's
    # settings), stopped afterwards. Run it after part 2 on the same warm machine when device time allows.
    test -d "$X/data/flowers102" || { echo "part 2 (flowers) must run first, on the same warm machine" >&2; exit 3; }
    export CUDA_MPS_PIPE_DIRECTORY=$X/mps-pipe CUDA_MPS_LOG_DIRECTORY=$X/mps-log
    mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
    nvidia-cuda-mps-control -d || { echo "cannot start an MPS daemon here" >&2; exit 3; }
    log "MPS daemon started"
    timed_report report_all_mps cifar10,flowers102 8 0.125 240
    echo quit | nvidia-cuda-mps-control
    log "MPS daemon stopped"
    python3 - "$OUT" <<'PY'
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
    for pair in site:site cifar10:data flowers102:data; do
      name=${pair%%:*} into=$X/${pair##*:}
      if [ ! -d "$into/$name" ] && [ "$name" != site -o ! -d "$X/site/ray" ]; then
        test -f ".carry/$name.tar.xz" || { echo "quality: no $name (run parts 1 and 2 first, or carry .carry/$name.tar.xz)" >&2; exit 3; }
        log "unpacking $name"
        tar -C "$into" -xJf ".carry/$name.tar.xz" || exit 3
      fi
    done
    rm -rf "$X/studies/quality"
    qs=${GPU_CHECK_QUALITY_S:-420}
    log "study quality: the full space for $qs s"
    t0=$(date +%s.%N)
    timeout "$qs" python3 -m study.run --space full --name quality --num-cpus 16 --num-gpus 1 \
      --data-root "$X/data" --storage "$X/studies" --cache-dir "$X/cache" > "$X/quality.log" 2>&1
    rc=$?
    t1=$(date +%s.%N)
    tail -n 3000 "$X/quality.log" > "$OUT/quality.log"
    timeout 120 python3 -m analysis --study "$X/studies/quality" --out "$X/quality_report" > "$OUT/quality_analysis.log" 2>&1
    tar -C "$X" -cJf "$OUT/quality_report.tar.xz" quality_report 2>/dev/null || true
    python3 - "$X/studies/quality/results/trials.parquet" "$OUT/quality.json" "$t0" "$t1" "$rc" <<'PY'
import json, sys
import pandas as pd
from study.contract import FINISHED, gain
trials, out, t0, t1, rc = sys.argv[1:]
df = pd.read_parquet(trials)
df = df[df["status"].isin(FINISHED)].assign(test_gain=lambda d: gain(d, "test"))
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
  *) echo "unknown part $part (cifar, flowers, mps, quality, figures)" >&2; exit 2 ;;
esac
log "figures"
targets
