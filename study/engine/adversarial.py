"""The adversarial lever (``adversarial: w``): a small conditional PatchGAN discriminator beside each
colorizer that uses it (pix2pix, Isola et al. 2017).

The discriminator sees the luma with chroma, ``cat(Y, U, V)``: the input's Y with the true UV (real) or
with the colorizer's predicted UV (fake; an RGB model's UV, a classification head's annealed mean at its
temperature, which is differentiable). Three strided 4x4 convolutions and a 3x3 one score overlapping
patches (38 px receptive field), so it judges local colour, not layout. Non-saturating GAN loss (the
pix2pix form): the discriminator minimises ``softplus(-D(real)) + softplus(D(fake))``, the colorizer
adds ``w * softplus(-D(fake))`` to its reconstruction loss, so its reported training loss includes it.
Each member of a pack has its own discriminator and Adam; their states are checkpointed with the member
(``"critic"``) and a resumed trial continues them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from study.config import TrialConfig
from study.engine.chroma import ChromaBins
from study.engine.color import rgb_to_yuv

WIDTH = 32          # channels of the first layer; doubled by each strided layer
BETAS = (0.5, 0.999)  # pix2pix's Adam for both networks; the colorizer keeps its own settings


class PatchCritic(nn.Module):
    """(N, 3, H, W) YUV -> (N, 1, H/8, W/8) real-vs-fake logits per patch."""

    def __init__(self, width: int = WIDTH):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(width, 2 * width, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(2 * width, 4 * width, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(4 * width, 1, 3, 1, 1))

    def forward(self, y: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([y.float(), uv.float()], 1))


class Critic:
    """One member's discriminator and its Adam (the member's learning rate, pix2pix's betas). The weight
    ``w`` of its term is the loss's (study.engine.terms)."""

    def __init__(self, cfg: TrialConfig, device: torch.device):
        self.net = PatchCritic().to(device)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=cfg.lr, betas=BETAS)

    def generator_loss(self, y: torch.Tensor, fake_uv: torch.Tensor) -> torch.Tensor:
        """The colorizer's adversarial term (unweighted): non-saturating, ``softplus(-D(fake))``."""
        return F.softplus(-self.net(y, fake_uv)).mean()

    def step(self, y: torch.Tensor, fake_uv: torch.Tensor, real_uv: torch.Tensor) -> None:
        """One discriminator update on a batch (the colorizer's output detached)."""
        self.opt.zero_grad(set_to_none=True)
        loss = F.softplus(-self.net(y, real_uv)).mean() + F.softplus(self.net(y, fake_uv.detach())).mean()
        loss.backward()
        self.opt.step()

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(), "optimizer": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["optimizer"])


def predicted_uv(pred: torch.Tensor, classes: ChromaBins | None, output: str,
                 temperature: float | torch.Tensor) -> torch.Tensor:
    """A colorizer's predicted chroma (B, 2, H, W) from its output ``pred`` (B, C, H, W): a classification
    head's annealed mean at ``temperature``, an RGB model's UV, a UV model's output as it is."""
    if classes is not None:
        return classes.decode(pred, temperature)
    return rgb_to_yuv(pred.clamp(0, 1))[:, 1:] if output == "rgb" else pred
