"""The trial engine's step and epoch bookkeeping: no host sync per step, checkpoints only when they
matter (in ``work_dir``, always removed), per-split constants, devices, precision, config values."""
import math
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from syncs import count_syncs

from study.config import ConfigError, UNetConfig
from study.config.trial import TrialConfig
from study.engine.checkpoints import CHECKPOINT_EVERY, CHECKPOINT_SECONDS, checkpoint_due, load_checkpoint
from study.engine.color import rgb_to_y
from study.engine.data import DeviceImages, load_splits, preview_indices
from study.engine.device import COMPILE_ENV, compile_mode, pick_device, resolve_precision
from study.engine.evaluation import EvalSplit, batch_sums, evaluate, evaluate_members, original_previews
from study.engine.member import Member
from study.engine.models import build_unet
from study.engine.trial import PackStep, run_trial

QUIET = dict(log=lambda s: None)
TINY = TrialConfig(dataset="samples", resolution=16, depth=2, base_filters=4, batch_size=16, eval_limit=32,
                   train_limit=64, epochs=1, preview_count=2)
def test_host_syncs_per_epoch_do_not_grow_with_steps(monkeypatch, cache_dir, tmp_path):
    counts = count_syncs(monkeypatch)
    per_run = {}
    for limit in (32, 128):  # 2 and 8 training steps of 16 images
        cfg = TINY.replace(train_limit=limit, augment=True, schedule="cosine")
        splits = load_splits("samples", 16, cache_dir=cache_dir, train_limit=limit, eval_limit=32)
        counts["n"] = 0
        run_trial(cfg, splits=splits, device="cpu", work_dir=tmp_path, **QUIET)
        per_run[limit] = counts["n"]
    assert per_run[32] == per_run[128], per_run
    assert per_run[32] <= 3 + 3 * TINY.preview_count, per_run  # split constants, the epoch's fetch, PNGs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_steps_and_evaluation_never_sync():
    dev = torch.device("cuda")
    # A trial's step (a pack of one) with every lever that touches it: decay, cosine warm-up, ema, flip.
    cfg = TINY.replace(dataset="samples", augment=True, augment_strength=2.0, resolution=32, depth=3,
                       batch_size=64, weight_decay=0.01, schedule="cosine", warmup_epochs=1, ema=0.99,
                       tta_flip=True, epochs=25)
    rng = np.random.default_rng(0)
    images = DeviceImages(rng.integers(0, 256, (256, 32, 32, 3), dtype=np.uint8), dev)
    split = EvalSplit.prepare(DeviceImages(rng.integers(0, 256, (100, 32, 32, 3), dtype=np.uint8), dev), 64)
    step = PackStep([Member(0, cfg, dev, 4)], dev, resolve_precision(cfg, dev))
    for x in step.batches(images, 64):  # warm-up: cuDNN autotuning, lazy init
        step(x)
    evaluate_members(step.evaluated(), step.terms, split, 64, resolve_precision(cfg, dev))  # its batch shapes too
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        total = torch.zeros(1, device=dev)
        for _ in range(2):
            for x in step.batches(images, 64):  # shifts, flips and resized crops
                total += step(x)
        sums = evaluate_members(step.evaluated(), step.terms, split, 64, resolve_precision(cfg, dev))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert math.isfinite(total.item()) and torch.isfinite(sums).all()


def test_checkpoints_only_when_they_matter_and_never_left_behind(cache_dir, tmp_path):
    cfg = TINY.replace(epochs=3, train_limit=64, lr=3e-2)  # this lr makes epoch 2 worse than epoch 1
    seen = []

    def report(row, folder):
        seen.append((row["epoch"], row["best_epoch"], folder))
        if folder is not None:
            assert folder.parent == tmp_path and folder.name.startswith(".ckpt-")
            assert sorted(p.name for p in folder.iterdir()) == ["checkpoint.pt", "prediction_00000.png",
                                                                 "prediction_00031.png"]
            assert load_checkpoint(folder)["epoch"] == row["epoch"]

    rows = run_trial(cfg, cache_dir=cache_dir, device="cpu", report=report, work_dir=tmp_path, **QUIET)
    assert [e for e, _, _ in seen] == [1, 2, 3] and rows[-1]["precision"] == "fp32"
    for epoch, best, folder in seen:  # the best so far and the last epoch always; others only periodically
        assert (folder is not None) == (epoch == best or epoch == 3), seen
    assert any(folder is None for _, _, folder in seen), seen
    assert list(tmp_path.iterdir()) == []

    def failing(row, folder):
        raise RuntimeError("driver went away")
    with pytest.raises(RuntimeError, match="driver went away"):
        run_trial(cfg, cache_dir=cache_dir, device="cpu", report=failing, work_dir=tmp_path, **QUIET)
    assert list(tmp_path.iterdir()) == []  # removed on error too


