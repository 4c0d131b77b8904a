import numpy as np
import pytest
import torch
from skimage.color import rgb2yuv
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from study.engine.color import prediction_to_rgb, rgb_to_y, rgb_to_yuv, target_for, yuv_to_rgb
from study.engine.metrics import colourfulness, psnr, ssim


def _images(n=3, size=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Smooth-ish images: random low-res colours upsampled, plus a little noise.
    low = torch.rand(n, 3, size // 4, size // 4, generator=g)
    x = torch.nn.functional.interpolate(low, size=size, mode="bilinear", align_corners=False)
    return (x + 0.05 * torch.rand(n, 3, size, size, generator=g)).clamp(0, 1)


def test_yuv_matches_scikit_image_and_round_trips():
    x = _images()
    ours = rgb_to_yuv(x)
    ref = torch.from_numpy(rgb2yuv(x.permute(0, 2, 3, 1).numpy())).permute(0, 3, 1, 2).float()
    assert torch.allclose(ours, ref, atol=1e-5)
    assert torch.allclose(yuv_to_rgb(ours), x, atol=1e-5)
    assert torch.allclose(rgb_to_y(x), ours[:, :1], atol=1e-6)


def test_uv_prediction_reconstructs_rgb_with_input_luma():
    x = _images()
    y = rgb_to_y(x)
    assert torch.allclose(prediction_to_rgb(target_for(x, "uv"), y, "uv"), x, atol=1e-5)
    assert torch.equal(prediction_to_rgb(target_for(x, "rgb"), y, "rgb"), x)
    # A UV model's colours always carry the input's own luma.
    any_uv = torch.zeros(3, 2, 24, 24)
    assert torch.allclose(rgb_to_y(prediction_to_rgb(any_uv, y, "uv")), y, atol=1e-5)


def test_psnr_and_ssim_match_scikit_image():
    x, p = _images(seed=1), _images(seed=2)
    for i in range(len(x)):
        a, b = p[i].permute(1, 2, 0).double().numpy(), x[i].permute(1, 2, 0).double().numpy()
        assert psnr(p[i:i + 1], x[i:i + 1]).item() == pytest.approx(peak_signal_noise_ratio(b, a, data_range=1), abs=1e-3)
        ref = structural_similarity(b, a, data_range=1, channel_axis=2, gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False)
        assert ssim(p[i:i + 1], x[i:i + 1]).item() == pytest.approx(ref, abs=1e-4)
    assert ssim(x, x).allclose(torch.ones(len(x)))


def test_colourfulness():
    gray = torch.rand(2, 1, 16, 16).expand(-1, 3, -1, -1)
    assert colourfulness(gray).abs().max() < 1e-3
    vivid = torch.zeros(1, 3, 16, 16)
    vivid[:, 0, :, :8] = 1
    vivid[:, 2, :, 8:] = 1
    assert colourfulness(vivid).item() > 100
    # Hasler-Suesstrunk on a hand-computed case: half red, half blue.
    rg = np.r_[np.full(128, 255.0), np.zeros(128)]
    yb = np.r_[np.full(128, 127.5), np.full(128, -255.0)]
    expected = np.sqrt(rg.var() + yb.var()) + 0.3 * np.sqrt(rg.mean() ** 2 + yb.mean() ** 2)
    assert colourfulness(vivid).item() == pytest.approx(expected, rel=1e-4)
