"""colorize's rules: the temperature range is where float32 decoding stays sound (measured on the engine's
own decoder), a bad --out is refused before the model loads, and the folder of one trial run by
``python -m study.trial`` is a model colorize takes."""
from __future__ import annotations

import math
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import PYTHON, python_env
from PIL import Image

from study import cli
from study.colorize import check_temperature, main
from study.colorize_model import ColorizeError
from study.engine.chroma import ChromaBins, gamut_bins


@pytest.mark.parametrize("t", [5e-324, 1e-40, 1e-30, 1e-3, 0.38, 1.0, 10.0])
def test_temperatures_in_the_range_pass(t):
    check_temperature(t)


@pytest.mark.parametrize("t", [0.0, -0.0, -0.5, 10.5, 1e300, math.nan, math.inf, -math.inf])
def test_temperatures_outside_it_are_refused(t):
    with pytest.raises(ColorizeError, match=r"--temperature"):
        check_temperature(t)


def test_decoding_is_sound_at_any_temperature_the_rule_accepts():
    """However small T is, the decoder gives finite colours, the most likely bin's, even for logits far larger
    than a trained head's (before, T = 1e-40 overflowed to NaN: gray images)."""
    bins = ChromaBins(*gamut_bins())
    torch.manual_seed(0)
    logits = torch.randn(2, len(bins), 4, 4) * 1e3
    logits[:, 0] += 1e8   # one huge logit: the mode, and the worst case for overflow
    mode = bins.centers[logits.argmax(1)].permute(0, 3, 1, 2)
    for t in (1e-3, 1e-30, 1e-40, 5e-324):
        sound = bins.decode(logits, t)
        assert torch.isfinite(sound).all() and torch.allclose(sound, mode), t
    assert torch.allclose(bins.decode(logits / 1e5, 1e-3), mode)   # ordinary logits: the mode long before
    ordinary = torch.randn(2, len(bins), 4, 4)   # and the annealed mean is what it was at ordinary T
    for t in (1.0, 0.38):
        assert torch.allclose(bins.decode(ordinary, t),
                              torch.einsum("nqhw,qc->nchw", torch.softmax(ordinary / t, 1), bins.centers), atol=1e-6)


# ------------------------------------------------------------------ a trial's folder as the model


@pytest.fixture(scope="module")
def trial_folder(tmp_path_factory, cache_dir) -> Path:
    out = tmp_path_factory.mktemp("trial") / "run"
    done = subprocess.run([PYTHON, "-m", "study.trial", "--dataset", "samples", "--epochs", "1", "--train-limit", "64",
                           "--eval-limit", "32", "--base-filters", "8", "--device", "cpu", "--cache-dir",
                           str(cache_dir), "--out", str(out)], env=python_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("photos") / "p.png"
    Image.radial_gradient("L").resize((40, 30)).save(path)
    return path


@pytest.mark.parametrize("given", ["run", "run/checkpoint"])
def test_a_trial_folder_is_a_model(trial_folder, photo, tmp_path, capsys, given):
    study = trial_folder.parent / given
    rc = cli.run(main, ["--study", str(study), str(photo), "--out", str(tmp_path / "out"), "--device", "cpu"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert (tmp_path / "out" / "p.png").is_file()
    assert "colorizing with trial run (" in out and "samples at 32px" in out


def test_a_trial_folder_refuses_options_that_pick_among_trials(trial_folder, photo, tmp_path, capsys):
    for extra, match in ((["--trial", "other"], "the folder of one trial (run), not a study"),
                         (["--dataset", "cifar10"], "one trial of dataset 'samples', not 'cifar10'")):
        rc = cli.run(main, ["--study", str(trial_folder), str(photo), "--out", str(tmp_path / "out"), *extra])
        err = capsys.readouterr().err
        assert rc == 2 and match in err, err
    assert not (tmp_path / "out").exists()


def test_an_unwritable_out_is_refused_before_the_model_loads(trial_folder, photo, capsys):
    # /proc takes no files, even for root: the check fails at once, and no model is read.
    rc = cli.run(main, ["--study", str(trial_folder / "nothing-here"), str(photo), "--out", "/proc/colorized"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: --out /proc/colorized: cannot create files in /proc"), err
