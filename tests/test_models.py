import dataclasses
import subprocess

import pytest
import torch
from conftest import PYTHON, python_env

from study.cli import ProjectError
from study.config import OUTPUTS, SAMPLINGS, ConfigError, UNetConfig, max_depth_for
from study.engine.chroma import UV_GRID
from study.engine.color import UV_MAX
from study.engine.data import DataError
from study.engine.models import VARIANTS, build_unet

CASES = [(s, o, d) for s in SAMPLINGS for o in OUTPUTS for d in (1, 3)]


@pytest.mark.parametrize("sampling,output,depth", CASES)
def test_variant_shape_range_and_gradients(sampling, output, depth):
    torch.manual_seed(0)
    model = build_unet(UNetConfig(depth=depth, sampling=sampling, output=output, base_filters=4, dropout=0.1), 32)
    y = torch.rand(2, 1, 32, 32)
    out = model(y)
    assert out.shape == (2, OUTPUTS[output], 32, 32)
    assert torch.isfinite(out).all()
    if output == "rgb":
        assert out.min() >= 0 and out.max() <= 1
    else:
        # A classification head's logits decode to a mix of its bin centres, which lie on a grid that
        # reaches half a step past the gamut's edge (study.engine.chroma).
        uv, slack = (model.decode(out, 1.0), UV_GRID / 2) if output == "uv-classes" else (out, 1e-6)
        for c, bound in enumerate(UV_MAX):
            assert uv[:, c].abs().max() <= bound + slack
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"parameters without a gradient: {missing}"
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("sampling,output,depth", CASES)
def test_gray_start_model_is_its_grayscale_input_until_trained(sampling, output, depth):
    from study.engine.color import prediction_to_rgb
    torch.manual_seed(0)
    model = build_unet(UNetConfig(depth=depth, sampling=sampling, output=output, base_filters=4, gray_start=True), 32)
    y = torch.rand(2, 1, 32, 32)
    # (decode: a classification head's annealed mean; the identity for the others)
    rgb = prediction_to_rgb(model.decode(model(y)), y, output)
    assert torch.allclose(rgb, y.expand(-1, 3, -1, -1), atol=1e-6)
    # One step away from it: the head gets a gradient (and then the layers below it).
    (prediction_to_rgb(model.decode(model(y)), y, output) - torch.rand(2, 3, 32, 32)).square().mean().backward()
    assert model.head.weight.grad.abs().sum() > 0
    plain = build_unet(UNetConfig(depth=depth, sampling=sampling, output=output, base_filters=4), 32)
    assert not torch.allclose(prediction_to_rgb(plain.decode(plain(y)), y, output), y.expand(-1, 3, -1, -1),
                              atol=1e-3)
    # A checkpoint's config (a trial's, as a dict) rebuilds the same kind of model for colorize.
    from study.config.trial import TrialConfig
    cfg = TrialConfig(depth=depth, sampling=sampling, output=output, base_filters=4, gray_start=True)
    rebuilt = build_unet(dict(cfg.model.__dict__))
    assert rebuilt.config.gray_start and rebuilt.config == cfg.model


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_report_variants_are_the_reports_networks(name):
    # The report's CIFAR-10 UNet halves 32x32 three times, its Flowers-102 UNet 256x256 four times; its
    # "complex" UNet learns its resampling (strided convolutions, transposed convolutions), the "simple"
    # one does not (max pooling, nearest up-sampling).
    res, halvings = (32, 3) if "cifar10" in name else (256, 4)
    model = build_unet(VARIANTS[name], res).eval()
    sides = []
    for enc in model.encoders:
        enc.register_forward_hook(lambda module, args, out: sides.append(tuple(out.shape[-2:])))
    with torch.no_grad():
        out = model(torch.rand(1, 1, res, res))
    assert sides == [(res >> k, res >> k) for k in range(1, halvings + 1)]
    assert out.shape == (1, 3 if name.endswith("-rgb") else 2, res, res)

    def weights(modules) -> int:
        return sum(p.numel() for p in modules.parameters())
    if "-complex-" in name:
        assert weights(model.downs) > 0 and weights(model.ups) > 0
    else:
        assert weights(model.downs) + weights(model.ups) == 0
    # One level less is a smaller network: depth is real capacity, not a label.
    shallower = build_unet(dataclasses.replace(VARIANTS[name], depth=halvings - 1), res)
    assert weights(shallower) < weights(model)


def test_channels_last_matches_contiguous():
    model = build_unet(UNetConfig(depth=2, base_filters=4), 32).eval()
    y = torch.rand(2, 1, 32, 32)
    ref = model(y)
    model = model.to(memory_format=torch.channels_last)
    assert torch.allclose(ref, model(y.contiguous(memory_format=torch.channels_last)), atol=1e-5)


def test_invalid_configs_name_the_parameter():
    assert max_depth_for(32) == 4 and max_depth_for(256) == 7
    with pytest.raises(ConfigError, match="depth=5 is too deep for 32x32"):
        build_unet(UNetConfig(depth=5), 32)
    with pytest.raises(ConfigError, match="sampling='bogus'"):
        build_unet(UNetConfig(sampling="bogus"))
    with pytest.raises(ConfigError, match="output='lab'"):
        build_unet(UNetConfig(output="lab"))
    with pytest.raises(ConfigError, match="depth=0"):
        build_unet(UNetConfig(depth=0))
    with pytest.raises(ConfigError, match="dropout"):
        build_unet(UNetConfig(dropout=1.5))


def test_config_validation_imports_neither_torch_nor_pandas():
    # The command-line checks of a space or a configuration must not pay for importing torch (seconds).
    code = ("import sys, study.config, study.results.contract, study.config.trial; "
            "print(sorted(m for m in ('torch', 'pandas') if m in sys.modules))")
    out = subprocess.run([PYTHON, "-c", code], env=python_env(), capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    assert issubclass(ConfigError, ProjectError) and issubclass(ConfigError, ValueError)
    assert issubclass(DataError, ProjectError)
