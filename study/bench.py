"""Training throughput, everything side by side in one run, as text and JSON with the device's name.

``python -m study.bench [--data-root <data root>] [--steps N] [--packs 4,8,16,32] [--parts ...] [--json F]``

``python -m study.bench --parts driver --trials N --epochs E --concurrency C --storage DIR --json``: the
study driver's own cost per result beside bare Ray Tune (study.bench_driver), a benchmark of its own.

All rows train with Adam and MSE for the same number of timed steps:
- reference: the seed notebooks' pipeline: per-sample PIL decode of the JPEG files +
  ToTensor + RGB->YUV per sample, DataLoader batch 64, fp32, on the report's CIFAR-10
  UNet (depth 3, max-pool + upsample, UV output);
- trial: a plain single-model step outside the engine (images decoded once, resident on the
  device, converted per batch there; forward, MSE, Adam) on the same UNet at each ``--batches``
  size and ``--precisions``;
- pack K: the engine's step (``study.engine.trial.PackStep``) of K such UNets fused into one
  grouped-convolution model, each on its own batch of ``--pack-batch`` images; aggregate
  model-images/s. A pack of 1 is what ``run_trial`` runs (the engine's loop with one member):
  beside the trial row at the same batch size it shows what the engine costs a single trial;
- flowers: the report's Flowers-102 UNet (depth 4, 256x256): one trial and a pack;
- heads: the engine's step (a pack of 1, as run_trial) of the CIFAR-10 UNet with its UV head, with a
  classification head over the images' UV bins (``output: uv-classes``) and with a discriminator
  (``adversarial: 0.01``), side by side (round-robin with the trial and pack rows), and each one's
  cost per step as a ratio against the UV head's.
``--rounds N`` runs the trial and pack rows N times round-robin and keeps each row's median,
so that a load that comes and goes weighs on every row alike.
Ratios are against the reference measured in the same run. Beside each rate: the device
operations one step dispatches (view ops left out), a proxy for kernel launches that a CPU
can measure too (a small model on a GPU is bound by them), and the scalar reads (``.item()``;
host syncs when the tensor lives on a GPU).

Data: ``--data-root`` must hold ``cifar10/`` (and ``flowers102/`` for the flowers rows);
without any data root the bundled sample photos stand in, and the output says so.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, Dataset

from study.config import TrialConfig, UNetConfig
from study.engine import (
    LAYOUT_HELP,
    VARIANTS,
    DataError,
    DeviceImages,
    Member,
    PackStep,
    autocast_for,
    build_unet,
    compiled,
    default_cache_dir,
    default_data_root,
    device_name,
    folder_splits,
    load_splits,
    make_optimizer,
    pick_device,
    rgb_to_y,
    rgb_to_yuv,
    target_for,
    used_bins,
)

CIFAR_MODEL = VARIANTS["report-cifar10-simple-uv"]
FLOWERS_MODEL = VARIANTS["report-flowers102-simple-uv"]
PARTS = ("reference", "trial", "pack", "flowers", "heads")
PRECISIONS = ("fp32", "bf16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Defaults sized per device: a CPU takes seconds per pack step, a GPU milliseconds.
DEFAULTS = {
    "cuda": {"steps": 200, "packs": "4,8,16,32", "precisions": "fp32,bf16", "flowers_batch": 64,
             "flowers_pack": 4},
    "cpu": {"steps": 10, "packs": "2,4", "precisions": "fp32", "flowers_batch": 4, "flowers_pack": 2},
}


class NotebookDataset(Dataset):
    """The seed notebooks' style: decode, ToTensor and colour-convert one image at a time."""

    def __init__(self, files: list[Path]):
        self.files = files

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        # Imported here: torchvision's import costs seconds, and only this row uses it.
        from torchvision.transforms.functional import to_tensor

        rgb = to_tensor(Image.open(self.files[i]).convert("RGB"))
        yuv = rgb_to_yuv(rgb[None])[0]
        return yuv[:1], yuv[1:]


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


