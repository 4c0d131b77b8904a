"""A study's rule for grayscale photos (left out, or kept) reaches every trial's worker, whatever the
environment of the node it runs on: otherwise trials of one study would be scored on different images."""
import json
import subprocess

import pandas as pd
import pytest
import yaml
from conftest import PYTHON, python_env
from PIL import Image

pytestmark = pytest.mark.slow

# Ray (and so its workers) starts with the switch unset; the driver then asks to keep grayscale photos.
DRIVER = """
import os, sys, ray
os.environ.pop("COLORIZE_ALLOW_GRAYSCALE", None)
ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
os.environ["COLORIZE_ALLOW_GRAYSCALE"] = "1"
from study.run import main
sys.exit(main(sys.argv[1:]))
"""


def _folder(root):
    """Colour crops, and one grayscale photo in val (1 of 11: over 5%, so refused unless kept)."""
    import skimage.data
    photo = skimage.data.astronaut()
    for split, n in (("train", 40), ("val", 10), ("test", 10)):
        d = root / split / "things"
        d.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(photo[i * 7:][:64, i * 11:][:, :64]).save(d / f"colour_{i:03d}.jpg", quality=90)
    Image.fromarray(photo[:64, :64]).convert("L").convert("RGB").save(root / "val" / "things" / "gray.jpg")
    return root


def test_workers_follow_the_studys_grayscale_rule(tmp_path, cache_dir):
    data = _folder(tmp_path / "mixed")
    space = {"description": "one tiny trial on a folder with a grayscale val photo", "sampler": {"name": "random"},
             "pruner": {"name": "none"}, "num_samples": 1, "max_concurrent": 1, "resources": {"cpu": 1, "gpu": 0},
             "max_failures": 0,
             "params": {"dataset": str(data), "resolution": 32, "depth": 2, "base_filters": 4, "batch_size": 16,
                        "epochs": 1, "preview_count": 1, "seed": 0}}
    (tmp_path / "rule.yaml").write_text(yaml.safe_dump(space))
    p = subprocess.run([PYTHON, "-c", DRIVER, "--space", str(tmp_path / "rule.yaml"), "--storage",
                        str(tmp_path / "studies"), "--cache-dir", str(cache_dir)],
                       cwd=tmp_path, env=python_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    study = tmp_path / "studies" / "rule"
    assert json.loads((study / "study.json").read_text())["grayscale"] == "kept"
    trials = pd.read_parquet(study / "results" / "trials.parquet")
    assert trials["status"].tolist() == ["DONE"], trials[["status", "error"]].to_dict("records")
    # The worker kept the grayscale val photo as the driver did: its ~110 dB lifts the baseline's mean
    # by about 8 dB above the colour photos' alone (what a worker following its own environment scores).
    colour_only, kept = (_gray_baseline(data, cache_dir, allow) for allow in (False, True))
    assert kept > colour_only + 5
    assert trials["val_gray_psnr"].iloc[0] == pytest.approx(kept, abs=0.01)


def _gray_baseline(data, cache_dir, allow: bool) -> float:
    import warnings

    import torch

    from study.engine.color import rgb_to_y
    from study.engine.data import load_splits
    from study.engine.metrics import psnr
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        val = load_splits(str(data), 32, cache_dir=cache_dir, allow_grayscale=allow).val
    x = torch.from_numpy(val.copy()).permute(0, 3, 1, 2).float() / 255
    return psnr(rgb_to_y(x).expand(-1, 3, -1, -1).clamp(0, 1), x).mean().item()
