"""The classification head's chroma (``output: uv-classes``): bins of a fixed UV grid, soft targets,
class rebalancing, the cross-entropy and the annealed-mean decoding (Zhang, Isola and Efros, "Colorful
Image Colorization", ECCV 2016, moved from Lab's ab plane to the project's YUV).

Scale: Zhang's grid step is 10 ab units and the soft targets' sigma 5. Saturated primaries measure about
100-135 ab units from gray in Lab and 0.45-0.63 in UV, so one UV unit is about 200 ab units: the grid
step here is 0.05 and sigma 0.025. The grid spans YUV's gamut (|U| <= 0.436, |V| <= 0.615): 19 x 27
cells, of which RGB can reach ``GAMUT_BINS`` (study.config); a trial uses the cells its training split's pixels fall
in (``used_bins``, a few hundred thousand sampled pixels: tens of milliseconds on a CPU, so it is done
at every trial start instead of being cached).
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import nn

from study.engine.color import UV_MAX, rgb_to_yuv

UV_GRID = 0.05               # the grid step (study.config's GAMUT_BINS counts the cells RGB reaches)
SIGMA = UV_GRID / 2          # Zhang's 5 ab units at 10 per cell
NEIGHBOURS = 5               # soft targets: the 5 nearest bins, Gaussian-weighted
HALF = (math.ceil(UV_MAX[0] / UV_GRID - 1e-9), math.ceil(UV_MAX[1] / UV_GRID - 1e-9))   # (9, 13)
CELLS = (2 * HALF[0] + 1) * (2 * HALF[1] + 1)                                              # 513
# Pixels sampled to find a split's bins and their frequencies (evenly strided over the split).
SAMPLE_PIXELS = 1 << 20
# gray_start: the head's biases are -|c|^2 / (2 GRAY_SPREAD^2), a broad bump on the bin nearest gray (0, 0)
# whose annealed mean is gray for a centrally symmetric bin set (the gamut's) and within 0.0004 of it for
# CIFAR-10's bins. A peak on the gray bin alone (a large bias there) would start at gray too, but the
# other logits would need thousands of Adam steps to catch up; here the common colours within 0.2 of gray
# start 0.5-2 logits down.
GRAY_SPREAD = 2 * UV_GRID


def cell_of(uv: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """The full grid's cell index (0..CELLS-1) of each UV pair along ``dim``."""
    u, v = uv.unbind(dim)
    i = torch.round(u / UV_GRID).long().clamp(-HALF[0], HALF[0]) + HALF[0]
    j = torch.round(v / UV_GRID).long().clamp(-HALF[1], HALF[1]) + HALF[1]
    return i * (2 * HALF[1] + 1) + j


def cell_centers(device=None) -> torch.Tensor:
    """(CELLS, 2) UV centres of the full grid, in cell_of's order."""
    i = torch.arange(-HALF[0], HALF[0] + 1, device=device, dtype=torch.float32)
    j = torch.arange(-HALF[1], HALF[1] + 1, device=device, dtype=torch.float32)
    return torch.stack(torch.meshgrid(i, j, indexing="ij"), -1).reshape(-1, 2) * UV_GRID


@lru_cache(maxsize=1)
def _gamut_cells() -> tuple[int, ...]:
    # Every 8-bit-ish RGB colour (a 64-level cube): the cells RGB can reach at all.
    levels = torch.linspace(0, 1, 64)
    rgb = torch.stack(torch.meshgrid(levels, levels, levels, indexing="ij"), 0).reshape(1, 3, -1, 1)
    return tuple(torch.unique(cell_of(rgb_to_yuv(rgb)[:, 1:]).flatten()).tolist())


def gamut_bins() -> tuple[torch.Tensor, torch.Tensor]:
    """(centres, uniform prior) of every cell RGB can reach: a model built without a split's bins
    (plan timing, tests) has these GAMUT_BINS classes."""
    cells = torch.tensor(_gamut_cells())
    return cell_centers()[cells], torch.full((len(cells),), 1.0 / len(cells))


