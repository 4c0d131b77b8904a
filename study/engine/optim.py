"""What a member's weights are updated with: Adam(W), the learning-rate schedule and the weight average."""
from __future__ import annotations

import copy
import itertools

import torch
from torch.optim.swa_utils import get_ema_multi_avg_fn

from study.config import TrialConfig


def make_optimizer(params, lr: float, device: torch.device, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """Adam, or AdamW with decoupled ``weight_decay`` when it is > 0."""
    # Fused on a GPU: one kernel for all parameters and its step counts stay on the device
    # (the foreach path reads them back, a sync per step). foreach on the CPU.
    impl = {"fused": True} if device.type == "cuda" else {"foreach": True}
    if weight_decay > 0:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **impl)
    return torch.optim.Adam(params, lr=lr, **impl)


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrialConfig, total_steps: int, steps_per_epoch: int = 0):
    """The per-step learning-rate schedule; ``cfg.warmup_epochs`` of linear warm-up come first."""
    total = max(total_steps, 1)
    warm = min(cfg.warmup_epochs * steps_per_epoch, total - 1)
    lrs = torch.optim.lr_scheduler
    if cfg.schedule == "onecycle":  # its own warm-up phase takes the warm-up's length
        pct = warm / total if warm > 0 else 0.3
        return lrs.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=pct)
    if warm <= 0:
        return lrs.CosineAnnealingLR(opt, T_max=total) if cfg.schedule == "cosine" else None
    warmup = lrs.LinearLR(opt, start_factor=1 / (warm + 1), end_factor=1.0, total_iters=warm)
    if cfg.schedule == "cosine":
        return lrs.SequentialLR(opt, [warmup, lrs.CosineAnnealingLR(opt, T_max=max(total - warm, 1))],
                                milestones=[warm])
    return warmup


class WeightAverage:
    """An exponential moving average of a model's weights and BatchNorm statistics, in its own copy of
    the model (``.model``), updated on the device without a sync (torch's ``AveragedModel`` reads its
    update count back on every update)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.source = model
        self.model = copy.deepcopy(model).requires_grad_(False)
        self.updates = 0
        self._step_decay, self._step = None, None   # torch's EMA step for the current decay
        self._avg, self._src = self._floats(self.model), self._floats(model)
        self._avg_int, self._src_int = self._ints(self.model), self._ints(model)

    def follow(self, live: dict[int, torch.Tensor]) -> None:
        """Average from ``live`` tensors in place of the source model's own (keyed by their id): a fused
        pack (study.engine.fused) updates its members' BatchNorm statistics in its own buffers during an epoch."""
        self._src = [live.get(id(t), t) for t in self._floats(self.source)]

    @torch.no_grad()
    def sync_counts(self) -> None:
        """Copy the integer buffers (BatchNorm batch counts) again, after a pack has synced them."""
        for a, s in zip(self._avg_int, self._src_int):
            a.copy_(s)

    @staticmethod
    def _floats(m):
        return [t for t in itertools.chain(m.parameters(), m.buffers()) if t.is_floating_point()]

    @staticmethod
    def _ints(m):
        return [t for t in m.buffers() if not t.is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        # Warm-up of the decay (as in TensorFlow's and timm's EMA): early averages do not drag in
        # the random initial weights for thousands of steps.
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        if decay != self._step_decay:   # made again only while the decay warms up
            self._step_decay, self._step = decay, get_ema_multi_avg_fn(decay)
        # torch's own EMA step (AveragedModel's multi_avg_fn): one lerp over all tensors, on the device.
        self._step(self._avg, self._src, self.updates)
        for a, s in zip(self._avg_int, self._src_int):
            a.copy_(s)