# Ops that only re-describe a tensor's memory: no kernel runs for them.
VIEW_OPS = frozenset({"view", "_unsafe_view", "as_strided", "slice", "select", "unsqueeze", "squeeze", "expand",
                      "permute", "t", "transpose", "detach", "alias", "unflatten", "flatten", "split", "chunk",
                      "narrow", "_reshape_alias", "reshape", "unbind", "split_with_sizes", "lift_fresh"})


class OpCount(TorchDispatchMode):
    """Counts the aten ops dispatched while active: ``ops`` (not views) and ``scalar_reads``."""

    def __init__(self):
        super().__init__()
        self.ops = self.scalar_reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name == "_local_scalar_dense":
            self.scalar_reads += 1
        elif name not in VIEW_OPS:
            self.ops += 1
        return func(*args, **(kwargs or {}))


@dataclass(frozen=True)
class Setting:
    """How a row's step runs and is timed: its device, ``steps`` timed after ``warmup`` untimed ones, its
    precision and torch.compile mode (None: eager)."""
    dev: torch.device
    steps: int
    warmup: int
    precision: str = "fp32"
    compile_mode: str | None = None


def _timed(batches, step, setting: Setting, counts: dict | None = None) -> float:
    """Seconds taken by ``setting.steps`` calls of ``step(batch)`` after ``setting.warmup`` untimed ones; with
    ``counts``, one more step runs under OpCount and its figures land there."""
    done, t0, seconds = 0, 0.0, None
    while True:
        for batch in batches():
            if seconds is not None:
                with OpCount() as c:
                    step(batch)
                counts.update(ops_per_step=c.ops, scalar_reads_per_step=c.scalar_reads)
                return seconds
            if done == setting.warmup:
                _sync(setting.dev)
                t0 = time.perf_counter()
            step(batch)
            done += 1
            if done == setting.warmup + setting.steps:
                _sync(setting.dev)
                seconds = time.perf_counter() - t0
                if counts is None:
                    return seconds


def bench_reference(files, setting: Setting, workers: int) -> float:
    dev = setting.dev
    torch.manual_seed(0)
    model = build_unet(CIFAR_MODEL, 32).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = DataLoader(NotebookDataset(files), batch_size=64, shuffle=True, num_workers=workers,
                        drop_last=True, persistent_workers=workers > 0)

    def step(batch):
        y, uv = (t.to(dev) for t in batch)
        loss = F.mse_loss(model(y), uv)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return setting.steps * 64 / _timed(lambda: loader, step, setting)


def _trial_config(model_cfg: UNetConfig, images: np.ndarray, batch: int, precision: str, **changes) -> TrialConfig:
    return TrialConfig(dataset="bench", resolution=images.shape[1], depth=model_cfg.depth,
                       sampling=model_cfg.sampling, output=model_cfg.output, base_filters=model_cfg.base_filters,
                       batch_size=batch, epochs=1, precision=precision, **changes)


