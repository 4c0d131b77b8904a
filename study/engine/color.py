"""RGB <-> YUV (BT.601, the matrices of ``skimage.color.rgb2yuv``) on whole batches.

A 3x3 matrix product on the device: converting per sample on the CPU (as the
original notebooks did) was the bottleneck. ``tests/test_color_metrics.py`` checks
these against scikit-image.
"""
from __future__ import annotations

from functools import lru_cache

import torch

YUV_FROM_RGB = (
    (0.299, 0.587, 0.114),
    (-0.14714119, -0.28886916, 0.43601035),
    (0.61497538, -0.51496512, -0.10001026),
)
# Largest |U| and |V| an RGB colour in [0, 1] can have.
UV_MAX = (0.43601035, 0.61497538)


@lru_cache(maxsize=None)
def _matrix(device: torch.device, dtype: torch.dtype, inverse: bool = False) -> torch.Tensor:
    # Cached per (device, dtype): building it per call copied a CPU tensor to the GPU
    # (a host sync) two or three times in every training step.
    m = torch.tensor(YUV_FROM_RGB, dtype=torch.float64)
    if inverse:
        m = torch.linalg.inv(m)
    return m.to(device=device, dtype=dtype)


def _rows(x: torch.Tensor, rows: slice | None = None, inverse: bool = False) -> torch.Tensor:
    m = _matrix(x.device, x.dtype, inverse)
    return m if rows is None else m[rows]


def _per_pixel(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # Channels last for the matmul, so outputs come back channels_last: a target
    # in another layout than the model's output made the CPU loss backward 2-3x slower.
    return torch.matmul(x.movedim(1, -1), m.T).movedim(-1, 1)


def rgb_to_yuv(rgb: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) RGB in [0, 1] -> (N, 3, H, W) YUV."""
    return _per_pixel(_rows(rgb), rgb)


def yuv_to_rgb(yuv: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) YUV -> RGB (not clamped)."""
    return _per_pixel(_rows(yuv, inverse=True), yuv)


def rgb_to_y(rgb: torch.Tensor) -> torch.Tensor:
    """Luma only, (N, 1, H, W): the model's input."""
    return _per_pixel(_rows(rgb, slice(0, 1)), rgb)


def prediction_to_rgb(pred: torch.Tensor, y: torch.Tensor, output: str) -> torch.Tensor:
    """A model's output as RGB in [0, 1]; UV models take Y from their input (a uv-classes model's output
    decoded to UV first: study.engine.models.UNet.decode)."""
    if output in ("uv", "uv-classes"):
        pred = yuv_to_rgb(torch.cat([y.to(pred.dtype), pred], dim=1))
    return pred.clamp(0, 1)


def target_for(rgb: torch.Tensor, output: str) -> torch.Tensor:
    """What a model with this output space is trained to predict (uv-classes: the UV its classes encode)."""
    return rgb if output == "rgb" else _per_pixel(_rows(rgb, slice(1, 3)), rgb)
