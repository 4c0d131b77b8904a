"""Scoring a model on a split (loss, PSNR, SSIM, colourfulness, the grayscale baseline) and its previews.

Totals stay on the device: a run fetches an epoch's evaluations in its one sync per epoch.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from study.config import TrialConfig
from study.engine.chroma import ChromaBins, average_flipped, class_loss
from study.engine.color import prediction_to_rgb, rgb_to_y, target_for
from study.engine.data import DeviceImages, preview_indices
from study.engine.device import autocast_for
from study.engine.losses import loss_fn
from study.engine.metrics import colourfulness, psnr, ssim
from study.results import CURVE_TEMPERATURES, curve_key


@dataclass
class EvalSplit:
    """A split ready for evaluation, with its constants computed once (not every epoch): the
    grayscale input's PSNR (the baseline) and the originals' mean colourfulness."""
    images: DeviceImages
    batch_size: int
    gray_psnr: float
    colourfulness: float

    @classmethod
    @torch.no_grad()
    def prepare(cls, images: DeviceImages, batch_size: int) -> "EvalSplit":
        sums = torch.zeros(2, device=images.device, dtype=torch.float64)
        for x in images.eval_batches(batch_size):
            gray = rgb_to_y(x).clamp(0, 1).expand(-1, 3, -1, -1)
            sums += torch.stack([psnr(gray, x).sum(), colourfulness(x).sum()]).double()
        gray_psnr, colour = (sums / len(images)).tolist()  # one sync per split, once per trial
        return cls(images, batch_size, gray_psnr, colour)

    def __len__(self) -> int:
        return len(self.images)

    def batches(self, batch_size: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(RGB, Y) batches; several models' predictions can be scored on the same ones."""
        for x in self.images.eval_batches(batch_size or self.batch_size):
            yield x, rgb_to_y(x)

    def metrics(self, sums: Sequence[float], curve: bool = False) -> dict:
        """Metrics from fetched ``batch_sums`` totals (loss, PSNR, SSIM, colourfulness) over the split;
        ``curve``: also a classification head's PSNR and colourfulness at CURVE_TEMPERATURES (their totals
        follow the first four: ``class_batch_sums``), as ``psnr_t038`` etc."""
        loss, p, s, c = (float(v) / len(self) for v in sums[:4])
        out = {"loss": loss, "psnr": p, "ssim": s, "colourfulness": c / max(self.colourfulness, 1e-9),
               "gray_psnr": self.gray_psnr}
        if curve and len(sums) > 4:
            for i, t in enumerate(CURVE_TEMPERATURES):
                out[curve_key("psnr", t)] = float(sums[4 + 2 * i]) / len(self)
                out[curve_key("colourfulness", t)] = (float(sums[5 + 2 * i]) / len(self)
                                                  / max(self.colourfulness, 1e-9))
        return out


def eval_batch_size(cfg: TrialConfig) -> int:
    if cfg.output == "uv-classes":
        # Q logits per pixel and five decodings each: 32 images keep each temporary near 32 MB, which a
        # CPU evaluates 1.6x faster than 256 (fresh large buffers cost their page faults).
        return 32
    return max(cfg.batch_size, 256 if cfg.image_size <= 64 else 32)


def batch_sums(pred: torch.Tensor, x: torch.Tensor, y: torch.Tensor, output: str, lossf) -> torch.Tensor:
    """One model's batch totals on the device, float64 (4,): loss in its own space; PSNR, SSIM and
    colourfulness in RGB. No sync: add them up over a split and fetch once."""
    pred = pred.float()
    loss = lossf(pred, target_for(x, output), reduction="none").flatten(1).mean(1)
    rgb = prediction_to_rgb(pred, y, output)
    return torch.stack([loss.sum(), psnr(rgb, x).sum(), ssim(rgb, x).sum(), colourfulness(rgb).sum()]).double()


def class_row_metrics(pred: torch.Tensor, x: torch.Tensor, y: torch.Tensor, bins: ChromaBins,
                      temperature: float | torch.Tensor) -> torch.Tensor:
    """A classification head's per-image metrics (4 + 2 * len(CURVE_TEMPERATURES), N) for logits ``pred``:
    the cross-entropy against the soft targets (no rebalancing), PSNR, SSIM and colourfulness of the
    annealed mean at ``temperature`` (a float, or per image (N, 1, 1, 1)), then PSNR and colourfulness at
    each of CURVE_TEMPERATURES."""
    pred = pred.float()
    loss = class_loss(pred, target_for(x, "uv"), bins, None).flatten(1).mean(1)
    decoded = {t: prediction_to_rgb(bins.decode(pred, t), y, "uv") for t in CURVE_TEMPERATURES}
    # A float temperature on the curve is decoded once: on a CPU each decoding costs about as much
    # as a training step's share of the epoch.
    own = decoded.get(temperature) if isinstance(temperature, float) else None
    rgb = own if own is not None else prediction_to_rgb(bins.decode(pred, temperature), y, "uv")
    rows = [loss, psnr(rgb, x), ssim(rgb, x), colourfulness(rgb)]
    for t in CURVE_TEMPERATURES:
        rows += [psnr(decoded[t], x), colourfulness(decoded[t])]
    return torch.stack([r.flatten() for r in rows])


