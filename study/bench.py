"""Training throughput: the original notebooks' pipeline against this project's loop, in one run.

``python -m study.bench [--data-root ../shared/data] [--steps N] [--json out.json]``

Both sides train the report's CIFAR-10 UNet (depth 3, max-pool + upsample, UV
output) with Adam and MSE for the same number of steps:
- reference: per-sample PIL decode of the JPEG files + ToTensor + RGB->YUV per
  sample, DataLoader batch 64, fp32 (as in the seed notebooks);
- ours: images decoded once into the uint8 cache, resident on the device, converted
  per batch on the device; bf16 autocast + channels_last on a GPU; batch 64 and 512.
Prints images/s of each and the ratios, and the same as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.functional import to_tensor

from study.color import rgb_to_y, rgb_to_yuv, target_for
from study.data import DeviceImages, folder_splits, load_splits
from study.models import VARIANTS, build_unet
from study.train import autocast_for, device_name, pick_device

MODEL = VARIANTS["report-cifar10-simple-uv"]


class NotebookDataset(Dataset):
    """The seed notebooks' style: decode, ToTensor and colour-convert one image at a time."""

    def __init__(self, files: list[Path]):
        self.files = files

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        rgb = to_tensor(Image.open(self.files[i]).convert("RGB"))
        yuv = rgb_to_yuv(rgb[None])[0]
        return yuv[:1], yuv[1:]


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _timed(batches, step, steps: int, warmup: int, dev) -> float:
    """Seconds taken by ``steps`` calls of ``step(batch)`` after ``warmup`` untimed ones."""
    done, t0 = 0, 0.0
    while True:
        for batch in batches():
            if done == warmup:
                _sync(dev)
                t0 = time.perf_counter()
            step(batch)
            done += 1
            if done == warmup + steps:
                _sync(dev)
                return time.perf_counter() - t0


def bench_reference(files, dev, steps, warmup, workers) -> float:
    torch.manual_seed(0)
    model = build_unet(MODEL, 32).to(dev)
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


def bench_ours(images: np.ndarray, dev, batch, steps, warmup) -> float:
    torch.manual_seed(0)
    model = build_unet(MODEL, 32).to(dev, memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = DeviceImages(images, dev)
    gen = torch.Generator(device=dev).manual_seed(0)

    def step(x):  # the same step as study.train.run_trial
        y = rgb_to_y(x)
        with autocast_for(dev):
            pred = model(y)
        loss = F.mse_loss(pred.float(), target_for(x, "uv"))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return steps * batch / _timed(lambda: data.train_batches(batch, gen), step, steps, warmup, dev)


def jpeg_files(data_root: str | None, n: int, cache_dir) -> tuple[list[Path], str]:
    """CIFAR-10 JPEGs when a data root has them, else JPEGs written from the bundled sample photos."""
    root = Path(data_root or os.environ.get("COLORIZE_DATA_ROOT") or "") / "cifar10"
    if data_root or os.environ.get("COLORIZE_DATA_ROOT"):
        if root.is_dir():
            return folder_splits(root, seed=0)["train"][:n], f"cifar10 JPEGs from {root}"
    imgs = load_splits("samples", 32, cache_dir=cache_dir, train_limit=min(n, 1024)).train
    tmp = Path(tempfile.mkdtemp(prefix="bench-jpeg-"))
    files = []
    for i, a in enumerate(imgs):
        files.append(tmp / f"{i:05d}.jpg")
        Image.fromarray(np.asarray(a)).save(files[-1], quality=75)
    return files, "sample-photo JPEGs (no --data-root given)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m study.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root")
    p.add_argument("--cache-dir")
    p.add_argument("--device")
    p.add_argument("--steps", type=int, help="timed steps per side (default 300 on a GPU, 20 on a CPU)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--images", type=int, default=8192, help="training images the reference reads")
    p.add_argument("--workers", type=int, default=2, help="reference DataLoader workers (the notebooks used 2)")
    p.add_argument("--batches", default="64,512", help="batch sizes for our loop")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    dev = pick_device(args.device)
    steps = args.steps or (300 if dev.type == "cuda" else 20)
    if dev.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    files, source = jpeg_files(args.data_root, args.images, args.cache_dir)
    t0 = time.perf_counter()
    images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])  # the one-time decode
    decode_s = time.perf_counter() - t0
    out = {"device": device_name(dev), "torch": torch.__version__, "data": source, "images": len(files),
           "steps": steps, "one_time_decode_s": round(decode_s, 2),
           "precision_ours": "bf16 autocast" if dev.type == "cuda" else "fp32"}
    print(f"device {out['device']}; {len(files)} images ({source}); {steps} timed steps each", flush=True)
    ref = bench_reference(files, dev, steps, args.warmup, args.workers)
    out["reference_b64_img_s"] = round(ref, 1)
    print(f"reference (PIL per sample, DataLoader x{args.workers}, fp32, batch 64): {ref:10.1f} img/s", flush=True)
    for b in (int(s) for s in args.batches.split(",")):
        ours = bench_ours(images, dev, b, steps, args.warmup)
        out[f"ours_b{b}_img_s"] = round(ours, 1)
        out[f"ratio_b{b}"] = round(ours / ref, 2)
        print(f"ours (device-resident uint8, {out['precision_ours']}, batch {b:3d}):  {ours:10.1f} img/s   "
              f"x{ours / ref:.2f} the reference", flush=True)
    print(json.dumps(out))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