def test_checkpoint_rule():
    import time
    now = time.monotonic()
    assert checkpoint_due(3, 10, True, 2, now)            # best so far
    assert checkpoint_due(10, 10, False, 9, now)          # last epoch
    assert not checkpoint_due(4, 10, False, 2, now)
    assert checkpoint_due(2 + CHECKPOINT_EVERY, 10, False, 2, now)
    assert checkpoint_due(4, 10, False, 2, now - CHECKPOINT_SECONDS)


def test_split_constants_and_shared_evaluation(cache_dir):
    splits = load_splits("samples", 16, cache_dir=cache_dir, train_limit=32, eval_limit=32)
    images = DeviceImages(splits.val, "cpu")
    split = EvalSplit.prepare(images, 12)  # batches of 12, 12, 8
    x = images.take(slice(None))
    gray = rgb_to_y(x).clamp(0, 1).expand(-1, 3, -1, -1)
    assert split.gray_psnr == pytest.approx((10 * torch.log10(1 / (gray - x).pow(2).flatten(1).mean(1))).mean().item(),
                                            rel=1e-5)
    torch.manual_seed(0)
    models = [build_unet(UNetConfig(depth=2, base_filters=4, output=o), 16).eval() for o in ("uv", "rgb")]
    # A caller with several models scores them on the same batches; totals match evaluate's.
    sums = [torch.zeros(4, dtype=torch.float64) for _ in models]
    with torch.no_grad():
        for xb, yb in split.batches():
            for k, (m, o) in enumerate(zip(models, ("uv", "rgb"))):
                sums[k] += batch_sums(m(yb), xb, yb, o, "mse")
    for k, o in enumerate(("uv", "rgb")):
        ref = evaluate(models[k], images, TINY.replace(output=o), 32)
        assert split.metrics(sums[k].tolist()) == pytest.approx(ref, rel=1e-5)


def test_original_previews_once_per_dataset():
    rng = np.random.default_rng(0)
    test_images = rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    files = original_previews(test_images, 3)
    idx = preview_indices(40, 3)
    assert sorted(files) == sorted([f"original_{i:05d}.png" for i in idx] + [f"grayscale_{i:05d}.png" for i in idx])
    import io
    original = np.asarray(Image.open(io.BytesIO(files[f"original_{idx[1]:05d}.png"])))
    assert np.array_equal(original, test_images[idx[1]])
    gray = np.asarray(Image.open(io.BytesIO(files[f"grayscale_{idx[1]:05d}.png"])))
    assert gray.shape == (16, 16)
    ref = rgb_to_y(torch.from_numpy(test_images[idx[1]]).permute(2, 0, 1)[None].float() / 255)[0, 0]
    assert np.abs(gray.astype(float) - ref.clamp(0, 1).mul(255).numpy()).max() <= 0.5 + 1e-3


def test_devices_are_checked_with_the_fix_in_the_message():
    assert pick_device("cpu").type == "cpu" and pick_device(None).type in ("cpu", "cuda")
    with pytest.raises(ConfigError, match=r"--device 'tpu'.*--device cpu"):
        pick_device("tpu")
    with pytest.raises(ConfigError, match="only cpu and cuda"):
        pick_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"--device 'cuda': CUDA is not available.*--device cpu"):
            pick_device("cuda")
        with pytest.raises(ConfigError, match="CUDA is not available"):
            run_trial(TINY, device="cuda", **QUIET)


def test_precision_rule():
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    cifar = TrialConfig(dataset="cifar10")
    assert resolve_precision(cifar, cpu) == "fp32"
    assert resolve_precision(cifar.replace(batch_size=64), gpu) == "tf32"    # measured: bf16 gained nothing
    assert resolve_precision(cifar.replace(batch_size=512), gpu) == "bf16"
    assert resolve_precision(TrialConfig(dataset="flowers102", batch_size=16), gpu) == "bf16"
    assert resolve_precision(cifar.replace(precision="fp32", batch_size=512), gpu) == "tf32"
    assert resolve_precision(cifar.replace(precision="bf16"), cpu) == "bf16"


