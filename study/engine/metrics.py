"""Colour metrics computed in RGB on whole batches, on the device.

PSNR and SSIM follow scikit-image's definitions (``peak_signal_noise_ratio``,
``structural_similarity`` with ``gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=1``); ``tests/test_color_metrics.py`` checks
them against scikit-image. They are reimplemented here only so that evaluation
stays on the GPU instead of copying every image to NumPy.
Colourfulness is Hasler & Suesstrunk (2003), M = sigma_rgyb + 0.3 * mu_rgyb.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [0, 1], shape (N,)."""
    mse = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-12))


@lru_cache(maxsize=None)
def _gaussian_kernels(size: int, sigma: float, channels: int, device: torch.device, dtype: torch.dtype):
    # Built once per (device, dtype): evaluation runs SSIM on every batch of every epoch.
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    g = (g / g.sum()).to(device=device, dtype=dtype)
    return g.view(1, 1, size, 1).repeat(channels, 1, 1, 1), g.view(1, 1, 1, size).repeat(channels, 1, 1, 1)


def ssim(pred: torch.Tensor, target: torch.Tensor, sigma: float = 1.5) -> torch.Tensor:
    """Per-image mean SSIM over channels, shape (N,); skimage's gaussian variant."""
    pred, target = pred.float(), target.float()
    n, c, h, w = pred.shape
    # skimage: truncate=3.5 -> radius int(3.5 * sigma + 0.5); the border of that
    # radius is cropped before averaging, i.e. a 'valid' convolution.
    radius = int(3.5 * sigma + 0.5)
    size = 2 * radius + 1
    if min(h, w) < size:
        raise ValueError(f"SSIM needs images of at least {size}x{size}, got {h}x{w}")
    kh, kw = _gaussian_kernels(size, float(sigma), c, pred.device, pred.dtype)

    def blur(x):
        return F.conv2d(F.conv2d(x, kh, groups=c), kw, groups=c)

    mu_x, mu_y = blur(pred), blur(target)
    sxx = blur(pred * pred) - mu_x ** 2
    syy = blur(target * target) - mu_y ** 2
    sxy = blur(pred * target) - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)


def colourfulness(rgb: torch.Tensor) -> torch.Tensor:
    """Hasler-Suesstrunk colourfulness per image (RGB scaled to 0..255), shape (N,)."""
    rgb = rgb.float() * 255
    r, g, b = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    rg = (r - g).flatten(1)
    yb = (0.5 * (r + g) - b).flatten(1)
    sigma = torch.sqrt(rg.var(1, unbiased=False) + yb.var(1, unbiased=False))
    mu = torch.sqrt(rg.mean(1) ** 2 + yb.mean(1) ** 2)
    return sigma + 0.3 * mu
