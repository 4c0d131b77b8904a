"""The training loss: each loss name's formula (one place for the single model's and the fused pack's
forms), the chroma weighting, one model's batch -> loss step, and the divergence error."""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F

from study.config import TrialConfig
from study.engine.chroma import class_loss, rebalance_weights
from study.engine.color import rgb_to_y, target_for
from study.engine.device import autocast_for, compiled

# Huber's quadratic zone: colour errors in [0, 1] RGB or UV are mostly below 0.1, so delta 1 would be
# MSE; at 0.1 large errors (ambiguous colours) weigh linearly, as in L1, small ones quadratically.
HUBER_DELTA = 0.1


class NonFiniteLossError(RuntimeError):
    """Training diverged; the trial (or the pack member) ends as ERROR with this message."""


def divergence(train_loss: float, epoch: int, cfg: TrialConfig) -> NonFiniteLossError:
    return NonFiniteLossError(f"training loss became {train_loss} in epoch {epoch} "
                              f"(lr={cfg.lr}, loss={cfg.loss}); lower the learning rate")


def loss_fn(name: str):
    """``f(pred, target, reduction=...)`` for loss ``name``: torch's own kernels, for one model."""
    if name == "huber":
        return functools.partial(F.huber_loss, delta=HUBER_DELTA)
    return F.l1_loss if name == "l1" else F.mse_loss


def elementwise_loss(diff: torch.Tensor, name: str) -> torch.Tensor:
    """Loss ``name`` of each element of ``diff`` (prediction - target): loss_fn's formulas written out, for
    a fused pack that picks each member's with a mask (tests/test_engine_levers.py checks they agree)."""
    if name == "l1":
        return diff.abs()
    if name == "huber":
        a = diff.abs()  # F.huber_loss's formula
        return torch.where(a < HUBER_DELTA, 0.5 * diff.square(), HUBER_DELTA * (a - 0.5 * HUBER_DELTA))
    return diff.square()


def chroma_weights(uv: torch.Tensor, strength: float | torch.Tensor, channel_dim: int = 1,
                   member_dim: int | None = None) -> torch.Tensor:
    """Per-pixel loss weights for target chroma ``uv``: ``(1 + strength * c / mean(c)) / (1 + strength)``,
    with ``c`` each pixel's |UV|, so they average 1 over the batch (over each member's, with ``member_dim``).

    A per-pixel regression colorizer paints the mean of the plausible colours, which is washed out; weighting
    saturated pixels more (a regression analogue of Zhang et al. 2016's class rebalancing) trades PSNR for
    colour. For a pack ``strength`` is a tensor that broadcasts along ``member_dim``.
    """
    c = uv.square().sum(channel_dim, keepdim=True).sqrt()
    dims = [d for d in range(c.dim()) if d != member_dim]
    return (1 + strength * c / c.mean(dim=dims, keepdim=True).clamp_min(1e-6)) / (1 + strength)


def make_loss_step(model: torch.nn.Module, cfg: TrialConfig, device: torch.device, precision: str,
                   mode: str | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x (RGB batch) -> scalar training loss``: colour conversion, forward and loss; compiled if asked."""
    lossf = loss_fn(cfg.loss)
    bins = getattr(model, "classes", None)
    weights = (rebalance_weights(bins.prior.cpu(), bins.centers.cpu(), cfg.rebalance).to(device)
               if bins is not None and cfg.rebalance > 0 else None)

    def forward_loss(x: torch.Tensor) -> torch.Tensor:
        return model_loss(model, cfg, lossf, device, precision, x, weights)

    return compiled(forward_loss, mode)


def model_loss(model: torch.nn.Module, cfg: TrialConfig, lossf, device: torch.device, precision: str,
               x: torch.Tensor, class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """One model's training loss on RGB batch ``x``: its forward under autocast, then ``cfg``'s loss (a
    classification head's: the cross-entropy against soft targets, rebalanced by ``class_weights``)."""
    y = rgb_to_y(x)
    with autocast_for(device, precision):
        pred = model(y)
    if cfg.output == "uv-classes":
        uv = target_for(x, "uv")
        loss = class_loss(pred, uv, model.classes, class_weights)
        if cfg.chroma_weight > 0:
            loss = loss * chroma_weights(uv, cfg.chroma_weight)[:, 0]
        return loss.mean()
    if cfg.chroma_weight > 0:
        return (lossf(pred.float(), target_for(x, cfg.output), reduction="none")
                * chroma_weights(target_for(x, "uv"), cfg.chroma_weight)).mean()
    return lossf(pred.float(), target_for(x, cfg.output))
