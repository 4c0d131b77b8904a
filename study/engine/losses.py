"""The training loss, one definition for a pack of one and a pack of K: each member's elementwise loss
(study.engine.terms, which the evaluation shares), the chroma weighting, a classification head's
rebalanced cross-entropy, the adversarial term, and the divergence error.

A member's loss is the mean over its own batch; members' parameters are disjoint, so the sum of the
(K,) losses has each member's own gradient. Terms every member shares run as plain numbers (study.engine.terms).
"""
from __future__ import annotations

import functools
from typing import Callable

import torch

from study.config import TrialConfig
from study.engine.adversarial import Critic, predicted_uv
from study.engine.chroma import class_loss
from study.engine.color import rgb_to_y, target_for
from study.engine.device import autocast_for, compiled
from study.engine.fused import FusedUNet
from study.engine.terms import PackTerms, member_loss


class NonFiniteLossError(RuntimeError):
    """Training diverged; the trial (or the pack member) ends as ERROR with this message."""


def divergence(train_loss: float, epoch: int, cfg: TrialConfig) -> NonFiniteLossError:
    return NonFiniteLossError(f"training loss became {train_loss} in epoch {epoch} "
                              f"(lr={cfg.lr}, loss={cfg.loss}); lower the learning rate")


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


def member_losses(fused: FusedUNet, terms: PackTerms, precision: str, x: torch.Tensor):
    """(each member's loss (K,), luma (B, K, H, W), predictions (B, K, C, H, W)) on batches ``x`` (K, B, 3, H, W)."""
    k = fused.k
    flat = x.flatten(0, 1)                                                  # (K*B, 3, H, W)

    def per_member(t: torch.Tensor) -> torch.Tensor:                       # (K*B, ...) -> (B, K, ...)
        return t.unflatten(0, (k, -1)).transpose(0, 1)

    y = per_member(rgb_to_y(flat)).squeeze(2)                               # (B, K, H, W)
    with autocast_for(x.device, precision):
        pred = fused(y.contiguous(memory_format=torch.channels_last))     # (B, K, C, H, W)
    weighted = isinstance(terms.chroma, torch.Tensor) or terms.chroma > 0
    uv = (per_member(target_for(flat, "uv"))                                # (B, K, 2, H, W)
          if weighted or fused.classes is not None or fused.output == "uv" else None)
    if fused.classes is not None:
        weights = terms.class_weights
        if weights is not None and weights.dim() == 2:
            weights = weights.repeat_interleave(x.shape[1], 0)              # each image its member's
        logits = pred.transpose(0, 1).flatten(0, 1)                         # (K*B, Q, H, W) member-major
        loss = class_loss(logits, uv.transpose(0, 1).flatten(0, 1), fused.classes, weights)
        loss = per_member(loss).unsqueeze(2)                                # (B, K, 1, H, W)
    else:
        target = uv if fused.output == "uv" else per_member(target_for(flat, fused.output))
        loss = member_loss(pred.float(), target, terms, member_dim=1)
    if weighted:   # members without it get weights of exactly 1
        loss = loss * chroma_weights(uv, terms.member_view(terms.chroma, 1, 5), channel_dim=2, member_dim=1)
    return loss.mean(dim=(0, 2, 3, 4)), y, pred


class PackLoss:
    """``x (K, B, 3, H, W) -> (K,)``: every member's training loss on its own batch (member_losses), plus
    ``w * softplus(-D(fake))`` for members with a discriminator (study.engine.adversarial); after the
    colorizers' optimizer step, ``after_step()`` updates those discriminators on the same batch.

    Compiled when asked (study.engine.device.compile_mode) unless there are discriminators: their
    updates run eagerly between steps.
    """

    def __init__(self, fused: FusedUNet, terms: PackTerms, critics: list[Critic | None], precision: str,
                 mode: str | None = None):
        self.fused, self.terms = fused, terms
        self.critics = critics if any(c is not None for c in critics) else None
        losses = functools.partial(member_losses, fused, terms, precision)
        self._losses: Callable = losses if self.critics else compiled(lambda x: losses(x)[0], mode)
        self._pending: list[tuple] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.critics is None:
            return self._losses(x)
        loss, y, pred = self._losses(x)
        return loss + self.terms.adversarial * self._generator_terms(x, y, pred)

    def _generator_terms(self, x: torch.Tensor, y: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """Each member's unweighted ``softplus(-D(fake))`` (0 without a discriminator), (K,); keeps the
        batch for after_step."""
        real = target_for(x.flatten(0, 1), "uv").unflatten(0, (self.fused.k, -1))    # (K, B, 2, H, W)
        self._pending, out = [], []
        for k, critic in enumerate(self.critics):
            if critic is None:
                out.append(pred.new_zeros((), dtype=torch.float32))
                continue
            yk = y[:, k:k + 1]
            fake = predicted_uv(pred[:, k], self.fused.classes, self.fused.output, self.terms.temperature_of(k))
            out.append(critic.generator_loss(yk, fake))
            self._pending.append((critic, yk.detach(), fake.detach(), real[k]))
        return torch.stack(out)

    def after_step(self) -> None:
        for critic, y, fake, real in self._pending:
            critic.step(y, fake, real)
        self._pending = []
