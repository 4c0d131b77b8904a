"""One colorization trial: build everything from a TrialConfig, train, evaluate each epoch.

No Ray or Optuna here: ``report(row, checkpoint_dir)`` is how a caller (the CLI,
or the study's Ray trainable) receives each epoch's metrics and checkpoint.
"""
from __future__ import annotations

import io
import math
import shutil
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from PIL import Image

from study.color import prediction_to_rgb, rgb_to_y, target_for
from study.config import TrialConfig
from study.data import DeviceImages, Splits, load_splits, preview_indices
from study.metrics import colourfulness, psnr, ssim
from study.models import build_unet

CHECKPOINT_FILE = "checkpoint.pt"
Report = Callable[[dict, Path], None]


class NonFiniteLossError(RuntimeError):
    """Training diverged; the trial ends as ERROR with this message."""


def pick_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def autocast_for(device: torch.device):
    # bf16 on the GPU; the CPU trains in fp32 (bf16 there is slower on most CPUs).
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrialConfig, total_steps: int):
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total_steps, 1))
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(total_steps, 1))
    return None


def loss_fn(name: str):
    return F.l1_loss if name == "l1" else F.mse_loss


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: DeviceImages, cfg: TrialConfig, batch_size: int) -> dict:
    """Loss in the model's own space; PSNR, SSIM, colourfulness in RGB; the grayscale baseline."""
    model.eval()
    lossf = loss_fn(cfg.loss)
    totals = torch.zeros(6, device=images.device, dtype=torch.float64)
    for x in images.eval_batches(batch_size):
        y = rgb_to_y(x)
        with autocast_for(images.device):
            pred = model(y)
        loss = lossf(pred.float(), target_for(x, cfg.output), reduction="none").flatten(1).mean(1)
        rgb = prediction_to_rgb(pred.float(), y, cfg.output)
        gray = y.clamp(0, 1).expand(-1, 3, -1, -1)
        totals += torch.stack([loss.sum(), psnr(rgb, x).sum(), ssim(rgb, x).sum(), colourfulness(rgb).sum(),
                               colourfulness(x).sum(), psnr(gray, x).sum()]).double()
    loss, p, s, c_pred, c_true, p_gray = (totals / len(images)).tolist()
    model.train()
    return {"loss": loss, "psnr": p, "ssim": s, "colourfulness": c_pred / max(c_true, 1e-9), "gray_psnr": p_gray}


