"""Scoring members on a split (loss, PSNR, SSIM, colourfulness, the grayscale baseline) and their previews:
one definition for a pack of one and a pack of K (``evaluate_members``); one model is a pack of one.

Totals stay on the device: a run fetches an epoch's evaluations in its one sync per epoch.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from study.config import TrialConfig
from study.engine.chroma import ChromaBins, average_flipped, class_loss
from study.engine.color import prediction_to_rgb, rgb_to_y, target_for
from study.engine.data import DeviceImages, preview_indices
from study.engine.device import autocast_for
from study.engine.fused import FusedUNet
from study.engine.metrics import colourfulness, psnr, ssim
from study.engine.models import UNet
from study.engine.terms import PackTerms, elementwise_loss, member_loss
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


def regression_row_metrics(pred: torch.Tensor, x: torch.Tensor, y: torch.Tensor, output: str,
                           loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """A regression head's per-image metrics (4, N): the elementwise loss ``loss_of(prediction, target)`` in
    its own space (study.engine.terms), averaged per image, and PSNR, SSIM and colourfulness in RGB."""
    pred = pred.float()
    loss = loss_of(pred, target_for(x, output)).flatten(1).mean(1)
    rgb = prediction_to_rgb(pred, y, output)
    return torch.stack([loss, psnr(rgb, x), ssim(rgb, x), colourfulness(rgb)])


def batch_sums(pred: torch.Tensor, x: torch.Tensor, y: torch.Tensor, output: str, loss: str = "mse") -> torch.Tensor:
    """One regression model's batch totals (4,) on the device, float64, with loss ``loss``: several models
    scored on the same batches (EvalSplit.batches). No sync: add them up over a split and fetch once."""
    return regression_row_metrics(pred, x, y, output, lambda p, t: elementwise_loss(p, t, loss)).sum(1).double()


def class_row_metrics(pred: torch.Tensor, x: torch.Tensor, y: torch.Tensor, bins: ChromaBins,
                      temperature: float | torch.Tensor) -> torch.Tensor:
    """A classification head's per-image metrics (4 + 2 * len(CURVE_TEMPERATURES), N) for logits ``pred``:
    the cross-entropy against the soft targets (no rebalancing), PSNR, SSIM and colourfulness of the
    annealed mean at ``temperature`` (a float, or per image (N, 1, 1, 1)), then PSNR and colourfulness at
    each of CURVE_TEMPERATURES."""
    pred = pred.float()
    loss = class_loss(pred, target_for(x, "uv"), bins, None).flatten(1).mean(1)
    decoded = {t: prediction_to_rgb(bins.decode(pred, t), y, "uv") for t in CURVE_TEMPERATURES}
    # A float temperature on the curve is decoded once: each decoding costs about as much as a training
    # step's share of the epoch on a CPU.
    own = decoded.get(temperature) if isinstance(temperature, float) else None
    rgb = own if own is not None else prediction_to_rgb(bins.decode(pred, temperature), y, "uv")
    rows = [loss, psnr(rgb, x), ssim(rgb, x), colourfulness(rgb)]
    for t in CURVE_TEMPERATURES:
        rows += [psnr(decoded[t], x), colourfulness(decoded[t])]
    return torch.stack([r.flatten() for r in rows])


def _flips_averaged(pred: torch.Tensor, mirrored: torch.Tensor, classes: ChromaBins | None, dim: int) -> torch.Tensor:
    """Test-time flip averaging of a prediction and the un-mirrored prediction for the mirrored input:
    a classification head's probabilities (study.engine.chroma.average_flipped), other outputs themselves."""
    return average_flipped(pred, mirrored, dim) if classes is not None else (pred + mirrored) / 2


def predict(model: torch.nn.Module, y: torch.Tensor, precision: str | None = None, flip: bool = False) -> torch.Tensor:
    """One model's output (float) for luma ``y`` (inference); ``flip``: test-time flip averaging (colours
    the model is unsure of by side get averaged)."""
    with autocast_for(y.device, precision):
        pred = model(y).float()
        if flip:
            mirrored = model(y.flip(3)).float().flip(3)
            pred = _flips_averaged(pred, mirrored, getattr(model, "classes", None), 1)
    return pred


