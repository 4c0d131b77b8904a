"""The members still training, as one step: their fused model, terms and loss, their batches, one
optimizer step of all of them, and the model an epoch's evaluation scores.

The step keeps a GPU busy: no host synchronisation inside it (colour constants are cached per
device, augmentation offsets and losses stay on the device).
"""
from __future__ import annotations

from typing import Iterator

import torch

from study.engine.data import DeviceImages, augment_batch
from study.engine.fused import FusedUNet
from study.engine.losses import PackLoss
from study.engine.member import Member
from study.engine.terms import PackTerms


def train_batches(train: DeviceImages, members: list[Member], batch_size: int) -> Iterator[torch.Tensor]:
    """Per step, each member's batch stacked as (K, B, 3, H, W).

    Draws from each member's generator in the order DeviceImages.train_batches does (a permutation per
    epoch, then the augmentation's draws per batch), so a member sees exactly the batches its trial
    would see alone; one gather serves all.
    """
    n = len(train)
    perms = torch.stack([torch.randperm(n, device=train.device, generator=m.gen) for m in members])
    stop = max(n - batch_size + 1, 1) if n >= batch_size else 1
    for start in range(0, stop, batch_size):
        x = train.to_float(train.images[perms[:, start:start + batch_size]].flatten(0, 1))
        x = x.unflatten(0, (len(members), -1))
        if any(m.augment > 0 for m in members):
            x = torch.stack([augment_batch(x[k], m.gen, m.augment) if m.augment > 0 else x[k]
                             for k, m in enumerate(members)])
        yield x


class PackStep:
    """``members`` fused (study.engine.fused), their terms (study.engine.terms) and loss (study.engine.losses);
    built again when the membership changes (a compiled step recompiles then)."""

    def __init__(self, members: list[Member], device: torch.device, precision: str, mode: str | None = None):
        self.members = members
        self.fused = FusedUNet([m.model for m in members]).train()
        self.terms = PackTerms.of([m.cfg for m in members], self.fused.classes, device)
        self.loss = PackLoss(self.fused, self.terms, [m.critic for m in members], precision, mode)
        self._ones = torch.ones(len(members), device=device)   # d(sum of losses)/d(each member's loss)
        for k, m in enumerate(members):
            if m.average:   # it averages the statistics training updates, in the fused model's buffers
                m.average.follow(self.fused.live_buffers(k))

    def batches(self, train: DeviceImages, batch_size: int) -> Iterator[torch.Tensor]:
        return train_batches(train, self.members, batch_size)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """One optimizer step of every member on its own batch ``x[k]``; the (K,) losses, unsynced."""
        per_member = self.loss(x)
        for m in self.members:
            m.opt.zero_grad(set_to_none=True)
        # Members' parameters are disjoint: the gradient of their losses' sum is each one's own loss gradient.
        per_member.backward(self._ones)
        for m in self.members:
            m.opt.step()
            if m.sched is not None:
                m.sched.step()
            if m.average is not None:
                m.average.update()
        self.loss.after_step()
        self.fused.steps += 1
        return per_member.detach()

    def evaluated(self) -> FusedUNet:
        """At an epoch's end: the members' BatchNorm statistics handed back to them, and the model to
        evaluate (with ema, the members' averaged weights)."""
        self.fused.sync_members()
        averages = [m.average for m in self.members if m.average]
        for average in averages:
            average.sync_counts()
        return FusedUNet([m.evaluated for m in self.members]) if averages else self.fused
