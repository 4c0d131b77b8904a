"""K members' models as one grouped-convolution model: input (B, K, H, W) luma, output (B, K, C, H, W).

Member k's activations are channel group k of one tensor, so every convolution runs with ``groups=K``
and BatchNorm over the fused channels is per member by construction. Each member keeps its own
parameter tensors (they ARE a plain UNet, study.engine.models); the fused forward concatenates them per
layer. A model of one member runs that member's ``UNet`` itself: a plain model is faster than a
one-group concatenation of itself (docs/throughput.md). Everything that uses the model (loss,
evaluation) is the same for one member and for K.

Why grouped convolutions rather than ``torch.func.stack_module_state`` + ``vmap``: BatchNorm's running
statistics are in-place buffer updates that vmap does not batch, and the grouped form needs nothing but
plain kernels (CPU, CUDA graphs and ``torch.compile`` all take it); docs/throughput.md has its figures.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from study.engine.chroma import ChromaBins


def _dropout_of(seq: nn.Sequential) -> float:
    return next((m.p for m in seq if isinstance(m, nn.Dropout2d)), 0.0)


class FusedUNet(nn.Module):
    """K members (``study.engine.models.UNet``s of one structure) as one model: input (B, K, H, W) luma,
    output (B, K, C, H, W)."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.k = len(members)
        self.output = members[0].config.output
        self.depth = members[0].config.depth
        self.steps = 0  # training steps taken, for the members' BatchNorm num_batches_tracked
        self._bn_index: dict[int, int] = {}
        self._keep: dict[tuple, torch.Tensor] = {}
        if self._plain is not None:
            return  # its own BatchNorm buffers are the live ones
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
    def _plain(self) -> nn.Module | None:
        """One member's own model: with one member the forward runs it as it is (see the module's docstring)."""
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
        if self._plain is not None:
            return self._plain(y).unsqueeze(1)
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
        if self._plain is not None:
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
        if self._plain is None:
            per_member = [[m for m in member.modules() if isinstance(m, nn.BatchNorm2d)] for member in self.members]
            for i in range(len(per_member[0])):
                for k, (mean, var) in enumerate(zip(getattr(self, f"bn{i}_mean").chunk(self.k),
                                                    getattr(self, f"bn{i}_var").chunk(self.k))):
                    bn = per_member[k][i]
                    bn.running_mean.copy_(mean)
                    bn.running_var.copy_(var)
                    bn.num_batches_tracked += self.steps
        self.steps = 0