def png_bytes(rgb_chw: torch.Tensor) -> bytes:
    arr = (rgb_chw.float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    buf = io.BytesIO()
    Image.fromarray(arr.squeeze(-1) if arr.shape[-1] == 1 else arr).save(buf, format="PNG")
    return buf.getvalue()


@torch.no_grad()
def write_previews(model, test: DeviceImages, cfg: TrialConfig, folder: Path, originals: bool) -> None:
    idx = preview_indices(len(test), cfg.preview_count)
    x = test.take(torch.tensor(idx, device=test.device))
    y = rgb_to_y(x)
    model.eval()
    with autocast_for(test.device):
        rgb = prediction_to_rgb(model(y).float(), y, cfg.output)
    model.train()
    for k, i in enumerate(idx):
        (folder / f"prediction_{i:05d}.png").write_bytes(png_bytes(rgb[k]))
        if originals:
            (folder / f"original_{i:05d}.png").write_bytes(png_bytes(x[k]))
            (folder / f"grayscale_{i:05d}.png").write_bytes(png_bytes(y[k].clamp(0, 1)))


def load_checkpoint(folder: Path | str, map_location="cpu") -> dict:
    # weights_only: a checkpoint never runs pickled code when loaded.
    return torch.load(Path(folder) / CHECKPOINT_FILE, map_location=map_location, weights_only=True)


def run_trial(cfg: TrialConfig, *, data_root: str | None = None, cache_dir: str | Path | None = None,
              device: str | None = None, report: Report | None = None, resume_from: Path | str | None = None,
              splits: Splits | None = None, log: Callable[[str], None] = print) -> list[dict]:
    """Train ``cfg`` for ``cfg.epochs`` epochs (continuing from ``resume_from``); returns the epoch rows."""
    cfg.validate()
    dev = pick_device(device)
    torch.manual_seed(cfg.seed)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    splits = splits or load_splits(cfg.dataset, cfg.image_size, data_root, cache_dir,
                                   cfg.train_limit, cfg.eval_limit)
    train, val, test = (DeviceImages(splits[s], dev) for s in ("train", "val", "test"))
    eval_batch = max(cfg.batch_size, 256 if cfg.image_size <= 64 else 32)

    model = build_unet(cfg.model, cfg.image_size).to(dev, memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    steps_per_epoch = max(len(train) // cfg.batch_size, 1)
    sched = make_scheduler(opt, cfg, cfg.epochs * steps_per_epoch)
    gen = torch.Generator(device=dev).manual_seed(cfg.seed)
    lossf = loss_fn(cfg.loss)
    history: list[dict] = []
    start_epoch = 0
    if resume_from:
        state = load_checkpoint(resume_from, map_location=dev)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if sched is not None and state.get("scheduler"):
            sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"].cpu())  # generator states live on the CPU
        start_epoch, history = state["epoch"], list(state["history"])
        log(f"resumed from {resume_from} after epoch {start_epoch}")

    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        loss_sum = torch.zeros((), device=dev)
        steps = 0
        for x in train.train_batches(cfg.batch_size, gen, cfg.augment):
            y = rgb_to_y(x)
            with autocast_for(dev):
                pred = model(y)
            loss = lossf(pred.float(), target_for(x, cfg.output))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            loss_sum += loss.detach()
            steps += 1
        train_loss = (loss_sum / max(steps, 1)).item()  # one sync per epoch
        if not math.isfinite(train_loss):
            raise NonFiniteLossError(f"training loss became {train_loss} in epoch {epoch} "
                                     f"(lr={cfg.lr}, loss={cfg.loss}); lower the learning rate")
        v, t = evaluate(model, val, cfg, eval_batch), evaluate(model, test, cfg, eval_batch)
        row = {"epoch": epoch, "train_loss": train_loss, "lr": opt.param_groups[0]["lr"],
               **{f"val_{k}": val_ for k, val_ in v.items()}, **{f"test_{k}": val_ for k, val_ in t.items()}}
        row["seconds"] = time.perf_counter() - t0
        history.append(row)
        best = max(history, key=lambda r: r["val_psnr"])
        row.update(best_val_psnr=best["val_psnr"], best_epoch=best["epoch"])
        log(f"epoch {epoch}/{cfg.epochs}  train {train_loss:.4f}  val {v['loss']:.4f}  test {t['loss']:.4f}  "
            f"val PSNR {v['psnr']:.2f} dB (gray {v['gray_psnr']:.2f})  SSIM {v['ssim']:.3f}  "
            f"colour {v['colourfulness']:.2f}  {row['seconds']:.1f}s")

        folder = Path(tempfile.mkdtemp(prefix=f"ckpt-{epoch:03d}-"))
        try:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict() if sched is not None else None,
                        "generator": gen.get_state(), "epoch": epoch, "history": history,
                        "config": cfg.to_dict()}, folder / CHECKPOINT_FILE)
            write_previews(model, test, cfg, folder, originals=(epoch == 1))
            if report is not None:
                report(dict(row), folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return history


def keep_checkpoint(target: Path) -> Report:
    """A ``report`` for runs without Ray: the latest checkpoint folder is copied to ``target``."""
    def report(row: dict, folder: Path) -> None:
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(folder, tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    return report


def summarize(history: list[dict]) -> dict:
    best = max(history, key=lambda r: r["val_psnr"])
    return {"best_epoch": best["epoch"], "best_val_psnr": best["val_psnr"], "best_test_psnr": best["test_psnr"],
            "gray_val_psnr": best["val_gray_psnr"], "epochs": len(history)}
