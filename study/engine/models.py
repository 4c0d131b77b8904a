"""One UNet class covering the search space; variants are rows of registries.

``UNetConfig`` is frozen and fully describes a model, so a checkpoint stores it
as a plain dict and ``build_unet`` rebuilds the same network.
"""
from __future__ import annotations

import torch
from torch import nn

from study.config import OUTPUTS, SAMPLINGS, ConfigError, UNetConfig
from study.engine.chroma import ChromaBins, gamut_bins
from study.engine.color import UV_MAX


def _act(name: str) -> nn.Module:
    return nn.LeakyReLU(0.2, inplace=True) if name == "leaky_relu" else nn.ReLU(inplace=True)


def _conv_bn_act(cin: int, cout: int, act: str, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), _act(act)]


class DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int, act: str, dropout: float):
        layers = _conv_bn_act(cin, cout, act) + _conv_bn_act(cout, cout, act)
        if dropout > 0:
            layers.append(nn.Dropout2d(dropout))
        super().__init__(*layers)


def _down(kind: str, c: int, act: str) -> nn.Module:
    if kind == "maxpool":
        return nn.MaxPool2d(2)
    if kind == "avgpool":
        return nn.AvgPool2d(2)
    if kind == "strided":
        return nn.Sequential(*_conv_bn_act(c, c, act, stride=2))
    if kind == "unshuffle":
        return nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(4 * c, c, 1))
    raise ConfigError(f"unknown down-sampling {kind!r}")


def _up(kind: str, cin: int, cout: int) -> tuple[nn.Module, int]:
    """Up-sampling module and the channels it outputs."""
    if kind == "nearest":
        return nn.Upsample(scale_factor=2, mode="nearest"), cin
    if kind == "bilinear":
        return nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False), cin
    if kind == "transposed":
        return nn.ConvTranspose2d(cin, cout, 2, stride=2), cout
    if kind == "shuffle":
        return nn.Sequential(nn.Conv2d(cin, 4 * cout, 1), nn.PixelShuffle(2)), cout
    raise ConfigError(f"unknown up-sampling {kind!r}")


class UNet(nn.Module):
    """Grayscale (Y) in, RGB or UV out, or (uv-classes) logits over the UV bins ``bins`` (centres and
    frequencies, study.engine.chroma; default: every bin RGB can reach). ``depth`` down/up steps, filters double
    per level up to ``max_filters``."""

    def __init__(self, config: UNetConfig, bins: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        config.validate()
        self.config = config
        s = SAMPLINGS[config.sampling]
        widths = config.widths
        self.stem = DoubleConv(1, widths[0], s.act, 0.0)
        self.downs = nn.ModuleList(_down(s.down, widths[i], s.act) for i in range(config.depth))
        self.encoders = nn.ModuleList(
            DoubleConv(widths[i], widths[i + 1], s.act, config.dropout) for i in range(config.depth))
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for i in reversed(range(config.depth)):
            up, up_channels = _up(s.up, widths[i + 1], widths[i])
            self.ups.append(up)
            self.decoders.append(DoubleConv(up_channels + widths[i], widths[i], s.act, config.dropout))
        self.classes = None
        channels = OUTPUTS[config.output]
        if config.output == "uv-classes":
            self.classes = ChromaBins(*(bins if bins is not None else gamut_bins()))
            channels = len(self.classes)
        self.head = nn.Conv2d(widths[0], channels, 1)
        if config.gray_start:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
            if self.classes is not None:   # gray: a bump on the bin nearest (0, 0), study.engine.chroma.GRAY_SPREAD
                with torch.no_grad():
                    self.head.bias.copy_(self.classes.gray_logits())
        # Bounded outputs: RGB in [0, 1], U and V within the YUV gamut's range.
        self.register_buffer("uv_scale", torch.tensor(UV_MAX).view(1, 2, 1, 1), persistent=False)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        x = self.stem(y)
        skips = []
        for down, enc in zip(self.downs, self.encoders):
            skips.append(x)
            x = enc(down(x))
        for up, dec in zip(self.ups, self.decoders):
            x = dec(torch.cat([up(x), skips.pop()], dim=1))
        out = self.head(x).float()
        if self.config.output == "rgb":
            return y.float() + torch.tanh(out) if self.config.gray_start else torch.sigmoid(out)
        if self.classes is not None:
            return out   # logits; decode() makes them UV
        return torch.tanh(out) * self.uv_scale

    def decode(self, pred: torch.Tensor, temperature: float | torch.Tensor = 1.0) -> torch.Tensor:
        """A prediction in the space prediction_to_rgb takes: a classification head's annealed mean at
        ``temperature`` (study.engine.chroma), the others' output as it is."""
        return pred if self.classes is None else self.classes.decode(pred, temperature)


def build_unet(config: UNetConfig | dict, resolution: int | None = None,
               bins: tuple[torch.Tensor, torch.Tensor] | None = None) -> UNet:
    """The network ``config`` describes; ``bins``: a uv-classes head's (centres, frequencies), e.g. a
    checkpoint's (study.engine.chroma.bins_of)."""
    if isinstance(config, dict):
        config = UNetConfig(**config)  # a dict without max_filters (older checkpoints) gets the default
    return UNet(config.validate(resolution), bins)


# Named variants of the original report (its CIFAR10 UNet has depth 3, its
# Flowers102 UNet depth 4); anything else is a UNetConfig away.
VARIANTS: dict[str, UNetConfig] = {
    f"report-{ds}-{tech}-{out}": UNetConfig(depth=depth, sampling=sampling, output=out)
    for ds, depth in (("cifar10", 3), ("flowers102", 4))
    for tech, sampling in (("simple", "maxpool-upsample"), ("complex", "strided-transposed"))
    for out in ("rgb", "uv")
}