def member_predictions(fused: FusedUNet, terms: PackTerms, y: torch.Tensor, precision: str) -> torch.Tensor:
    """Every member's prediction (B, K, C, H, W), float, for luma ``y`` (B, 1, H, W); flip-averaged for the
    members with tta_flip."""
    inp = y.expand(-1, fused.k, -1, -1).contiguous(memory_format=torch.channels_last)
    with autocast_for(y.device, precision):
        pred = fused(inp).float()
        if terms.flip is not False:
            both = _flips_averaged(pred, fused(inp.flip(3)).float().flip(4), fused.classes, 2)
            pred = both if terms.flip is True else torch.where(terms.member_view(terms.flip, 1, 5), both, pred)
    return pred


@torch.no_grad()
def evaluate_members(fused: FusedUNet, terms: PackTerms, split: EvalSplit, batch_size: int,
                     precision: str | None) -> torch.Tensor:
    """Every member's totals over ``split``, (K, 4) (regression_row_metrics), or with a classification head
    (K, 4 + 2 * len(CURVE_TEMPERATURES)) (class_row_metrics); float64, left on the device (no sync)."""
    was_training = fused.training
    fused.eval()
    k, sums = fused.k, None
    for x, y in split.batches(batch_size):
        b = x.shape[0]
        pred = member_predictions(fused, terms, y, precision).transpose(0, 1).flatten(0, 1)  # (K*B, ...) member-major
        xk = x.unsqueeze(0).expand(k, -1, -1, -1, -1).flatten(0, 1)
        yk = y.unsqueeze(0).expand(k, -1, -1, -1, -1).flatten(0, 1)
        if fused.classes is not None:
            rows = class_row_metrics(pred, xk, yk, fused.classes, terms.temperatures(b))
        else:
            rows = regression_row_metrics(pred, xk, yk, fused.output, lambda p, t: member_loss(
                p.unflatten(0, (k, -1)), t.unflatten(0, (k, -1)), terms, member_dim=0).flatten(0, 1))
        batch = rows.view(rows.shape[0], k, b).sum(2).double()
        sums = batch if sums is None else sums + batch
    fused.train(was_training)
    return sums.T


@torch.no_grad()
def evaluate(model: UNet, images: DeviceImages | EvalSplit, cfg: TrialConfig, batch_size: int = 256,
             precision: str | None = None) -> dict:
    """One model's metrics as a run's rows hold them (evaluate_members of a pack of one): loss in its own
    space; PSNR, SSIM and colourfulness in RGB; the grayscale baseline."""
    split = images if isinstance(images, EvalSplit) else EvalSplit.prepare(images, batch_size)
    terms = PackTerms.of([cfg], model.classes, split.images.device)
    sums = evaluate_members(FusedUNet([model]), terms, split, split.batch_size, precision)[0]
    return split.metrics(sums.tolist(), curve=True)


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
def member_previews(fused: FusedUNet, terms: PackTerms, test: DeviceImages, count: int,
                    precision: str | None) -> list[dict[str, bytes]]:
    """Each member's ``{prediction_<index>.png: png}`` of the preview images (at its own temperature)."""
    idx = preview_indices(len(test), count)
    if not idx:
        return [{} for _ in range(fused.k)]
    x = test.take(torch.tensor(idx, device=test.device))
    y = rgb_to_y(x)
    was_training = fused.training
    fused.eval()
    pred = member_predictions(fused, terms, y, precision)
    fused.train(was_training)
    if fused.classes is not None:
        pred = torch.stack([fused.classes.decode(pred[:, j], terms.temperature_of(j)) for j in range(fused.k)], 1)
    return [prediction_pngs(prediction_to_rgb(pred[:, j], y, fused.output), idx) for j in range(fused.k)]