# The bins CIFAR-10's training split uses (40,000 photos); natural photos leave the most saturated cells empty.
PHOTO_BINS = 244


def photo_bins(count: int = PHOTO_BINS) -> tuple[torch.Tensor, torch.Tensor]:
    """(centres, uniform prior) of the ``count`` gamut cells nearest gray: a head the size a photo
    dataset's gives, for timing without the data (study.plan). The head's cost is not linear in its
    bins: on a CPU the softmax over all 347 gamut bins took 3.5x that over 244."""
    centers, _ = gamut_bins()
    keep = centers.norm(dim=1).argsort()[:count].sort().values
    return centers[keep], torch.full((len(keep),), 1.0 / len(keep))


@torch.no_grad()
def used_bins(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(centres (Q, 2), frequencies (Q,)) of the grid cells a split's pixels fall in; ``images`` uint8
    NHWC (a DeviceImages' tensor). Deterministic: an even stride over the split's pixels."""
    pixels = images.reshape(-1, 3)
    step = max(1, pixels.shape[0] // SAMPLE_PIXELS)
    rgb = pixels[::step].float().div(255).T.reshape(1, 3, -1, 1)
    counts = torch.bincount(cell_of(rgb_to_yuv(rgb)[:, 1:]).flatten(), minlength=CELLS).double()
    used = torch.nonzero(counts).flatten()
    prior = counts[used] / counts.sum()
    return cell_centers(images.device)[used].cpu(), prior.float().cpu()


def smoothed(prior: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """The frequencies smoothed by a Gaussian of SIGMA over the bins (Zhang's p-tilde), mass kept."""
    k = torch.exp(-torch.cdist(centers.double(), centers.double()).square() / (2 * SIGMA ** 2))
    return (k / k.sum(0, keepdim=True)) @ prior.double()


def rebalance_weights(prior: torch.Tensor, centers: torch.Tensor, rebalance: float) -> torch.Tensor:
    """Per-class loss weights ``1 / (r p~ + (1 - r) / Q)``, normalised so their expectation under p~ is 1.

    ``rebalance`` r = 0: every weight 1 (the empirical distribution is learnt); r = 1: ``1 / (Q p~)``
    (every class carries the same weighted mass, as if colours were uniform); Zhang et al. used r = 0.5."""
    p = smoothed(prior, centers)
    w = 1.0 / (rebalance * p + (1.0 - rebalance) / len(p))
    return (w / (p * w).sum()).float()


class ChromaBins(nn.Module):
    """A uv-classes model's bins: ``centers`` and ``prior`` (the training split's frequencies) are saved
    with its weights, so a checkpoint rebuilds and decodes alone; the cell lookups are derived."""

    def __init__(self, centers: torch.Tensor, prior: torch.Tensor):
        super().__init__()
        self.register_buffer("centers", centers.float().clone())
        self.register_buffer("prior", prior.float().clone())
        cells = cell_of(self.centers, dim=1)
        to_bin = torch.full((CELLS,), -1, dtype=torch.long)
        to_bin[cells] = torch.arange(len(cells))
        # Every cell's nearest bin: the target of a colour whose neighbourhood holds no bin.
        nearest = torch.cdist(cell_centers(), self.centers).argmin(1)
        self.register_buffer("to_bin", to_bin, persistent=False)
        self.register_buffer("nearest", nearest, persistent=False)

    def __len__(self) -> int:
        return self.centers.shape[0]

    def gray_logits(self) -> torch.Tensor:
        """gray_start's head biases (see GRAY_SPREAD)."""
        return -self.centers.square().sum(1) / (2 * GRAY_SPREAD ** 2)

    def soft_targets(self, uv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(bin indices, weights), each (N, NEIGHBOURS, H, W), for target chroma ``uv`` (N, 2, H, W): the
        nearest bins among the 3 x 3 cells around the colour, weighted by a Gaussian of SIGMA, summing to
        1; the first is the nearest. A colour with no bin around it gets its nearest bin, weight 1."""
        n, _, h, w = uv.shape
        grid = torch.round(uv / UV_GRID)                                             # (N, 2, H, W)
        steps = torch.tensor([(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1)], device=uv.device,
                             dtype=uv.dtype).view(1, 9, 2, 1, 1)
        cand = grid.unsqueeze(1) + steps                                             # (N, 9, 2, H, W)
        d2 = (cand * UV_GRID - uv.unsqueeze(1)).square().sum(2)                      # (N, 9, H, W)
        half = torch.tensor(HALF, device=uv.device, dtype=uv.dtype).view(1, 1, 2, 1, 1)
        inside = (cand.abs() <= half).all(2)
        ij = (cand.clamp(-half, half) + half).long()
        bins = self.to_bin[ij[:, :, 0] * (2 * HALF[1] + 1) + ij[:, :, 1]]          # (N, 9, H, W), -1: none
        weight = torch.exp(-d2 / (2 * SIGMA ** 2)) * (inside & (bins >= 0))
        top, pick = weight.topk(NEIGHBOURS, dim=1)
        idx = bins.gather(1, pick).clamp_min(0)
        total = top.sum(1, keepdim=True)
        fallback = self.nearest[cell_of(uv)].unsqueeze(1)                            # (N, 1, H, W)
        none = total <= 0
        first = torch.zeros_like(top)
        first[:, 0] = 1.0
        weights = torch.where(none, first, top / total.clamp_min(1e-30))
        idx = torch.where(none, torch.cat([fallback, idx[:, 1:]], 1), idx)
        return idx, weights

    def decode(self, logits: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
        """The annealed mean: ``softmax(logits / T)`` over dim 1 times the bin centres -> (N, 2, H, W) UV.
        T = 1 is the expected colour, T -> 0 the mode; ``temperature`` may be a tensor that broadcasts
        over (N, 1, 1, 1) (a pack's members' own). Each pixel's largest logit is taken off before dividing by T:
        every logit is then <= 0, so no T > 0, however small, overflows to inf (whose softmax is NaN: gray). A T
        below float32's smallest normal number decodes as that number (in float32 it would be 0): the mode."""
        z = logits.float()
        tiny = torch.finfo(torch.float32).tiny
        t = temperature.clamp_min(tiny) if torch.is_tensor(temperature) else max(temperature, tiny)
        p = torch.softmax((z - z.amax(1, keepdim=True)) / t, dim=1)
        return torch.einsum("nqhw,qc->nchw", p, self.centers)


def class_loss(logits: torch.Tensor, uv: torch.Tensor, bins: ChromaBins, class_weights: torch.Tensor | None
               ) -> torch.Tensor:
    """Per-pixel cross-entropy (N, H, W) of ``logits`` (N, Q, H, W) against the soft targets of ``uv``,
    times the rebalancing weight of each pixel's nearest bin; ``class_weights`` (Q,), or (N, Q) (each
    image its member's), or None (no rebalancing)."""
    idx, w = bins.soft_targets(uv)
    logp = torch.log_softmax(logits.float(), dim=1)
    loss = -(w * logp.gather(1, idx)).sum(1)
    if class_weights is None:
        return loss
    if class_weights.dim() == 1:
        return loss * class_weights[idx[:, 0]]
    return loss * class_weights.gather(1, idx[:, 0].flatten(1)).view_as(loss)


def average_flipped(logits: torch.Tensor, mirrored: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Test-time flip averaging for a classification head: the log of the mean of the two probability
    distributions (not of the logits), which decode() anneals as any logits."""
    return torch.logaddexp(torch.log_softmax(logits, dim), torch.log_softmax(mirrored, dim)) - math.log(2)


def bins_of(state_dict: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(centres, prior) saved in a uv-classes model's state dict (None for other heads)."""
    if "classes.centers" not in state_dict:
        return None
    return state_dict["classes.centers"], state_dict["classes.prior"]

