"""K members' models as one grouped-convolution model, and what the training loop does with it: the
batches, the loss, the optimizer step, the evaluation and the previews of all members at once.

Member k's activations are channel group k of one tensor, so every convolution runs with ``groups=K``
and BatchNorm over the fused channels is per member by construction. Each member keeps its own
parameter tensors (they ARE a plain ``study.engine.models.UNet``); the fused forward concatenates them per
layer. With one member (a single trial) every function here runs that member's model and the single
model's formulas directly (no concatenation, no masks): a trial costs what it cost before packs
existed (docs/throughput.md has the figures).

Why grouped convolutions rather than ``torch.func.stack_module_state`` + ``vmap``: BatchNorm's running
statistics are in-place buffer updates that vmap does not batch, the grouped form needs nothing but
plain kernels (CPU, CUDA graphs and ``torch.compile`` all take it), and it was measured fast on an
H100 (8 fused UNets 185k model-images/s, 32 fused 222k, one model 76k).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import nn

from study.engine.adversarial import AdversarialLoss
from study.engine.chroma import ChromaBins, average_flipped, class_loss, rebalance_weights
from study.engine.color import prediction_to_rgb, rgb_to_y, target_for
from study.engine.data import DeviceImages, augment_batch, preview_indices
from study.engine.device import autocast_for, compiled
from study.engine.evaluation import EvalSplit, class_row_metrics, evaluate_sums, predict, prediction_pngs
from study.engine.losses import chroma_weights, elementwise_loss, loss_fn, model_loss
from study.engine.metrics import colourfulness, psnr, ssim
from study.engine.models import UNet

if TYPE_CHECKING:
    from study.engine.loop import Member


def _dropout_of(seq: nn.Sequential) -> float:
    return next((m.p for m in seq if isinstance(m, nn.Dropout2d)), 0.0)


class FusedUNet(nn.Module):
    """K ``UNet`` members as one model: input (B, K, H, W) luma, output (B, K, C, H, W)."""

    def __init__(self, members: list[UNet]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.k = len(members)
        self.output = members[0].config.output
        self.depth = members[0].config.depth
        self.steps = 0  # training steps taken, for the members' BatchNorm num_batches_tracked
        self._bn_index: dict[int, int] = {}
        self._keep: dict[tuple, torch.Tensor] = {}
        if self.k == 1:
            return  # one member runs as itself: its own BatchNorm buffers are the live ones
        # Fused running statistics: F.batch_norm updates them in place, which a
        # per-forward concatenation of the members' buffers would lose.
        first = [m for m in members[0].modules() if isinstance(m, nn.BatchNorm2d)]
        per_member = [[m for m in member.modules() if isinstance(m, nn.BatchNorm2d)] for member in members]
        for i, bn in enumerate(first):
            self._bn_index[id(bn)] = i
            layer = [bns[i] for bns in per_member]
            self.register_buffer(f"bn{i}_mean", torch.cat([b.running_mean for b in layer]).clone())
            self.register_buffer(f"bn{i}_var", torch.cat([b.running_var for b in layer]).clone())
        self.register_buffer("uv_scale", members[0].uv_scale.view(1, 1, 2, 1, 1).clone(), persistent=False)
        # Per member: RGB members with gray_start predict a correction to their input Y (see UNet.forward).
        starts = [m.config.gray_start for m in members]
        self.register_buffer("gray_start", torch.tensor(starts).view(1, self.k, 1, 1, 1), persistent=False)
        self.any_gray_start, self.all_gray_start = any(starts), all(starts)

    @property
    def classes(self) -> ChromaBins | None:
        """A classification head's bins (the members' are the same: one training split)."""
        return self.members[0].classes

    @property
    def single(self) -> UNet | None:
        """The one member's own model, when there is one member."""
        return self.members[0] if self.k == 1 else None

    # ------------------------------------------------------------ layers

    def _cat_params(self, mods, name):
        t = getattr(mods[0], name)
        return None if t is None else torch.cat([getattr(m, name) for m in mods])

    def _apply(self, mods: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
        m0 = mods[0]
        if isinstance(m0, nn.Sequential):
            # Members may differ in dropout: a DoubleConv then has an extra layer in some of them.
            children = [[c for c in m if not isinstance(c, nn.Dropout2d)] for m in mods]
            for layer in zip(*children):
                x = self._apply(list(layer), x)
            p = [_dropout_of(m) for m in mods]
            return self._dropout(x, p) if any(p) else x
        if isinstance(m0, nn.ConvTranspose2d):
            return F.conv_transpose2d(x, self._cat_params(mods, "weight"), self._cat_params(mods, "bias"),
                                      m0.stride, m0.padding, m0.output_padding, self.k * m0.groups, m0.dilation)
        if isinstance(m0, nn.Conv2d):
            return F.conv2d(x, self._cat_params(mods, "weight"), self._cat_params(mods, "bias"),
                            m0.stride, m0.padding, m0.dilation, self.k * m0.groups)
        if isinstance(m0, nn.BatchNorm2d):
            i = self._bn_index[id(m0)]
            return F.batch_norm(x, getattr(self, f"bn{i}_mean"), getattr(self, f"bn{i}_var"),
                                self._cat_params(mods, "weight"), self._cat_params(mods, "bias"),
                                self.training, m0.momentum, m0.eps)
        # Parameter-free and per channel (pooling, resampling, activations, pixel (un)shuffle):
        # applying member 0's module to the fused tensor is applying each member's.
        return m0(x)

    def _dropout(self, x: torch.Tensor, p: list[float]) -> torch.Tensor:
        # One mask tensor serves all members: a pack's dropout draws are not its members' separate
        # trials' (the same distribution, not the same numbers).
        if not self.training:
            return x
        b, c, h, w = x.shape
        key = (tuple(p), x.device, x.dtype)
        if key not in self._keep:  # made once: a host-to-device copy per step would be a sync
            self._keep[key] = 1.0 - torch.tensor(p, device=x.device, dtype=x.dtype).view(1, self.k, 1, 1, 1)
        keep = self._keep[key]
        mask = (torch.rand(b, self.k, c // self.k, 1, 1, device=x.device) < keep).to(x.dtype) / keep
        return x * mask.flatten(1, 2)

    def _cat(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per-member ``cat([a_k, b_k])`` of two fused tensors; the result is channels_last."""
        k = self.k
        a5 = a.permute(0, 2, 3, 1).unflatten(3, (k, -1))
        b5 = b.permute(0, 2, 3, 1).unflatten(3, (k, -1))
        return torch.cat([a5, b5], dim=4).flatten(3).permute(0, 3, 1, 2)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.single is not None:
            return self.single(y).unsqueeze(1)
        ms = list(self.members)
        x = self._apply([m.stem for m in ms], y)
        skips = []
        for i in range(self.depth):
            skips.append(x)
            x = self._apply([m.encoders[i] for m in ms], self._apply([m.downs[i] for m in ms], x))
        for i in range(self.depth):
            up = self._apply([m.ups[i] for m in ms], x)
            x = self._apply([m.decoders[i] for m in ms], self._cat(up, skips.pop()))
        out = self._apply([m.head for m in ms], x).float()
        out = out.unflatten(1, (self.k, ms[0].head.out_channels))
        if self.output == "uv-classes":
            return out   # each member's logits over the bins they share (one training split)
        if self.output == "rgb":
            if not self.any_gray_start:
                return torch.sigmoid(out)
            corrected = y.float().unsqueeze(2) + torch.tanh(out)
            return corrected if self.all_gray_start else torch.where(self.gray_start, corrected, torch.sigmoid(out))
        return torch.tanh(out) * self.uv_scale

    def live_buffers(self, k: int) -> dict[int, torch.Tensor]:
        """Member ``k``'s BatchNorm running statistics as views of the fused buffers, where training
        updates them (keyed by the id of the member's own buffer, which is stale until sync_members)."""
        if self.single is not None:
            return {}
        bns = [m for m in self.members[k].modules() if isinstance(m, nn.BatchNorm2d)]
        live = {}
        for i, bn in enumerate(bns):
            live[id(bn.running_mean)] = getattr(self, f"bn{i}_mean").chunk(self.k)[k]
            live[id(bn.running_var)] = getattr(self, f"bn{i}_var").chunk(self.k)[k]
        return live

    @torch.no_grad()
    def sync_members(self) -> None:
        """Copy the fused BatchNorm statistics back into the members (before export or rebuild)."""
        if self.single is None:
            per_member = [[m for m in member.modules() if isinstance(m, nn.BatchNorm2d)] for member in self.members]
            for i in range(len(per_member[0])):
                for k, (mean, var) in enumerate(zip(getattr(self, f"bn{i}_mean").chunk(self.k),
                                                    getattr(self, f"bn{i}_var").chunk(self.k))):
                    bn = per_member[k][i]
                    bn.running_mean.copy_(mean)
                    bn.running_var.copy_(var)
                    bn.num_batches_tracked += self.steps
        self.steps = 0


# ---------------------------------------------------------------- training


def train_batches(train: DeviceImages, members: list[Member], batch_size: int):
    """Per step, each member's batch stacked as (K, B, 3, H, W).

    Draws from each member's generator in the order DeviceImages.train_batches
    does (a permutation per epoch, then the augmentation's draws per batch), so a
    member sees exactly the batches its trial would see alone; one gather serves all.
    """
    if len(members) == 1:
        m = members[0]
        for x in train.train_batches(batch_size, m.gen, m.augment):
            yield x.unsqueeze(0)
        return
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


class PackTerms:
    """What members may differ in beyond their weights, as (K,) device tensors made once per membership
    (a copy to the device per step would be a sync): each member's loss, chroma weighting and test-time flip
    averaging. With one member: its configuration, whose formulas then apply as they are."""

    def __init__(self, members: list[Member], dev: torch.device):
        self.single = members[0].cfg if len(members) == 1 else None

        def mask(flags):
            return torch.tensor(flags, device=dev) if any(flags) and self.single is None else None
        self.l1 = mask([m.cfg.loss == "l1" for m in members])
        self.huber = mask([m.cfg.loss == "huber" for m in members])
        self.flip = mask([m.cfg.tta_flip for m in members])
        strengths = [m.cfg.chroma_weight for m in members]
        self.chroma = (torch.tensor(strengths, device=dev).view(1, -1, 1, 1, 1)
                       if any(strengths) and self.single is None else None)
        self.strengths = strengths
        # A classification head: each member's decoding temperature and class weights (K, Q) (None: no
        # member rebalances); with one member a float and a (Q,) table.
        self.temperature: float | torch.Tensor = members[0].cfg.temperature
        self.class_weights = None
        self.critics = [m.critic for m in members]
        bins = members[0].model.classes
        if bins is None:
            return
        if self.single is None:
            self.temperature = torch.tensor([m.cfg.temperature for m in members], device=dev)
        if any(m.cfg.rebalance > 0 for m in members):
            table = torch.stack([rebalance_weights(bins.prior.cpu(), bins.centers.cpu(), m.cfg.rebalance)
                                 for m in members]).to(dev)
            self.class_weights = table[0] if self.single is not None else table

    def temperatures(self, b: int) -> float | torch.Tensor:
        """Each row's decoding temperature for member-major rows of ``b`` images per member."""
        t = self.temperature
        return t if not torch.is_tensor(t) else t.repeat_interleave(b).view(-1, 1, 1, 1)

    def loss(self, diff: torch.Tensor, shape: tuple) -> torch.Tensor:
        """Elementwise loss of ``diff`` (prediction - target), each member's own (study.engine.losses);
        ``shape`` puts the (K,) masks on diff's member axis."""
        if self.single is not None:
            return elementwise_loss(diff, self.single.loss)
        out = diff.square()
        for name, where in (("l1", self.l1), ("huber", self.huber)):
            if where is not None:
                out = torch.where(where.view(shape), elementwise_loss(diff, name), out)
        return out

    def predict(self, fused: FusedUNet, y: torch.Tensor, precision: str) -> torch.Tensor:
        """Every member's prediction (B, K, C, H, W), float, for luma ``y`` (B, 1, H, W); averaged with the
        mirrored input's for members with tta_flip, as study.engine.evaluation.predict does."""
        if fused.single is not None:
            return predict(fused.single, y, precision, self.single.tta_flip).unsqueeze(1)
        inp = y.expand(-1, fused.k, -1, -1).contiguous(memory_format=torch.channels_last)
        with autocast_for(y.device, precision):
            pred = fused(inp).float()
            if self.flip is not None:
                mirrored = fused(inp.flip(3)).float().flip(4)
                both = average_flipped(pred, mirrored, 2) if fused.classes is not None else (pred + mirrored) / 2
                pred = torch.where(self.flip.view(1, -1, 1, 1, 1), both, pred)
        return pred


def make_pack_loss(fused: FusedUNet, terms: PackTerms, dev: torch.device, precision: str,
                   mode: str | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x (K, B, 3, H, W) -> (K,)`` each member's training loss on its own batch (with one member: its
    scalar loss, study.engine.losses.model_loss); compiled if asked (study.engine.device.compile_mode). With adversarial
    members, an eager AdversarialLoss (study.engine.adversarial) that also trains their discriminators."""
    if any(c is not None for c in terms.critics):
        return AdversarialLoss(lambda x: member_losses(fused, terms, x, dev, precision), terms, fused)
    if fused.single is not None:
        model, cfg, lossf = fused.single, terms.single, loss_fn(terms.single.loss)

        def one_loss(x: torch.Tensor) -> torch.Tensor:
            return model_loss(model, cfg, lossf, dev, precision, x[0], terms.class_weights)

        return compiled(one_loss, mode)

    def pack_loss(x: torch.Tensor) -> torch.Tensor:
        return member_losses(fused, terms, x, dev, precision)[0]

    return compiled(pack_loss, mode)


def member_losses(fused: FusedUNet, terms: PackTerms, x: torch.Tensor, dev: torch.device, precision: str):
    """(each member's loss (K,), luma (B, K, H, W), predictions (B, K, C, H, W)) on batches ``x``."""
    k = fused.k
    flat = x.flatten(0, 1)                                                  # (K*B, 3, H, W)
    y = rgb_to_y(flat).unflatten(0, (k, -1)).squeeze(2).transpose(0, 1)    # (B, K, H, W)
    with autocast_for(dev, precision):
        pred = fused(y.contiguous(memory_format=torch.channels_last))     # (B, K, C, H, W)
    uv = target_for(flat, "uv").unflatten(0, (k, -1)).transpose(0, 1)   # (B, K, 2, H, W)
    strength = (terms.chroma if terms.single is None
                else terms.strengths[0] if terms.strengths[0] > 0 else None)
    if fused.classes is not None:
        b = x.shape[1]
        weights = terms.class_weights
        if weights is not None and weights.dim() == 2:
            weights = weights.repeat_interleave(b, 0)                        # each image its member's
        logits = pred.transpose(0, 1).flatten(0, 1)                         # (K*B, Q, H, W) member-major
        loss = class_loss(logits, uv.transpose(0, 1).flatten(0, 1), fused.classes, weights)
        loss = loss.unflatten(0, (k, -1)).transpose(0, 1).unsqueeze(2)     # (B, K, 1, H, W)
    else:
        target = target_for(flat, fused.output).unflatten(0, (k, -1)).transpose(0, 1)
        loss = terms.loss(pred.float() - target, (1, k, 1, 1, 1))
    if strength is not None:   # members without it get weights of exactly 1
        loss = loss * chroma_weights(uv, strength, channel_dim=2, member_dim=1)
    return loss.mean(dim=(0, 2, 3, 4)), y, pred


def train_step(fused: FusedUNet, active: list[Member], loss: Callable, x: torch.Tensor) -> torch.Tensor:
    """One optimizer step of every member on its own batch ``x[k]``; the (K,) losses, unsynced."""
    per_member = loss(x)
    for m in active:
        m.opt.zero_grad(set_to_none=True)
    # Members' parameters are disjoint: the sum's gradient is each member's own loss gradient.
    (per_member.sum() if per_member.dim() else per_member).backward()
    for m in active:
        m.opt.step()
        if m.sched is not None:
            m.sched.step()
        if m.average is not None:
            m.average.update()
    if isinstance(loss, AdversarialLoss):
        loss.train_critics()
    fused.steps += 1
    return per_member.detach().view(-1)


# ---------------------------------------------------------------- evaluation and previews


@torch.no_grad()
def evaluate_members(fused: FusedUNet, terms: PackTerms, split: EvalSplit, batch_size: int,
                     precision: str) -> torch.Tensor:
    """study.engine.evaluation.batch_sums (class_batch_sums for a classification head) for every member at once:
    (K, 4) or (K, 4 + 2 * len(CURVE_TEMPERATURES)) totals, left on the device (no sync)."""
    if fused.single is not None:
        return evaluate_sums(fused.single, split, terms.single, precision, batch_size).view(1, -1)
    fused.eval()
    k = fused.k
    sums = None
    for x, y in split.batches(batch_size):
        b = x.shape[0]
        pred = terms.predict(fused, y, precision).transpose(0, 1).flatten(0, 1)   # (K*B, C, H, W), member-major
        xk = x.unsqueeze(0).expand(k, -1, -1, -1, -1).flatten(0, 1)
        yk = y.repeat(k, 1, 1, 1)
        if fused.classes is not None:
            rows = class_row_metrics(pred, xk, yk, fused.classes, terms.temperatures(b))
        else:
            diff = (pred - target_for(xk, fused.output)).reshape(k, b, -1)
            rgb = prediction_to_rgb(pred, yk, fused.output)
            rows = torch.stack([terms.loss(diff, (k, 1, 1)).mean(2).flatten(), psnr(rgb, xk), ssim(rgb, xk),
                                colourfulness(rgb)])
        batch = rows.view(rows.shape[0], k, b).sum(2).double()
        sums = batch if sums is None else sums + batch
    fused.train()
    return sums.T


@torch.no_grad()
def member_previews(fused: FusedUNet, terms: PackTerms, test: DeviceImages, count: int,
                    precision: str) -> list[dict[str, bytes]]:
    """Each member's ``{prediction_<index>.png: png}`` of the preview images."""
    idx = preview_indices(len(test), count)
    if not idx:
        return [{} for _ in range(fused.k)]
    x = test.take(torch.tensor(idx, device=test.device))
    y = rgb_to_y(x)
    was_training = fused.training
    fused.eval()
    pred = terms.predict(fused, y, precision)
    fused.train(was_training)
    if fused.classes is not None:   # each member's annealed mean at its own temperature
        t = terms.temperature
        pred = torch.stack([fused.classes.decode(pred[:, j], t[j] if torch.is_tensor(t) else t)
                            for j in range(fused.k)], 1)
    return [prediction_pngs(prediction_to_rgb(pred[:, j], y, fused.output), idx) for j in range(fused.k)]
