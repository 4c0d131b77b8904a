import pytest
import torch

from study.config import ConfigError
from study.config.trial import TrialConfig
from study.engine.checkpoints import load_checkpoint
from study.engine.data import DeviceImages, load_splits
from study.engine.evaluation import evaluate
from study.engine.losses import NonFiniteLossError
from study.engine.models import build_unet
from study.engine.trial import run_trial

QUIET = dict(log=lambda s: None)


def _untrained_val_loss(cfg, splits):
    torch.manual_seed(cfg.seed)
    model = build_unet(cfg.model, cfg.image_size)
    return evaluate(model, DeviceImages(splits.val, "cpu"), cfg, 256)["loss"]


@pytest.mark.parametrize("output", ["uv", "rgb"])
def test_samples_trial_learns(output, cache_dir):
    cfg = TrialConfig(dataset="samples", epochs=2, output=output, train_limit=256, eval_limit=64,
                      base_filters=8, lr=2e-3)
    splits = load_splits("samples", 32, cache_dir=cache_dir, train_limit=256, eval_limit=64)
    before = _untrained_val_loss(cfg, splits)
    rows = run_trial(cfg, splits=splits, device="cpu", **QUIET)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[1]["train_loss"] < rows[0]["train_loss"]
    assert rows[1]["val_loss"] < before
    r = rows[-1]
    for k in ("val_psnr", "test_psnr", "val_ssim", "val_colourfulness", "val_gray_psnr", "test_gray_psnr"):
        assert torch.isfinite(torch.tensor(r[k])), k
    assert 5 < r["val_psnr"] < 60 and 0 < r["val_ssim"] <= 1


def test_cifar10_slice_one_epoch_loss_falls(shared_data, cache_dir):
    cfg = TrialConfig(dataset="cifar10", epochs=1, depth=3, sampling="maxpool-upsample", output="uv",
                      train_limit=512, eval_limit=128, base_filters=8, lr=2e-3, batch_size=32)
    splits = load_splits("cifar10", 32, data_root=str(shared_data), cache_dir=cache_dir,
                         train_limit=512, eval_limit=128)
    before = _untrained_val_loss(cfg, splits)
    (row,) = run_trial(cfg, splits=splits, device="cpu", **QUIET)
    assert row["val_loss"] < before
    assert 15 < row["val_gray_psnr"] < 35  # the grayscale baseline of real CIFAR images


@pytest.mark.parametrize("written_by", ["this version", "the trial loop before packs shared it"])
def test_checkpoint_resume_continues_exactly(written_by, tmp_path, cache_dir):
    # dropout: the global generators are part of what a checkpoint restores; ema: so are both weight sets.
    cfg = TrialConfig(dataset="samples", epochs=2, train_limit=128, eval_limit=32, base_filters=8,
                      schedule="cosine", augment=True, dropout=0.1, ema=0.5)
    kept = {}

    def report(row, folder):
        assert folder is not None  # epoch 1 is the best so far, epoch 2 the last: both write one
        assert {p.name for p in folder.iterdir()} >= {"checkpoint.pt", "prediction_00000.png"}
        assert not any(p.name.startswith(("original_", "grayscale_")) for p in folder.iterdir())
        kept[row["epoch"]] = load_checkpoint(folder)
        torch.save(kept[row["epoch"]], tmp_path / f"e{row['epoch']}.pt")

    straight = run_trial(cfg, cache_dir=cache_dir, device="cpu", report=report, work_dir=tmp_path, **QUIET)
    assert kept[1]["epoch"] == 1 and kept[1]["config"] == cfg.to_dict()
    resume_dir = tmp_path / "resume"
    resume_dir.mkdir()
    state = torch.load(tmp_path / "e1.pt", weights_only=True)
    if written_by != "this version":  # the keys the single-trial loop wrote before the shared format
        assert set(state) - {"status", "updates"} == {"model", "raw_model", "optimizer", "scheduler", "generator",
                                                      "rng", "epoch", "history", "config"}
        state = {k: v for k, v in state.items() if k not in ("status", "updates")}
    torch.save(state, resume_dir / "checkpoint.pt")
    resumed = run_trial(cfg, cache_dir=cache_dir, device="cpu", resume_from=resume_dir, work_dir=tmp_path, **QUIET)
    assert [r["epoch"] for r in resumed] == [1, 2]
    assert resumed[1]["train_loss"] == pytest.approx(straight[1]["train_loss"], rel=1e-5)
    assert resumed[1]["val_psnr"] == pytest.approx(straight[1]["val_psnr"], rel=1e-5)


def test_divergence_is_an_error_with_its_reason(cache_dir):
    cfg = TrialConfig(dataset="samples", epochs=1, train_limit=128, eval_limit=32, lr=1e30, base_filters=8)
    with pytest.raises(NonFiniteLossError, match="lower the learning rate"):
        run_trial(cfg, cache_dir=cache_dir, device="cpu", **QUIET)


def test_bad_config_rejected_before_training():
    with pytest.raises(ConfigError, match="depth=6 is too deep"):
        run_trial(TrialConfig(dataset="samples", depth=6), **QUIET)
    with pytest.raises(ConfigError, match="unknown trial parameter"):
        TrialConfig.from_dict({"dept": 3})
