"""What the members of a pack may differ in besides their weights, in the form the loss and the
evaluation read: loss name, chroma weighting, test-time flip averaging, a classification head's
decoding temperature and class rebalancing, and the adversarial weight; and each loss name's
elementwise formula, per member (``member_loss``: the training loss's and the evaluation's).

One rule for every term, whatever the number of members: a value all members share is a plain
number (its formula then runs as for one model: no mask, no per-member tensor), and values that
differ become (K,) tensors on the device, made once per membership (a copy to the device in every
step would be a host sync). A pack of one is the case where every value is shared.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from study.config import TrialConfig
from study.engine.chroma import ChromaBins, rebalance_weights


def shared_or_each(values: list, device: torch.device) -> float | bool | str | torch.Tensor:
    """The one value every member has, or each member's as a (K,) tensor on ``device``."""
    if all(v == values[0] for v in values):
        return values[0]
    return torch.tensor(values, device=device)


@dataclass(frozen=True)
class PackTerms:
    """Per-member terms; each is shared (a plain value) or a (K,) tensor (see shared_or_each)."""
    k: int
    loss: str | None                  # the loss every member uses; None when they differ (then masks)
    l1: torch.Tensor | None           # (K,) bool: the members with l1 when members differ in loss
    huber: torch.Tensor | None        # (K,) bool: the members with huber
    chroma: float | torch.Tensor      # chroma weighting strength (0: none)
    flip: bool | torch.Tensor         # test-time flip averaging
    temperature: float | torch.Tensor  # a classification head's decoding temperature
    class_weights: torch.Tensor | None  # rebalancing: (Q,) shared, (K, Q) each member's, None: none
    adversarial: float | torch.Tensor  # the weight w of the discriminator's term (0: none)

    @classmethod
    def of(cls, cfgs: list[TrialConfig], classes: ChromaBins | None, device: torch.device) -> PackTerms:
        """The terms of members ``cfgs``; ``classes``: their classification head's bins (None: no such head)."""
        names = [c.loss for c in cfgs]
        shared = len(set(names)) == 1
        masks = {name: torch.tensor([n == name for n in names], device=device)
                 if not shared and name in names else None for name in ("l1", "huber")}
        return cls(k=len(cfgs), loss=names[0] if shared else None, **masks,
                   chroma=shared_or_each([c.chroma_weight for c in cfgs], device),
                   flip=shared_or_each([c.tta_flip for c in cfgs], device),
                   temperature=shared_or_each([c.temperature for c in cfgs], device),
                   class_weights=_class_weights(cfgs, classes, device),
                   adversarial=shared_or_each([c.adversarial for c in cfgs], device))

    def temperature_of(self, k: int) -> float | torch.Tensor:
        """Member ``k``'s decoding temperature."""
        t = self.temperature
        return t[k] if isinstance(t, torch.Tensor) else t

    def temperatures(self, b: int) -> float | torch.Tensor:
        """Each row's temperature for member-major rows of ``b`` images per member: shared, or (K*b, 1, 1, 1)."""
        t = self.temperature
        return t.repeat_interleave(b).view(-1, 1, 1, 1) if isinstance(t, torch.Tensor) else t

    def member_view(self, value: float | bool | torch.Tensor, dim: int, ndim: int) -> float | bool | torch.Tensor:
        """A term broadcast along axis ``dim`` of ``ndim``-dimensional tensors (a shared value as it is)."""
        if not isinstance(value, torch.Tensor):
            return value
        shape = [1] * ndim
        shape[dim] = self.k
        return value.view(shape)


def _class_weights(cfgs: list[TrialConfig], classes: ChromaBins | None,
                   device: torch.device) -> torch.Tensor | None:
    strengths = [c.rebalance for c in cfgs]
    if classes is None or not any(strengths):
        return None
    prior, centers = classes.prior.cpu(), classes.centers.cpu()
    if all(s == strengths[0] for s in strengths):
        return rebalance_weights(prior, centers, strengths[0]).to(device)
    return torch.stack([rebalance_weights(prior, centers, s) for s in strengths]).to(device)


# Huber's quadratic zone: colour errors in [0, 1] RGB or UV are mostly below 0.1, so delta 1 would be
# MSE; at 0.1 large errors (ambiguous colours) weigh linearly, as in L1, small ones quadratically.
HUBER_DELTA = 0.1
# Each loss name's formula: torch's own kernels, elementwise (reduction="none").
ELEMENTWISE = {"mse": F.mse_loss, "l1": F.l1_loss, "huber": functools.partial(F.huber_loss, delta=HUBER_DELTA)}


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, name: str) -> torch.Tensor:
    """Loss ``name`` (mse, l1, huber) of each element of ``pred`` against ``target``."""
    return ELEMENTWISE[name](pred, target, reduction="none")


def member_loss(pred: torch.Tensor, target: torch.Tensor, terms: PackTerms, member_dim: int) -> torch.Tensor:
    """Each member's elementwise loss of ``pred`` against ``target``, whose axis ``member_dim`` is the members'."""
    if terms.loss is not None:
        return elementwise_loss(pred, target, terms.loss)
    out = elementwise_loss(pred, target, "mse")
    for name, where in (("l1", terms.l1), ("huber", terms.huber)):
        if where is not None:
            mask = terms.member_view(where, member_dim, pred.dim())
            out = torch.where(mask, elementwise_loss(pred, target, name), out)
    return out
