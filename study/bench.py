"""Training throughput, everything side by side in one run, as text and JSON with the device's name.

``python -m study.bench [--data-root <data root>] [--steps N] [--packs 4,8,16,32] [--parts ...] [--json F]``

All rows train with Adam and MSE for the same number of timed steps:
- reference: the seed notebooks' pipeline: per-sample PIL decode of the JPEG files +
  ToTensor + RGB->YUV per sample, DataLoader batch 64, fp32, on the report's CIFAR-10
  UNet (depth 3, max-pool + upsample, UV output);
- trial: a plain single-model step (images decoded once, resident on the device, converted
  per batch there; study.engine.losses.make_loss_step + Adam) on the same UNet at each ``--batches``
  size and ``--precisions``;
- pack K: K such UNets fused into one grouped-convolution model (``study.engine.fused``), each
  on its own batch of ``--pack-batch`` images; aggregate model-images/s. A pack of 1 is
  what ``run_trial`` runs (the engine's loop with one member): beside the trial row at the
  same batch size it shows what the shared loop costs a single trial;
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
from dataclasses import replace
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
    FusedUNet,
    Member,
    PackTerms,
    build_unet,
    default_cache_dir,
    default_data_root,
    device_name,
    folder_splits,
    load_splits,
    make_loss_step,
    make_optimizer,
    make_pack_loss,
    pick_device,
    rgb_to_yuv,
    train_batches,
    train_step,
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


def _timed(batches, step, steps: int, warmup: int, dev, counts: dict | None = None) -> float:
    """Seconds taken by ``steps`` calls of ``step(batch)`` after ``warmup`` untimed ones; with ``counts``,
    one more step runs under OpCount and its figures land there."""
    done, t0, seconds = 0, 0.0, None
    while True:
        for batch in batches():
            if seconds is not None:
                with OpCount() as c:
                    step(batch)
                counts.update(ops_per_step=c.ops, scalar_reads_per_step=c.scalar_reads)
                return seconds
            if done == warmup:
                _sync(dev)
                t0 = time.perf_counter()
            step(batch)
            done += 1
            if done == warmup + steps:
                _sync(dev)
                seconds = time.perf_counter() - t0
                if counts is None:
                    return seconds


def bench_reference(files, dev, steps, warmup, workers) -> float:
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

    return steps * 64 / _timed(lambda: loader, step, steps, warmup, dev)


def _trial_config(model_cfg: UNetConfig, images: np.ndarray, batch: int, precision: str, **changes) -> TrialConfig:
    return TrialConfig(dataset="bench", resolution=images.shape[1], depth=model_cfg.depth,
                       sampling=model_cfg.sampling, output=model_cfg.output, base_filters=model_cfg.base_filters,
                       batch_size=batch, epochs=1, precision=precision, **changes)


def bench_trial(images: np.ndarray, model_cfg: UNetConfig, dev, batch, steps, warmup, precision="fp32",
                compile_mode=None, counts: dict | None = None) -> float:
    """One model's plain training step (what a trial ran before it went through study.engine): images/s."""
    cfg = _trial_config(model_cfg, images, batch, precision)
    torch.manual_seed(0)
    model = build_unet(cfg.model, cfg.image_size).to(dev, memory_format=torch.channels_last)
    opt = make_optimizer(model.parameters(), cfg.lr, dev)
    loss_step = make_loss_step(model, cfg, dev, precision, compile_mode)
    data = DeviceImages(images, dev)
    gen = torch.Generator(device=dev).manual_seed(0)

    def step(x):
        loss = loss_step(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return steps * batch / _timed(lambda: data.train_batches(batch, gen), step, steps, warmup, dev, counts)


def bench_pack(images: np.ndarray, model_cfg: UNetConfig, dev, k, batch, steps, warmup, precision="fp32",
               compile_mode=None, counts: dict | None = None, **changes) -> float:
    """K members, the engine's own step (study.engine.fused; K=1 is run_trial's), each with its own lr, seed and
    batch: model-images/s. ``changes``: other trial settings (e.g. adversarial)."""
    data = DeviceImages(images, dev)
    base = _trial_config(model_cfg, images, batch, precision, **changes)
    bins = used_bins(data.images) if base.output == "uv-classes" else None   # as prepare_trial finds them
    members = [Member(i, base.replace(lr=1e-3 * (1 + i / k), seed=i), dev, max(len(data) // batch, 1), bins)
               for i in range(k)]
    fused = FusedUNet([m.model for m in members]).train()
    loss = make_pack_loss(fused, PackTerms(members, dev), dev, precision, compile_mode)

    def step(x):
        train_step(fused, members, loss, x)

    return steps * batch * k / _timed(lambda: train_batches(data, members, batch), step, steps, warmup, dev, counts)


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


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    dev = pick_device(args.device)
    d = DEFAULTS["cuda" if dev.type == "cuda" else "cpu"]
    steps = args.steps or d["steps"]
    packs = args.packs or _counts(d["packs"])
    precisions = args.precisions or d["precisions"].split(",")
    flowers_batch = args.flowers_batch or d["flowers_batch"]
    flowers_pack = args.flowers_pack or d["flowers_pack"]
    data_root = args.data_root or default_data_root()
    cache_dir = (args.cache_dir or default_cache_dir()).resolve()
    check_data_root(data_root, set(args.parts))
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # "fp32" rows use TF32
    torch.backends.cudnn.benchmark = True  # as run_trial
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Scratch JPEGs live in the cache folder this command owns and go when it ends, also on error.
    scratch = Path(tempfile.mkdtemp(prefix="bench-jpeg-", dir=cache_dir))
    try:
        return _run(args, dev, steps, packs, precisions, flowers_batch, flowers_pack, data_root, cache_dir, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _run(args, dev, steps, packs, precisions, flowers_batch, flowers_pack, data_root, cache_dir, scratch) -> int:
    parts = set(args.parts)
    out = {"device": device_name(dev), "torch": torch.__version__, "steps": steps, "warmup": args.warmup,
           "rows": []}
    mode = args.compile

    def label(precision: str) -> str:  # "fp32" rows run with TF32 on a GPU, as run_trial's fp32
        return "tf32" if precision == "fp32" and dev.type == "cuda" else precision

    def row(key: str, text: str, rate: float, unit: str = "img/s", counts: dict | None = None,
            extra: dict | None = None) -> None:
        ref = out.get("reference_b64_img_s")
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
        if args.json:  # after every row: a run cut short still leaves what it measured
            args.json.write_text(json.dumps(out, indent=2))

    if parts & {"reference", "trial", "pack", "heads"}:
        files, source = cifar_jpegs(data_root, args.images, scratch)
        t0 = time.perf_counter()
        images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])  # the one-time decode
        out.update(data=source, images=len(files), one_time_decode_s=round(time.perf_counter() - t0, 2))
        print(f"device {out['device']}; {len(files)} images ({source}); {steps} timed steps per row", flush=True)
        if "reference" in parts:
            row("reference_b64_img_s", f"reference (PIL per sample, DataLoader x{args.workers}, fp32, b64)",
                bench_reference(files, dev, steps, args.warmup, args.workers))
        # The trial and pack rows run round-robin, --rounds times, each keeping its median rate: a load
        # that comes and goes on a shared machine then weighs on every row alike.
        jobs = []
        if "trial" in parts:
            for precision in precisions:
                for b in args.batches:
                    jobs.append((f"trial_{precision}_b{b}_img_s",
                                 f"one trial, plain model step, {label(precision)}, b{b}", "img/s",
                                 lambda c, b=b, p=precision: bench_trial(images, CIFAR_MODEL, dev, b, steps,
                                                                         args.warmup, p, counts=c)))
        if "pack" in parts:
            for k in packs:
                for precision in precisions:
                    what = ("pack of 1 (run_trial's engine step)" if k == 1 else f"pack of {k} fused UNets")
                    jobs.append((f"pack{k}_{precision}_b{args.pack_batch}_model_img_s",
                                 f"{what}, {label(precision)}, b{args.pack_batch} each", "model-img/s",
                                 lambda c, k=k, p=precision: bench_pack(images, CIFAR_MODEL, dev, k, args.pack_batch,
                                                                        steps, args.warmup, p, counts=c)))
        heads = {"uv": ("UV head", CIFAR_MODEL, {}),
                 "classes": ("uv-classes head", replace(CIFAR_MODEL, output="uv-classes"), {}),
                 "adversarial": ("UV head + discriminator (adversarial 0.01)", CIFAR_MODEL, {"adversarial": 0.01})}
        if "heads" in parts:
            for name, (what, model_cfg, changes) in heads.items():
                jobs.append((f"head_{name}_b{args.pack_batch}_img_s", f"engine step, {what}, b{args.pack_batch}",
                             "img/s", lambda c, m=model_cfg, ch=changes: bench_pack(
                                 images, m, dev, 1, args.pack_batch, steps, args.warmup, "fp32", counts=c, **ch)))
        rates: dict[str, list[float]] = {key: [] for key, *_ in jobs}
        counts: dict[str, dict] = {key: {} for key, *_ in jobs}
        for r in range(args.rounds):
            for key, _text, _unit, run in jobs:
                rates[key].append(run(counts[key]))
                print(f"  round {r + 1}/{args.rounds}: {key} {rates[key][-1]:.1f}", flush=True)
                if args.json:  # a run cut short still leaves what it measured
                    args.json.write_text(json.dumps({**out, "rounds_so_far": rates}, indent=2))
        for key, text, unit, _run_row in jobs:
            rate = float(np.median(rates[key]))
            row(key, text, rate, unit, counts[key],
                extra={"rates": [round(r, 1) for r in rates[key]]} if args.rounds > 1 else None)
        if "heads" in parts:   # time per step against the UV head's, from the side-by-side medians
            uv = out[f"head_uv_b{args.pack_batch}_img_s"]
            for name in ("classes", "adversarial"):
                cost = out[f"head_{name}_step_cost_vs_uv"] = round(uv / out[f"head_{name}_b{args.pack_batch}_img_s"], 2)
                print(f"{heads[name][0]}: x{cost:.2f} the UV head's time per step", flush=True)
        if mode and "trial" in parts:  # last: compiling takes long, and every row before it is kept
            for b in args.batches:
                row(f"trial_compiled_{precisions[-1]}_b{b}_img_s",
                    f"one trial, torch.compile {mode}, {label(precisions[-1])}, b{b}",
                    bench_trial(images, CIFAR_MODEL, dev, b, steps, args.warmup, precisions[-1], mode))
        if mode and "pack" in parts:
            k = 16 if 16 in packs else max(packs)
            row(f"pack{k}_compiled_{precisions[-1]}_b{args.pack_batch}_model_img_s",
                f"pack of {k}, torch.compile {mode}, {label(precisions[-1])}, b{args.pack_batch} each",
                bench_pack(images, CIFAR_MODEL, dev, k, args.pack_batch, steps, args.warmup, precisions[-1], mode),
                "model-img/s")
    if "flowers" in parts:
        fl, source = flowers_images(data_root, max(args.flowers_images, flowers_batch), args.flowers_size, cache_dir)
        size = args.flowers_size
        out.update(flowers_data=source, flowers_size=size)
        print(f"flowers: {len(fl)} images {size}x{size} ({source}), depth-4 UNet", flush=True)
        for precision in precisions:
            row(f"flowers_trial_{precision}_b{flowers_batch}_img_s",
                f"flowers {size}px one trial, {label(precision)}, b{flowers_batch}",
                bench_trial(fl, FLOWERS_MODEL, dev, flowers_batch, steps, args.warmup, precision))
            row(f"flowers_pack{flowers_pack}_{precision}_b{flowers_batch}_model_img_s",
                f"flowers {size}px pack of {flowers_pack}, {label(precision)}, b{flowers_batch} each",
                bench_pack(fl, FLOWERS_MODEL, dev, flowers_pack, flowers_batch, steps, args.warmup, precision),
                "model-img/s")
    print(json.dumps(out))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    from study import cli

    sys.exit(cli.run(main))