def class_batch_sums(pred: torch.Tensor, x: torch.Tensor, y: torch.Tensor, bins: ChromaBins,
                     temperature: float | torch.Tensor) -> torch.Tensor:
    """batch_sums for a classification head: class_row_metrics' totals, float64, on the device."""
    return class_row_metrics(pred, x, y, bins, temperature).sum(1).double()


def predict(model: torch.nn.Module, y: torch.Tensor, precision: str | None = None, flip: bool = False) -> torch.Tensor:
    """The model's output (float) for luma ``y``; ``flip``: averaged with the un-mirrored output for the
    mirrored input (test-time flip averaging: colours the model is unsure of by side get averaged; a
    classification head's probabilities are averaged, study.engine.chroma.average_flipped)."""
    with autocast_for(y.device, precision):
        pred = model(y).float()
        if flip:
            mirrored = model(y.flip(3)).float().flip(3)
            pred = (average_flipped(pred, mirrored) if getattr(model, "classes", None) is not None
                    else (pred + mirrored) / 2)
    return pred


@torch.no_grad()
def evaluate_sums(model: torch.nn.Module, split: EvalSplit, cfg: TrialConfig,
                  precision: str | None = None, batch_size: int | None = None) -> torch.Tensor:
    """``batch_sums`` (``class_batch_sums`` for a classification head) over a whole split, left on the
    device (no sync)."""
    was_training = model.training
    model.eval()
    lossf = loss_fn(cfg.loss)
    bins = getattr(model, "classes", None)
    sums = torch.zeros(4 if bins is None else 4 + 2 * len(CURVE_TEMPERATURES), device=split.images.device,
                       dtype=torch.float64)
    for x, y in split.batches(batch_size):
        pred = predict(model, y, precision, cfg.tta_flip)
        sums += (batch_sums(pred, x, y, cfg.output, lossf) if bins is None
                 else class_batch_sums(pred, x, y, bins, cfg.temperature))
    model.train(was_training)
    return sums


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: DeviceImages | EvalSplit, cfg: TrialConfig, batch_size: int = 256,
             precision: str | None = None) -> dict:
    """Loss in the model's own space; PSNR, SSIM, colourfulness in RGB; the grayscale baseline."""
    split = images if isinstance(images, EvalSplit) else EvalSplit.prepare(images, batch_size)
    return split.metrics(evaluate_sums(model, split, cfg, precision).tolist(), curve=True)


# ---------------------------------------------------------------- previews


def png_bytes(rgb_chw: torch.Tensor) -> bytes:
    arr = (rgb_chw.float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    buf = io.BytesIO()
    Image.fromarray(arr.squeeze(-1) if arr.shape[-1] == 1 else arr).save(buf, format="PNG")
    return buf.getvalue()


def original_previews(test_images: np.ndarray, count: int) -> dict[str, bytes]:
    """The originals and grayscale inputs of the preview images, written once per (dataset, resolution)
    by whoever writes results (never by trials): ``{"original_00012.png": png, "grayscale_00012.png": ...}``."""
    idx = preview_indices(len(test_images), count)
    if not idx:
        return {}
    x = torch.from_numpy(np.ascontiguousarray(test_images[idx])).permute(0, 3, 1, 2).float().div(255)
    y = rgb_to_y(x).clamp(0, 1)
    files = {}
    for k, i in enumerate(idx):
        files[f"original_{i:05d}.png"] = png_bytes(x[k])
        files[f"grayscale_{i:05d}.png"] = png_bytes(y[k])
    return files


def prediction_pngs(rgb: torch.Tensor, idx: Sequence[int]) -> dict[str, bytes]:
    """``prediction_<index>.png`` for a batch of RGB predictions of the test images ``idx``."""
    rgb = rgb.detach().float().cpu()  # one copy for the whole batch
    return {f"prediction_{i:05d}.png": png_bytes(rgb[k]) for k, i in enumerate(idx)}


@torch.no_grad()
def write_previews(model, test: DeviceImages, cfg: TrialConfig, folder: Path, precision: str | None = None) -> None:
    """One model's ``prediction_<index>.png`` of the preview images, into ``folder``."""
    idx = preview_indices(len(test), cfg.preview_count)
    if not idx:
        return
    x = test.take(torch.tensor(idx, device=test.device))
    y = rgb_to_y(x)
    was_training = model.training
    model.eval()
    rgb = prediction_to_rgb(model.decode(predict(model, y, precision, cfg.tta_flip), cfg.temperature), y, cfg.output)
    model.train(was_training)
    for name, data in prediction_pngs(rgb, idx).items():
        (folder / name).write_bytes(data)
