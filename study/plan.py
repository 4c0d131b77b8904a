"""What a study will cost before it starts: ``python -m study.run --space full --plan``.

``estimate(space, ...)`` lists the structures the space can draw (dataset, resolution, depth,
sampling, output, widths, batch size: what fixes a trial's cost), times a few training steps and an
evaluation of the smallest and the largest of them on this device (about 30 s at most, with the
study's own step and evaluation: study.engine.trial.PackStep, study.engine.evaluation), and models
the study from there: each structure's per-image cost on a line through the two timed ones by its
multiply-adds, epochs and images from the space and the datasets' split sizes, the pruner's savings
(an assumption, stated in the plan), how many trials or packs run at once (``max_concurrent`` and
what the cluster holds), and the fixed costs of a Ray study measured on this project's runs. It
writes nothing and starts no Ray. ``format_plan(plan)`` is the text ``--plan`` prints.

``python -m study.plan --space smoke`` prints the plan of a local study on this machine.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field, replace

from study import cli
from study.engine import Structure, Timing, local_gpus, on_line, scaled, time_structure, within   # torch-free

# The axes that fix a trial's cost (and a pack's shared structure), besides the dataset.
AXES = ("resolution", "depth", "sampling", "output", "base_filters", "max_filters", "batch_size")
# (train, val, test) images of each known dataset as study.engine.data makes them: CIFAR-10's 50,000 training
# photos less a seeded 20% for val, and its 10,000 test photos; Flowers-102's own three splits; the
# bundled sample photos' crops (study.engine.data.SAMPLE_COUNTS). Grayscale photos left out (~1.5% of CIFAR-10)
# are not subtracted. An image folder given as a dataset (or under data_root) is counted instead.
SPLIT_SIZES = {"cifar10": (40_000, 10_000, 10_000), "flowers102": (1_020, 1_020, 6_149),
               "samples": (1_024, 256, 256)}
# Fixed costs of a Ray study besides training and evaluation: a quiet machine's, since the calibration's own
# timings already carry a busy machine's slowness (docs/plan.md has how they were measured).
STARTUP_S = 15.0        # the driver: imports, checks, Ray's start, Tune's first scheduling
WORKER_START_S = 5.0    # the first trial of each slot: a worker process, torch, the data from the cache
TRIAL_GAP_S = 1.5       # each further trial on a reused worker: Optuna's ask and tell, results, setup
EPOCH_OVERHEAD_S = 0.3  # each epoch besides its steps and evaluation: rows, checkpoint, previews
SHUTDOWN_S = 5.0        # Ray's shutdown and the final table
CALIBRATION_S = 20.0    # what the timed steps may take in all (after a first model pays torch's first use)
# The median (percentile) pruner's assumed effect: after its startup trials, this share is stopped at its warm-up.
PRUNED_SHARE = 0.5
TOO_LONG_S = 24 * 3600
CENTURY_S = 100 * 365.25 * 86400
# Multiply-adds per second no real step reaches: a study's time from them is a bound safe to refuse a run on.
PEAK_MACS_PER_S = {"cpu": 2e11, "gpu": 2e15}   # twice an AVX-512 core's fp32 FMAs at 3 GHz, an H100's bf16
MAX_STRUCTURES = 20_000  # a larger grid is sampled (seeded): the mean cost is what matters


@dataclass
class Plan:
    space: str
    num_samples: int
    pack: int
    units: int                    # Tune trials: packs of `pack` (or single trials)
    concurrent: int
    limited_by: str
    resources: dict               # per unit
    device: str                   # what was timed
    threads: int
    datasets: dict                # dataset -> {axis: values, structures, epochs, train, val, test, trials}
    structures: int
    timings: list[Timing]
    calibration_s: float
    pruning: str                  # the assumption used
    epoch_fraction: float         # expected epochs run / epochs allowed
    unit_s: dict                  # "min", "mean", "max": a unit's full-length seconds
    eval_share: float             # evaluation's share of an epoch (mean structure)
    compute_s: float              # all units' seconds
    wall_s: float
    device_hours: float
    device_unit: str
    budget_s: float | None = None
    units_in_budget: float | None = None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- the space's structures


def _values(space, name: str, dataset: str) -> list:
    """Every value ``name`` can take in trials of ``dataset`` (a continuous axis: its bounds)."""
    from study.space import CONFIG_FIELDS

    p = space.params.get(name)
    if p is None:
        return [CONFIG_FIELDS[name].default]
    dists = [p.cases[dataset]] if p.by == "dataset" and dataset in p.cases else list(p.cases.values())
    out = []
    for d in dists:
        out += d.possible() if d.kind in ("constant", "choice", "int") else [round(v) for v in d.values]
    return list(dict.fromkeys(out))


def _split_sizes(dataset: str, data_root: str | None) -> tuple[tuple[int, int, int], str]:
    from pathlib import Path

    candidates = ([Path(dataset)] if dataset not in SPLIT_SIZES else []) + ([Path(data_root) / dataset] if data_root else [])
    for folder in candidates:
        if folder.is_dir():
            from study.engine import folder_splits
            files = folder_splits(folder, seed=0)
            return (len(files["train"]), len(files["val"]), len(files["test"])), f"counted in {folder}"
    if dataset in SPLIT_SIZES:
        return SPLIT_SIZES[dataset], "its usual splits"
    from study.cli import UsageError
    raise UsageError(f"dataset {dataset!r}: no such folder to count its images in; give an existing image folder")


def structures(space, data_root: str | None = None) -> tuple[dict, dict[str, list[Structure]]]:
    """Per dataset: its facts (axes' values, epochs, split sizes) and the structures trials can have."""
    import random

    from study.config import DEFAULT_RESOLUTION, max_depth_for

    facts, grids = {}, {}
    for ds in space.possible("dataset"):
        values = {a: _values(space, a, ds) for a in AXES}
        values["resolution"] = [r or DEFAULT_RESOLUTION.get(ds, 64) for r in values["resolution"]]
        combos = [c for c in itertools.product(*(values[a] for a in AXES)) if c[1] <= max_depth_for(c[0])]
        if len(combos) > MAX_STRUCTURES:
            combos = random.Random(0).sample(combos, MAX_STRUCTURES)
        grids[ds] = [Structure(ds, *c) for c in combos]
        (train, val, test), source = _split_sizes(ds, data_root)
        limit = max(_values(space, "train_limit", ds), key=lambda v: v or math.inf)
        eval_limit = max(_values(space, "eval_limit", ds), key=lambda v: v or math.inf)
        facts[ds] = {**{a: values[a] for a in AXES}, "structures": len(grids[ds]),
                     "epochs": max(_values(space, "epochs", ds)),
                     "train": min(limit or train, train), "val": min(eval_limit or val, val),
                     "test": min(eval_limit or test, test), "sizes_from": source}
    return facts, grids


# ---------------------------------------------------------------- the model of a study


def _pruning(space, pack: int, least: bool = False):
    """(the assumption, ``share(i, epochs)``: the expected share of its epochs the i-th unit runs; ``least``:
    the least share it can run, every unit the pruner may stop stopped as early as it may)."""
    p = dict(space.pruner)
    name = "none" if len(space.objectives) > 1 else p.get("name", "none")
    unit = "packs" if pack > 1 else "trials"
    if name in ("median", "percentile"):
        startup = math.ceil(int(p.get("n_startup_trials", 5)) / pack)
        warm = max(int(p.get("n_warmup_steps", 0)), 1)   # epochs count from 1: epoch 1 is the first it may judge

        def share(i: int, epochs: int) -> float:
            pruned = i >= startup and (least or (i - startup) % round(1 / PRUNED_SHARE) == 0)
            return min(warm, epochs) / epochs if pruned else 1.0
        return (f"{name} pruner: the first {startup} {unit} run in full, then {PRUNED_SHARE:.0%} of them stop "
                f"at epoch {warm}, the first it may judge (an assumption)"), share
    if name in ("successive_halving", "hyperband"):
        eta = float(p.get("reduction_factor", 4 if name == "successive_halving" else 3))
        low = p.get("min_resource", 1)
        rung = (1.0 if low == "auto" else float(low)) * eta ** int(p.get("min_early_stopping_rate", 0))

        def share(i: int, epochs: int) -> float:
            run, at, survive = min(rung, epochs), rung, 0.0 if least else 1.0
            while at < epochs:   # each rung lets 1/eta of the trials go on to the next
                survive /= eta
                run += survive * (min(at * eta, epochs) - at)
                at *= eta
            return run / epochs
        return (f"{name.replace('_', ' ')}: every trial runs {rung:g} epoch(s), then 1/{eta:g} of them go on to each "
                f"next rung (x{eta:g} epochs)" + (", taken as one bracket" if name == "hyperband" else "")), share
    return "no pruning: every trial runs all its epochs", lambda i, epochs: 1.0


def _makespan(durations: list[float], slots: int) -> float:
    """Seconds until the last unit ends when ``slots`` run at once, each next unit on the first free slot;
    a slot's first unit pays for its worker's start."""
    free = [0.0] * max(slots, 1)
    started = [False] * len(free)
    for d in durations:
        i = min(range(len(free)), key=free.__getitem__)
        free[i] += d + (WORKER_START_S if not started[i] else TRIAL_GAP_S)
        started[i] = True
    return max(free)


def _concurrency(units: int, max_concurrent: int, resources: dict, cluster: dict) -> tuple[int, str]:
    cpus = float(cluster.get("CPU", cluster.get("cpu", os.cpu_count() or 1)))
    gpus = float(cluster.get("GPU", cluster.get("gpu", 0)))
    fits = {"max_concurrent": max_concurrent, "trials or packs to run": units}
    fits["CPUs"] = math.floor(cpus / resources.get("cpu", 1) + 1e-9) if resources.get("cpu", 1) > 0 else units
    if resources.get("gpu", 0) > 0:
        fits["GPUs"] = math.floor(gpus / resources["gpu"] + 1e-9)
    limit = min(fits, key=fits.get)
    return max(fits[limit], 0), limit


@dataclass(frozen=True)
class Request:
    """What a plan is asked: ``num_samples`` trials in packs of ``pack``, at most ``max_concurrent`` packs at
    once, each taking ``resources`` ({"cpu": n, "gpu": n}) of ``cluster_resources`` (Ray's {"CPU": n,
    "GPU": n}); timed on ``device`` (default: a GPU when trials get one and this machine has one, else the
    CPU, with the threads a trial gets) in about ``calibration_s``."""
    num_samples: int
    max_concurrent: int
    resources: dict
    pack: int
    cluster_resources: dict
    device: str | None = None
    data_root: str | None = None
    time_budget_s: float | None = None
    calibration_s: float = CALIBRATION_S

    @property
    def cpus(self) -> float:
        return float(self.cluster_resources.get("CPU", self.cluster_resources.get("cpu", os.cpu_count() or 1)))

    @property
    def gpus(self) -> float:
        return float(self.cluster_resources.get("GPU", self.cluster_resources.get("gpu", 0)))

    @property
    def on_gpu(self) -> bool:
        return self.resources.get("gpu", 0) > 0 and self.gpus > 0

    @property
    def threads(self) -> int:
        """A trial's CPU threads."""
        return max(min(int(self.resources.get("cpu", 1)), os.cpu_count() or 1), 1)


def estimate(space, request: Request | None = None, **fields) -> Plan:
    """The plan of a study of ``space`` for ``request`` (or Request's ``fields`` as keywords, over it): times
    the smallest and largest structures, models the rest. Writes nothing, starts no Ray."""
    from study.engine import device_name, pick_device   # torch: only a plan that times needs it
    r = replace(request, **fields) if request is not None else Request(**fields)
    start = time.perf_counter()
    facts, grids = structures(space, r.data_root)
    units = math.ceil(r.num_samples / r.pack)
    concurrent, limited_by = _concurrency(units, r.max_concurrent, r.resources, r.cluster_resources)
    device, notes, warnings = _timing_device(r)
    everything = [s for g in grids.values() for s in g]
    timed = _calibrate(everything, r, device)
    timings, measured = _measured(timed)
    notes += _timing_notes(timed) + measured
    # Units sharing a device slow each other: CPU threads past the cores, trials sharing a GPU its throughput.
    slowdown = (max(1.0, math.ceil(concurrent / r.gpus)) if r.on_gpu
                else max(1.0, concurrent * r.threads / max(r.cpus, 1)))
    per_ds, full = _epochs(facts, grids, timings, slowdown, r.num_samples)
    pruning, share = _pruning(space, r.pack)
    order = list(grids)   # the datasets taken in turn: drawn evenly
    whole = [facts[order[i % len(order)]]["epochs"] * per_ds[order[i % len(order)]] for i in range(units)]
    durations = [share(i, facts[order[i % len(order)]]["epochs"]) * w for i, w in enumerate(whole)]
    compute = sum(durations)
    wall = STARTUP_S + _makespan(durations, concurrent) + SHUTDOWN_S if concurrent else math.inf
    plan = Plan(space=space.name, num_samples=r.num_samples, pack=r.pack, units=units, concurrent=concurrent,
                limited_by=limited_by, resources=dict(r.resources), device=device_name(pick_device(device)),
                threads=r.threads, datasets=facts, structures=len(everything), timings=timings,
                calibration_s=time.perf_counter() - start, pruning=pruning,
                epoch_fraction=compute / max(sum(whole), 1e-12),
                unit_s={"min": min(full), "mean": sum(per_ds[ds] * facts[ds]["epochs"] for ds in order) / len(order),
                        "max": max(full)},
                eval_share=sum(f["eval_share"] for f in facts.values()) / len(facts), compute_s=compute,
                wall_s=wall, device_hours=compute * (r.resources.get("gpu", 0) if r.on_gpu else r.threads) / 3600,
                device_unit="GPU-hours" if r.on_gpu else "CPU-core-hours", budget_s=r.time_budget_s,
                notes=notes, warnings=warnings)
    if not concurrent:
        warnings.append(f"no trial fits: each takes {r.resources} and the cluster has {r.cluster_resources}; lower "
                        f"--cpus-per-trial / --gpus-per-trial or add nodes")
    if r.time_budget_s is not None and concurrent:
        plan.units_in_budget = min(units, _units_by(durations, concurrent, r.time_budget_s - STARTUP_S))
    if wall > CENTURY_S:   # a run is refused on a bound that times nothing (check_feasible), not on this
        warnings.append(f"as timed here this plan would not end within a century ({_duration(wall)})")
    if wall > TOO_LONG_S:
        warnings.append(f"this plan does not fit in a day ({_duration(wall)}). Give it --time-budget (e.g. 8h: the "
                        f"study stops there with checkpoints, and --resume --time-budget goes on), a smaller "
                        f"space (fewer trials with --num-samples, fewer epochs, smaller structures), or "
                        + ("more GPUs" if r.on_gpu else "a GPU"))
    return plan


def lower_bound_s(space, r: Request) -> float:
    """Seconds the study takes at the least, timing nothing: each unit trains the cheapest structure of its
    dataset (forward and backward: three forward passes) for the fewest epochs its pruner lets it run, at
    the peak rate of what it is given, as many at once as fit (evaluation and fixed costs left out)."""
    facts, grids = structures(space, r.data_root)
    units = math.ceil(r.num_samples / r.pack)
    concurrent, _ = _concurrency(units, r.max_concurrent, r.resources, r.cluster_resources)
    rate = PEAK_MACS_PER_S["gpu"] * min(r.resources["gpu"], 1) if r.on_gpu else PEAK_MACS_PER_S["cpu"] * r.threads
    share = _pruning(space, r.pack, least=True)[1]
    order = [(f["epochs"], 3 * min(s.macs() for s in grids[ds]) * f["train"] * r.pack) for ds, f in facts.items()]
    macs = sum(share(i, epochs) * epochs * epoch for i, (epochs, epoch) in
               ((i, order[i % len(order)]) for i in range(units)))
    return macs / (rate * concurrent) if concurrent else math.inf


def check_feasible(space, r: Request) -> None:
    """Refuse a study that could not end within a century here even at the peak rate (lower_bound_s)."""
    least = lower_bound_s(space, r)
    if CENTURY_S < least < math.inf:   # no trial that fits at all: study.run's capacity check says what to change
        raise cli.UsageError(
            f"this study cannot end within a century on this machine: even at a peak rate no step reaches it "
            f"would take {_duration(least)} ({r.num_samples} trials of space {space.name}); lower --num-samples, "
            f"its epochs or its structures, or give it GPUs (--plan estimates it; nothing was written)")


def _timing_device(r: Request) -> tuple[str, list[str], list[str]]:
    """(the device the structures are timed on, notes, warnings about it)."""
    import torch

    notes, warnings = [], []
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > cores:
        notes.append(f"this machine was busy while timing (load {load:.1f} on {cores} cores): the times are "
                     f"slower than on the machine alone, and a study's vary with the load")
    if r.resources.get("gpu", 0) > 0 and not r.gpus:
        notes.append(f"trials ask for {r.resources['gpu']:g} GPU each, and there is none: they run on CPUs")
    device = r.device or ("cuda" if r.on_gpu and torch.cuda.is_available() else "cpu")
    if r.on_gpu and not device.startswith("cuda"):
        warnings.append("trials run on GPUs, but this machine has none to time them on: the times below are "
                        "a CPU's, far above a GPU's; plan on a machine with the cluster's GPU")
    return device, notes, warnings


def _calibrate(everything: list[Structure], r: Request, device: str) -> list[Timing]:
    """The smallest structure timed, and the largest (smaller images when a step would not fit the rest of
    the calibration's time, scaled back by multiply-adds)."""
    small = min(everything, key=lambda s: (s.macs(), s.batch_size))
    large = max(everything, key=lambda s: (s.macs(), s.batch_size))
    # The first model built here pays the engine's imports and torch's first use (seconds on a busy machine):
    # outside the budget of the steps timed, or none of them would fit in it.
    time_structure(replace(small, batch_size=1), pack=1, device=device, threads=r.threads, budget_s=0.0)
    start = time.perf_counter()
    timings = [time_structure(small, pack=r.pack, device=device, threads=r.threads,
                              budget_s=r.calibration_s / (3 if large != small else 1.5))]
    if large != small:
        budget = max(r.calibration_s - (time.perf_counter() - start), 3.0)
        proxy = within(large, timings[0].train_s / small.macs(), budget)
        timings.append(scaled(time_structure(proxy, pack=r.pack, device=device, threads=r.threads, budget_s=budget),
                              large))
    return timings


def _measured(timings: list[Timing]) -> tuple[list[Timing], list[str]]:
    """A timing with no step of its batch timed has only its first two-image steps, set-up included (up to
    orders of magnitude over): a timed one scaled by multiply-adds (optimizer: weights) replaces it."""
    timed = [t for t in timings if t.steps > 0]
    out, notes = [], []
    for t in timings:
        if t.steps > 0:
            out.append(t)
        elif timed:
            src = min(timed, key=lambda u: abs(math.log(u.structure.macs() / t.structure.macs())))
            m, w = t.structure.macs() / src.structure.macs(), t.structure.weights() / src.structure.weights()
            out.append(replace(t, train_s=src.train_s * m, eval_s=src.eval_s * m, optimizer_s=src.optimizer_s * w,
                               timed_at=0))
            notes.append(f"{t.structure.label()}: no step of it fitted the time, so it is "
                         f"{src.structure.label()}'s timing scaled by multiply-adds")
        else:
            out.append(t)
            notes.append(f"{t.structure.label()}: no step of its batch fitted the time: its figures are its first "
                         f"two-image steps', set-up included (too high); plan on a quieter machine or a GPU")
    return out, notes


def _timing_notes(timings: list[Timing]) -> list[str]:
    return ([f"{t.structure.label()}: timed at {t.timed_at}px (a step would not fit the time), scaled by "
             f"multiply-adds" for t in timings if t.timed_at and t.steps]
            + [f"{t.structure.label()}: timed at batch {t.batch} (a full step would take too long), scaled by images"
               for t in timings if t.batch < t.structure.batch_size and t.steps])


def _epochs(facts: dict, grids: dict, timings: list[Timing], slowdown: float,
            num_samples: int) -> tuple[dict[str, float], list[float]]:
    """(each dataset's mean epoch seconds, each structure's full-length seconds); adds each dataset's
    trials and evaluation share to ``facts``."""
    lo, hi = timings[0], timings[-1]

    def epoch(s: Structure) -> tuple[float, float]:
        f, m, w = facts[s.dataset], s.macs(), s.weights()
        per_train = on_line(m, (lo.structure.macs(), lo.train_s), (hi.structure.macs(), hi.train_s))
        per_step = on_line(w, (lo.structure.weights(), lo.optimizer_s), (hi.structure.weights(), hi.optimizer_s))
        per_eval = on_line(m, (lo.structure.macs(), lo.eval_s), (hi.structure.macs(), hi.eval_s))
        steps = max(f["train"] // s.batch_size, 1)
        return steps * (per_step + min(s.batch_size, f["train"]) * per_train), (f["val"] + f["test"]) * per_eval

    per_ds, full = {}, []
    for ds, grid in grids.items():
        parts = [epoch(s) for s in grid]
        train = sum(p[0] for p in parts) / len(parts)
        ev = sum(p[1] for p in parts) / len(parts)
        per_ds[ds] = (train + ev + EPOCH_OVERHEAD_S) * slowdown
        full += [(sum(p) + EPOCH_OVERHEAD_S) * slowdown * facts[ds]["epochs"] for p in parts]
        facts[ds]["trials"] = num_samples / len(grids)
        facts[ds]["eval_share"] = ev / max(train + ev, 1e-12)
    return per_ds, full


def _units_by(durations: list[float], slots: int, seconds: float) -> float:
    """How many units end within ``seconds`` of the first one's start."""
    free, done = [0.0] * slots, 0
    for i, d in enumerate(durations):
        k = min(range(slots), key=free.__getitem__)
        free[k] += d + (WORKER_START_S if i < slots else TRIAL_GAP_S)
        done += free[k] <= seconds
    return done


# ---------------------------------------------------------------- text


def _duration(s: float) -> str:
    if not math.isfinite(s):
        return "never"
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 3 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days" if s < 730 * 86400 else f"{s / 86400 / 365.25:,.0f} years"


def _ms(seconds: float) -> str:
    """Milliseconds with three significant digits, never rounded to 0 nor in exponent form."""
    ms = seconds * 1e3
    return f"{ms:,.0f} ms" if ms >= 100 or ms <= 0 else f"{ms:.{2 - math.floor(math.log10(ms))}f} ms"


def _values_text(v: list) -> str:
    return str(v[0]) if len(v) == 1 else "{" + ", ".join(map(str, v)) + "}"


def format_plan(plan: Plan) -> str:
    """The plan as ``--plan`` prints it: what runs, what was timed, the assumptions, the estimate, warnings."""
    unit = "pack" if plan.pack > 1 else "trial"
    res = ", ".join(f"{v:g} {k.upper()}" for k, v in plan.resources.items() if v)
    packs = f" in {plan.units} packs of {plan.pack} (a pack's members share a structure)" if plan.pack > 1 else ""
    lines = [f"plan of study space {plan.space}: {plan.num_samples} trials{packs}",
             f"  each {unit} takes {res or 'nothing'}; {plan.concurrent} at once (limited by {plan.limited_by})",
             (f"  structures: {plan.structures}, drawn evenly (dataset x resolution x depth x sampling x output x "
              f"width x batch)")]
    for ds, f in plan.datasets.items():
        axes = "  ".join(f"{a} {_values_text(f[a])}" for a in ("resolution", "depth", "sampling", "output",
                                                                 "base_filters", "batch_size"))
        lines.append(f"    {ds}: ~{f['trials']:.0f} trials; {f['structures']} structure(s): {axes}")
        lines.append(f"      {f['epochs']} epochs of {f['train']:,} training images; {f['val']:,} val + "
                     f"{f['test']:,} test images evaluated each epoch ({f['sizes_from']})")
    threads = f", {plan.threads} thread(s) as a trial gets" if plan.device == "cpu" else ""
    lines.append(f"  timed on {plan.device}{threads} in {plan.calibration_s:.0f} s (the study's own step and "
                 f"evaluation, random images):")
    for t in plan.timings:
        optimizer = f"{_ms(t.optimizer_s)} per optimizer step" if t.optimizer_s else "optimizer step not timed apart"
        step = (f"{optimizer} (batch {t.batch}, {t.steps} step(s) timed)" if t.steps
                else "no step timed at its batch (see the notes)")
        lines.append(f"    {t.structure.label()}: {_ms(t.train_s)} per training image, {step}, "
                     f"{_ms(t.eval_s)} per evaluated image")
    span = f"{_duration(plan.unit_s['min'])} to {_duration(plan.unit_s['max'])}"
    fixed = (f"{STARTUP_S:.0f} s to start, {WORKER_START_S:.0f} s for each worker's first {unit}, {TRIAL_GAP_S:g} s "
             f"between {unit}s, {EPOCH_OVERHEAD_S:g} s per epoch, {SHUTDOWN_S:.0f} s to end")
    between = ("other structures: on the line between those two by multiply-adds per image (the optimizer's "
               "step: by weights)" if len(plan.timings) > 1 else "the one structure as timed")
    lines += [(f"  {between}; evaluation "
               f"(val + test, measured) is {plan.eval_share:.0%} of an epoch"),
              f"  one {unit} in full: {span}, {_duration(plan.unit_s['mean'])} on average",
              f"  pruning: {plan.pruning}; {plan.epoch_fraction:.0%} of all epochs expected to run",
              f"  fixed costs: {fixed}",
              f"estimate: {_duration(plan.wall_s)} wall time, {plan.device_hours:,.2f} {plan.device_unit}"]
    if plan.budget_s is not None and plan.units_in_budget is not None:
        done = (f"all {plan.units} {unit}s finish" if plan.units_in_budget >= plan.units else
                f"about {plan.units_in_budget:.0f} of {plan.units} {unit}s finish; --resume goes on with the rest")
        lines.append(f"  within the time budget of {_duration(plan.budget_s)}: {done}")
    lines += [f"note: {n}" for n in plan.notes] + [f"warning: {w}" for w in plan.warnings]
    return "\n".join(lines)


# ---------------------------------------------------------------- command line


def local_resources(num_cpus: int | None = None, num_gpus: int | None = None) -> dict:
    """What a local Ray of ``study.run --num-cpus/--num-gpus`` would advertise, in Ray's names."""
    return {"CPU": num_cpus or os.cpu_count() or 1, "GPU": local_gpus() if num_gpus is None else num_gpus}


def parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m study.plan", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--space", default="full", help="space name in search_spaces/ or a path to a .yaml file")
    p.add_argument("--num-samples", type=int, help="trials (default: the space's)")
    p.add_argument("--max-concurrent", type=int, help="trials or packs at once (default: the space's)")
    p.add_argument("--pack", type=int, help="trials per pack (default: the space's)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: this machine's)")
    p.add_argument("--num-gpus", type=int, help="GPUs of the local Ray (default: this machine's)")
    p.add_argument("--data-root", help="folder holding <dataset>/<split>/...: its images are counted")
    p.add_argument("--device", help="time on this device (default: a GPU when trials get one)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    cli.add_debug(p)
    return p


def _main(argv: list[str]) -> int:
    from study.space import load_space

    args = parser().parse_args(argv)
    for name in [n for n in ("num_samples", "max_concurrent", "pack", "num_cpus")
                 if getattr(args, n) is not None and getattr(args, n) < 1]:
        raise cli.UsageError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    space, cluster = load_space(args.space), local_resources(args.num_cpus, args.num_gpus)
    # as study.run does: trials ask for a GPU only where there is one
    resources = {**space.resources, "gpu": space.resources.get("gpu", 0) if cluster["GPU"] else 0}
    plan = estimate(space, num_samples=args.num_samples or space.num_samples,
                    max_concurrent=args.max_concurrent or space.max_concurrent, resources=resources,
                    pack=args.pack or space.pack_for(gpu=resources.get("gpu", 0) > 0), cluster_resources=cluster,
                    device=args.device, data_root=args.data_root or os.environ.get("COLORIZE_DATA_ROOT"))
    print(json.dumps(dataclasses.asdict(plan), indent=1, default=str) if args.json else format_plan(plan))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(_main))