def bench_trial(images: np.ndarray, model_cfg: UNetConfig, batch: int, setting: Setting,
                counts: dict | None = None) -> float:
    """A plain model's training step, outside the engine (one UNet, Adam, MSE in its output space, images
    resident on the device): the baseline the engine's pack of one is measured against. Images/s."""
    dev, cfg = setting.dev, _trial_config(model_cfg, images, batch, setting.precision)
    torch.manual_seed(0)
    model = build_unet(cfg.model, cfg.image_size).to(dev, memory_format=torch.channels_last)
    opt = make_optimizer(model.parameters(), cfg.lr, dev)
    data = DeviceImages(images, dev)
    gen = torch.Generator(device=dev).manual_seed(0)

    def forward_loss(x: torch.Tensor) -> torch.Tensor:
        with autocast_for(dev, setting.precision):
            pred = model(rgb_to_y(x))
        return F.mse_loss(pred.float(), target_for(x, cfg.output))

    loss_of = compiled(forward_loss, setting.compile_mode)

    def step(x):
        loss = loss_of(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return setting.steps * batch / _timed(lambda: data.train_batches(batch, gen), step, setting, counts)


def bench_pack(images: np.ndarray, model_cfg: UNetConfig, k: int, batch: int, setting: Setting,
               counts: dict | None = None, **changes) -> float:
    """K members, the engine's own step (study.engine.trial.PackStep; K=1 is run_trial's), each with its own
    lr, seed and batch: model-images/s. ``changes``: other trial settings (e.g. adversarial)."""
    data = DeviceImages(images, setting.dev)
    base = _trial_config(model_cfg, images, batch, setting.precision, **changes)
    bins = used_bins(data.images) if base.output == "uv-classes" else None   # as prepare_trial finds them
    members = [Member(i, base.replace(lr=1e-3 * (1 + i / k), seed=i), setting.dev, max(len(data) // batch, 1), bins)
               for i in range(k)]
    step = PackStep(members, setting.dev, setting.precision, setting.compile_mode)
    return setting.steps * batch * k / _timed(lambda: step.batches(data, batch), step, setting, counts)


# ---------------------------------------------------------------- data


def cifar_jpegs(data_root: str | None, n: int, scratch: Path) -> tuple[list[Path], str]:
    """CIFAR-10 JPEGs from the data root; with no data root at all, JPEGs written from the sample photos."""
    if data_root:
        root = Path(data_root) / "cifar10"
        return folder_splits(root, seed=0)["train"][:n], f"cifar10 JPEGs from {root}"
    imgs = load_splits("samples", 32, cache_dir=scratch.parent, train_limit=min(n, 1024)).train
    files = []
    for i, a in enumerate(imgs):
        files.append(scratch / f"{i:05d}.jpg")
        Image.fromarray(np.asarray(a)).save(files[-1], quality=75)
    return files, "JPEGs written from the bundled sample photos (no --data-root given)"


def check_data_root(data_root: str | None, parts: set[str]) -> None:
    """Before any timing: the data root holds what the chosen rows read (it is never silently replaced)."""
    if not data_root:
        return
    if parts & {"reference", "trial", "pack", "heads"} and not (Path(data_root) / "cifar10").is_dir():
        raise DataError(f"--data-root {data_root}: there is no cifar10/ folder in it, and the benchmark reads "
                        f"CIFAR-10. " + LAYOUT_HELP.format(name="cifar10")
                        + " Leave --data-root out to benchmark on the bundled sample photos instead.")
    if "flowers" in parts and not (Path(data_root) / "flowers102").is_dir():
        raise DataError(f"--data-root {data_root}: there is no flowers102/ folder in it for the flowers rows. "
                        + LAYOUT_HELP.format(name="flowers102")
                        + " Or leave them out with --parts reference,trial,pack.")


def flowers_images(data_root: str | None, n: int, size: int, cache_dir: Path) -> tuple[np.ndarray, str]:
    if data_root:
        s = load_splits("flowers102", size, data_root, cache_dir, train_limit=n, eval_limit=1)
        return np.asarray(s.train), f"Flowers-102 from {Path(data_root) / 'flowers102'}"
    s = load_splits("samples", size, cache_dir=cache_dir, train_limit=n, eval_limit=1)
    return np.asarray(s.train), f"{size}x{size} crops of the bundled sample photos (no --data-root given)"


# ---------------------------------------------------------------- command line


def _at_least(low: int):
    """An argparse type: a whole number >= ``low``; anything else is refused, never replaced by a default."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"{v} must be {'> 0' if low == 1 else f'>= {low}'}"
                                             + (" (leave the option out for its default)" if low == 1 else ""))
        return v
    return parse


_count, _nonnegative = _at_least(1), _at_least(0)


def _counts(text: str) -> list[int]:
    return [_count(s.strip()) for s in text.split(",")]


def _choices(options):
    def parse(text: str) -> list[str]:
        picked = [s.strip() for s in text.split(",")]
        bad = [s for s in picked if s not in options]
        if bad:
            raise argparse.ArgumentTypeError(f"{bad} unknown; choose from {', '.join(options)}")
        return picked
    return parse


def driver_part(argv: list[str]) -> bool:
    """Whether ``--parts`` asks for the driver benchmark (``--parts driver``: its own options)."""
    for i, a in enumerate(argv):
        value = a.split("=", 1)[1] if a.startswith("--parts=") else argv[i + 1] if a == "--parts" and i + 1 < len(argv) else None
        if value is not None and "driver" in value.split(","):
            return True
    return False


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m study.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", help="folder holding cifar10/ (and flowers102/); default $COLORIZE_DATA_ROOT")
    p.add_argument("--cache-dir", type=Path, help="decoded-data cache and scratch files (default .cache)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: a GPU when there is one, else cpu)")
    p.add_argument("--steps", type=_count, help="timed steps per row (default 200 on a GPU, 10 on a CPU)")
    p.add_argument("--warmup", type=_nonnegative, default=3, help="untimed steps before each row (default: 3)")
    p.add_argument("--images", type=_count, default=8192, help="CIFAR-10 training images read (default: 8192)")
    p.add_argument("--workers", type=_nonnegative, default=2,
                   help="reference DataLoader workers, as the notebooks used (default: 2)")
    p.add_argument("--batches", type=_counts, default=[64, 512], help="batch sizes of the single-trial rows (default: 64,512)")
    p.add_argument("--precisions", type=_choices(PRECISIONS),
                   help="single-trial precisions (default fp32,bf16 on a GPU, fp32 on a CPU)")
    p.add_argument("--compile", nargs="?", const="default", choices=COMPILE_MODES,
                   help="add rows with a torch.compile'd step (default mode; reduce-overhead adds CUDA graphs)")
    p.add_argument("--packs", type=_counts, help="pack sizes K (default 4,8,16,32 on a GPU, 2,4 on a CPU)")
    p.add_argument("--pack-batch", type=_count, default=64, help="each pack member's batch size (default: 64)")
    p.add_argument("--flowers-batch", type=_count, help="batch size of the flowers rows (default: 64 on a GPU, 4 on a CPU)")
    p.add_argument("--flowers-pack", type=_count, help="pack size of the flowers row (default 4 on a GPU, 2 on a CPU)")
    p.add_argument("--flowers-images", type=_count, default=256, help="Flowers-102 training images decoded (default: 256)")
    p.add_argument("--flowers-size", type=_count, default=256,
                   help="flowers image side, the report's 256; smaller only for quick smoke runs (default: 256)")
    p.add_argument("--rounds", type=_count, default=1,
                   help="run the trial and pack rows this many times, round-robin, and keep each one's median (default: 1)")
    p.add_argument("--parts", type=_choices(PARTS), default=list(PARTS), help=f"rows to run, comma-separated from {','.join(PARTS)} (default: all)")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file (default: none)")
    return p


@dataclass(frozen=True)
class Choices:
    """The command line with each device-sized default filled in (DEFAULTS)."""
    dev: torch.device
    steps: int
    packs: list[int]
    precisions: list[str]
    flowers_batch: int
    flowers_pack: int
    data_root: str | None
    cache_dir: Path

    def setting(self, args, precision: str = "fp32", compile_mode: str | None = None) -> Setting:
        return Setting(self.dev, self.steps, args.warmup, precision, compile_mode)

    def label(self, precision: str) -> str:
        """A precision as a row names it: "fp32" rows run with TF32 on a GPU, as run_trial's fp32."""
        return "tf32" if precision == "fp32" and self.dev.type == "cuda" else precision


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if driver_part(argv):   # the driver's own cost per result: a benchmark of its own (study.bench_driver)
        if any(a == "--growth" or a.startswith("--growth=") for a in argv):   # ... as the study grows
            from study import bench_growth
            return bench_growth.main(argv)
        from study import bench_driver
        return bench_driver.main(argv)
    args = parser().parse_args(argv)
    dev = pick_device(args.device)
    d = DEFAULTS["cuda" if dev.type == "cuda" else "cpu"]
    c = Choices(dev, args.steps or d["steps"], args.packs or _counts(d["packs"]),
                args.precisions or d["precisions"].split(","), args.flowers_batch or d["flowers_batch"],
                args.flowers_pack or d["flowers_pack"], args.data_root or default_data_root(),
                (args.cache_dir or default_cache_dir()).resolve())
    check_data_root(c.data_root, set(args.parts))
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # "fp32" rows use TF32
    torch.backends.cudnn.benchmark = True  # as run_trial
    c.cache_dir.mkdir(parents=True, exist_ok=True)
    # Scratch JPEGs live in the cache folder this command owns and go when it ends, also on error.
    scratch = Path(tempfile.mkdtemp(prefix="bench-jpeg-", dir=c.cache_dir))
    try:
        out = Figures(args, c)
        if set(args.parts) & {"reference", "trial", "pack", "heads"}:
            _cifar_rows(args, c, out, scratch)
        if "flowers" in args.parts:
            _flowers_rows(args, c, out)
        print(json.dumps(out.data))
        out.save()
        return 0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


class Figures:
    """The figures as they come: one printed line per row, and the JSON (``--json``), written after every
    row so that a run cut short still leaves what it measured."""

    def __init__(self, args, c: Choices):
        self.json_path = args.json
        self.data = {"device": device_name(c.dev), "torch": torch.__version__, "steps": c.steps,
                     "warmup": args.warmup, "rows": []}

    def row(self, key: str, text: str, rate: float, unit: str = "img/s", counts: dict | None = None,
            extra: dict | None = None) -> None:
        out, ref = self.data, self.data.get("reference_b64_img_s")
        out[key] = round(rate, 1)
        entry = {"key": key, "what": text, "rate": round(rate, 1), "unit": unit, **(counts or {}), **(extra or {})}
        ratio = ""
        if ref and key != "reference_b64_img_s":
            entry["ratio"] = out[key.replace("_img_s", "").replace("_model", "") + "_ratio"] = round(rate / ref, 2)
            ratio = f"   x{rate / ref:.2f} the reference"
        ops = (f"   {counts['ops_per_step']} ops/step, {counts['scalar_reads_per_step']} scalar reads"
               if counts else "")
        out["rows"].append(entry)
        print(f"{text:<58s} {rate:12.1f} {unit}{ratio}{ops}", flush=True)
        self.save()

    def save(self, **extra) -> None:
        if self.json_path:
            self.json_path.write_text(json.dumps({**self.data, **extra}, indent=2))


HEADS = {"uv": ("UV head", CIFAR_MODEL, {}),
         "classes": ("uv-classes head", replace(CIFAR_MODEL, output="uv-classes"), {}),
         "adversarial": ("UV head + discriminator (adversarial 0.01)", CIFAR_MODEL, {"adversarial": 0.01})}


def _cifar_rows(args, c: Choices, out: Figures, scratch: Path) -> None:
    """The reference row, the trial, pack and heads rows round-robin, and the compiled rows."""
    files, source = cifar_jpegs(c.data_root, args.images, scratch)
    t0 = time.perf_counter()
    images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])  # the one-time decode
    out.data.update(data=source, images=len(files), one_time_decode_s=round(time.perf_counter() - t0, 2))
    print(f"device {out.data['device']}; {len(files)} images ({source}); {c.steps} timed steps per row", flush=True)
    if "reference" in args.parts:
        out.row("reference_b64_img_s", f"reference (PIL per sample, DataLoader x{args.workers}, fp32, b64)",
                bench_reference(files, c.setting(args), args.workers))
    _round_robin(args, _jobs(args, c, images), out)
    if "heads" in args.parts:   # time per step against the UV head's, from the side-by-side medians
        uv = out.data[f"head_uv_b{args.pack_batch}_img_s"]
        for name in ("classes", "adversarial"):
            cost = round(uv / out.data[f"head_{name}_b{args.pack_batch}_img_s"], 2)
            out.data[f"head_{name}_step_cost_vs_uv"] = cost
            print(f"{HEADS[name][0]}: x{cost:.2f} the UV head's time per step", flush=True)
    mode, last = args.compile, c.precisions[-1]
    if mode and "trial" in args.parts:  # last: compiling takes long, and every row before it is kept
        for b in args.batches:
            out.row(f"trial_compiled_{last}_b{b}_img_s", f"one trial, torch.compile {mode}, {c.label(last)}, b{b}",
                    bench_trial(images, CIFAR_MODEL, b, c.setting(args, last, mode)))
    if mode and "pack" in args.parts:
        k = 16 if 16 in c.packs else max(c.packs)
        out.row(f"pack{k}_compiled_{last}_b{args.pack_batch}_model_img_s",
                f"pack of {k}, torch.compile {mode}, {c.label(last)}, b{args.pack_batch} each",
                bench_pack(images, CIFAR_MODEL, k, args.pack_batch, c.setting(args, last, mode)), "model-img/s")


def _jobs(args, c: Choices, images: np.ndarray) -> list[tuple]:
    """(key, text, unit, run(counts) -> rate) of each trial, pack and heads row chosen."""
    jobs = []
    if "trial" in args.parts:
        for p in c.precisions:
            for b in args.batches:
                jobs.append((f"trial_{p}_b{b}_img_s", f"one trial, plain model step, {c.label(p)}, b{b}", "img/s",
                             lambda n, b=b, p=p: bench_trial(images, CIFAR_MODEL, b, c.setting(args, p), n)))
    if "pack" in args.parts:
        for k in c.packs:
            for p in c.precisions:
                what = "pack of 1 (run_trial's engine step)" if k == 1 else f"pack of {k} fused UNets"
                jobs.append((f"pack{k}_{p}_b{args.pack_batch}_model_img_s",
                             f"{what}, {c.label(p)}, b{args.pack_batch} each", "model-img/s",
                             lambda n, k=k, p=p: bench_pack(images, CIFAR_MODEL, k, args.pack_batch,
                                                            c.setting(args, p), n)))
    if "heads" in args.parts:
        for name, (what, model_cfg, changes) in HEADS.items():
            jobs.append((f"head_{name}_b{args.pack_batch}_img_s", f"engine step, {what}, b{args.pack_batch}",
                         "img/s", lambda n, m=model_cfg, ch=changes: bench_pack(
                             images, m, 1, args.pack_batch, c.setting(args), n, **ch)))
    return jobs


def _round_robin(args, jobs: list[tuple], out: Figures) -> None:
    """Every job ``--rounds`` times, round-robin, then its row at the median rate: a load that comes and
    goes on a shared machine then weighs on every row alike."""
    rates: dict[str, list[float]] = {key: [] for key, *_ in jobs}
    counts: dict[str, dict] = {key: {} for key, *_ in jobs}
    for r in range(args.rounds):
        for key, _text, _unit, run in jobs:
            rates[key].append(run(counts[key]))
            print(f"  round {r + 1}/{args.rounds}: {key} {rates[key][-1]:.1f}", flush=True)
            out.save(rounds_so_far=rates)
    for key, text, unit, _run in jobs:
        out.row(key, text, float(np.median(rates[key])), unit, counts[key],
                extra={"rates": [round(r, 1) for r in rates[key]]} if args.rounds > 1 else None)


def _flowers_rows(args, c: Choices, out: Figures) -> None:
    fl, source = flowers_images(c.data_root, max(args.flowers_images, c.flowers_batch), args.flowers_size, c.cache_dir)
    size, b, k = args.flowers_size, c.flowers_batch, c.flowers_pack
    out.data.update(flowers_data=source, flowers_size=size)
    print(f"flowers: {len(fl)} images {size}x{size} ({source}), depth-4 UNet", flush=True)
    for p in c.precisions:
        out.row(f"flowers_trial_{p}_b{b}_img_s", f"flowers {size}px one trial, {c.label(p)}, b{b}",
                bench_trial(fl, FLOWERS_MODEL, b, c.setting(args, p)))
        out.row(f"flowers_pack{k}_{p}_b{b}_model_img_s", f"flowers {size}px pack of {k}, {c.label(p)}, b{b} each",
                bench_pack(fl, FLOWERS_MODEL, k, b, c.setting(args, p)), "model-img/s")


if __name__ == "__main__":
    from study import cli

    sys.exit(cli.run(main))
