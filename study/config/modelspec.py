"""What describes a UNet, without torch: the sampling and output registries, ``UNetConfig`` and its
validation, and ``ConfigError``. Validating a configuration or a search space (study.config,
study.space) imports only this, so the command-line checks do not pay for importing torch;
study.engine.models builds the networks and re-exports these names.
"""
from __future__ import annotations

from dataclasses import dataclass

from study.cli import ProjectError


@dataclass(frozen=True)
class Sampling:
    """How a UNet goes down and up a level, and its activation."""
    down: str   # maxpool | strided | avgpool | unshuffle
    up: str     # nearest | transposed | bilinear | shuffle
    act: str    # relu | leaky_relu


SAMPLINGS: dict[str, Sampling] = {
    # The report's "simple" UNet.
    "maxpool-upsample": Sampling("maxpool", "nearest", "relu"),
    # The report's "complex" UNet.
    "strided-transposed": Sampling("strided", "transposed", "leaky_relu"),
    # Smooth resampling: no checkerboard artefacts, no learned resampling weights.
    "avgpool-bilinear": Sampling("avgpool", "bilinear", "relu"),
    # Lossless space-to-depth down, sub-pixel convolution up.
    "pixel-shuffle": Sampling("unshuffle", "shuffle", "relu"),
}
# The classification head's UV grid step (study.engine.chroma) and how many of its cells RGB can reach: the
# channels of a uv-classes head built without a training split's bins (a trial has the cells its split uses).
UV_GRID = 0.05
GAMUT_BINS = 347
OUTPUTS = {"rgb": 3, "uv": 2, "uv-classes": GAMUT_BINS}
MIN_BOTTLENECK = 2  # smallest feature map side the deepest level may have


class ConfigError(ProjectError, ValueError):
    """A configuration value that cannot work; the message names the parameter."""


@dataclass(frozen=True)
class UNetConfig:
    depth: int = 3
    sampling: str = "maxpool-upsample"
    output: str = "uv"
    base_filters: int = 32
    dropout: float = 0.0
    max_filters: int = 512  # a cap on width: levels double their channels up to this
    # The untrained model is its grayscale input: the head starts at zero, and an RGB model predicts a
    # correction to Y (a UV model's zero is already gray). Training then adds only colour that pays.
    gray_start: bool = False

    @property
    def widths(self) -> list[int]:
        return [min(self.base_filters * 2 ** i, self.max_filters) for i in range(self.depth + 1)]

    def validate(self, resolution: int | None = None) -> "UNetConfig":
        if self.sampling not in SAMPLINGS:
            raise ConfigError(f"sampling={self.sampling!r} is unknown; choose one of {sorted(SAMPLINGS)}")
        if self.output not in OUTPUTS:
            raise ConfigError(f"output={self.output!r} is unknown; choose one of {sorted(OUTPUTS)}")
        if not isinstance(self.depth, int) or self.depth < 1:
            raise ConfigError(f"depth={self.depth!r} must be an integer >= 1")
        if not isinstance(self.base_filters, int) or self.base_filters < 1:
            raise ConfigError(f"base_filters={self.base_filters!r} must be an integer >= 1")
        if not isinstance(self.max_filters, int) or self.max_filters < 1:
            raise ConfigError(f"max_filters={self.max_filters!r} must be an integer >= 1")
        if not isinstance(self.gray_start, bool):
            raise ConfigError(f"gray_start={self.gray_start!r} must be true or false")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout!r} must be in [0, 1)")
        if resolution is not None:
            max_depth = max_depth_for(resolution)
            if self.depth > max_depth:
                raise ConfigError(
                    f"depth={self.depth} is too deep for {resolution}x{resolution} images: each level halves "
                    f"the size and the deepest must stay >= {MIN_BOTTLENECK}px, so depth <= {max_depth}")
        return self


def max_depth_for(resolution: int) -> int:
    depth = 0
    while resolution % 2 == 0 and resolution // 2 >= MIN_BOTTLENECK:
        resolution //= 2
        depth += 1
    return depth