def test_compile_switch(monkeypatch):
    monkeypatch.delenv(COMPILE_ENV, raising=False)
    assert compile_mode() is None
    monkeypatch.setenv(COMPILE_ENV, "reduce-overhead")
    assert compile_mode() == "reduce-overhead"
    monkeypatch.setenv(COMPILE_ENV, "fast please")
    with pytest.raises(ConfigError, match="COLORIZE_COMPILE"):
        compile_mode()


@pytest.mark.parametrize("name,value,message", [
    ("lr", float("nan"), "lr=nan must be a finite number"),
    ("lr", "nan", "lr=nan must be a finite number"),
    ("lr", 0, "lr=0.0 must be > 0"),
    ("lr", -1e-3, "must be > 0"),
    ("lr", "fast", "lr='fast' is not a number"),
    ("dropout", 1.5, r"dropout=1.5 must be in \[0, 1\)"),
    ("dropout", float("inf"), "dropout=inf must be a finite number"),
    ("epochs", 0, "epochs=0 must be >= 1"),
    ("epochs", 2.5, "epochs=2.5 is not a whole number"),
    ("batch_size", -4, "batch_size=-4 must be >= 1"),
    ("base_filters", 0, "base_filters=0 must be >= 1"),
    ("max_filters", 0, "max_filters=0 must be >= 1"),
    ("sampling", "bogus", "sampling='bogus' is unknown"),
    ("augment", "maybe", "augment='maybe' is not true or false"),
    ("precision", "fp8", "precision='fp8' is unknown"),
    ("colour", 1, "unknown trial parameter 'colour'"),
    ("ema", 1.0, r"ema=1.0 must be in \[0, 1\)"),
    ("weight_decay", -0.1, "weight_decay=-0.1 must be >= 0"),
    ("warmup_epochs", -1, "warmup_epochs=-1 must be >= 0"),
    ("augment_strength", 9, r"augment_strength=9.0 must be in \[0, 4\]"),
    ("loss", "lab", "loss='lab' is unknown"),
    ("chroma_weight", -1, r"chroma_weight=-1.0 must be in \[0, 20\]"),
    ("gray_start", "maybe", "gray_start='maybe' is not true or false"),
])
def test_each_value_is_checked_on_its_own(name, value, message):
    with pytest.raises(ConfigError, match=message):
        TrialConfig.check_value(name, value)


def test_whole_configs_and_coercion():
    assert TrialConfig.check_value("lr", np.float32(0.5)) == 0.5
    assert TrialConfig.check_value("epochs", np.int64(3)) == 3 and TrialConfig.check_value("epochs", 3.0) == 3
    assert TrialConfig.check_value("augment", "false") is False
    assert TrialConfig.from_dict({"augment": "true", "lr": "0.01"}).augment is True
    with pytest.raises(ConfigError, match="lr=nan"):
        TrialConfig(lr=float("nan")).validate()
    with pytest.raises(ConfigError, match="dropout=1.0"):
        TrialConfig(dropout=1.0).validate()


def test_width_cap_and_old_checkpoints():
    assert UNetConfig(depth=4, base_filters=64).widths == [64, 128, 256, 512, 512]
    assert UNetConfig(depth=3, base_filters=32).widths == [32, 64, 128, 256]  # the report's models unchanged
    capped = build_unet(UNetConfig(depth=3, base_filters=8, max_filters=16), 32)
    assert max(m.out_channels for m in capped.modules() if isinstance(m, torch.nn.Conv2d)) == 16
    old = {k: v for k, v in TrialConfig().to_dict().items() if k not in ("max_filters", "precision")}
    cfg = TrialConfig.from_dict(old)  # a checkpoint's config from before these keys
    assert cfg.max_filters == 512 and cfg.precision == "auto"
    model = build_unet(cfg.model, 32)
    model.load_state_dict(build_unet(UNetConfig(), 32).state_dict())


def test_folders_of_killed_runs_are_swept_by_the_next_run(cache_dir, tmp_path):
    import subprocess
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = tmp_path / f".ckpt-003-{gone.pid}-x1y2"     # left by a SIGKILLed trial
    alive = tmp_path / f".ckpt-003-{os.getppid()}-a1b2"  # a live process's: not ours to remove
    for folder in (dead, alive):
        folder.mkdir()
        (folder / "checkpoint.pt").write_bytes(b"partial")
    run_trial(TINY, cache_dir=cache_dir, device="cpu", work_dir=tmp_path, **QUIET)
    assert sorted(p.name for p in tmp_path.iterdir()) == [alive.name]
