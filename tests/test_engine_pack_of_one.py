"""A single trial is a pack of one: run_trial and run_pack([cfg]) train, evaluate and checkpoint the same
member bit for bit, for both heads (regression RGB/UV and the classification head) and with a discriminator;
a pack of K reproduces its RGB members' separate trials (real data, real training on the CPU)."""
import math

import pytest
import torch

from study.config.trial import TrialConfig
from study.engine.checkpoints import CHECKPOINT_FILE, PACK_FILE
from study.engine.data import load_splits
from study.engine.trial import run_pack, run_trial

BASE = TrialConfig(dataset="samples", train_limit=64, eval_limit=32, base_filters=8, batch_size=32, epochs=2,
                   preview_count=1)
CASES = {
    "rgb": BASE.replace(output="rgb", loss="huber", chroma_weight=2.0, tta_flip=True, ema=0.9, gray_start=True),
    "uv": BASE.replace(output="uv", loss="l1", augment=True, schedule="cosine", warmup_epochs=1),
    "uv-classes": BASE.replace(output="uv-classes", rebalance=0.5, temperature=0.38, tta_flip=True, ema=0.9),
    "uv + adversarial": BASE.replace(output="uv", adversarial=0.05, seed=3),
    "uv-classes + adversarial": BASE.replace(output="uv-classes", adversarial=0.05, temperature=0.2, seed=4),
}


@pytest.fixture(scope="module")
def splits(cache_dir):
    return load_splits("samples", 32, cache_dir=cache_dir, train_limit=64, eval_limit=32)


def _timeless(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


def _run_trial(cfg, report, **options):
    return run_trial(cfg, report=report, **options)


def _run_pack_of_one(cfg, report, **options):
    (history,) = run_pack([cfg], report=lambda rows, folder: report(rows[0], folder), **options)
    return history


def _run(runner, cfg, splits, tmp_path):
    """(epoch rows less their seconds, each checkpoint's state less its history's seconds, each checkpoint's
    preview files) of one run; a pack's member folder read as a trial's."""
    states, files = {}, {}

    def report(row, folder):
        if folder is not None:
            member = folder / "member-0" if (folder / PACK_FILE).exists() else folder
            state = torch.load(member / CHECKPOINT_FILE, weights_only=True)
            states[row["epoch"]] = {**state, "history": _timeless(state["history"])}
            files[row["epoch"]] = {p.name: p.read_bytes() for p in member.iterdir() if p.suffix == ".png"}

    history = runner(cfg, report, splits=splits, device="cpu", log=lambda s: None, work_dir=tmp_path)
    return _timeless(history), states, files


def _equal(a, b) -> bool:
    """Checkpoint states equal to the bit: tensors with torch.equal, the rest with ==."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return torch.equal(a, b)
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_trial_and_a_pack_of_one_are_the_same_run(case, splits, tmp_path):
    cfg = CASES[case]
    alone = _run(_run_trial, cfg, splits, tmp_path / "trial")
    rows, states, files = _run(_run_pack_of_one, cfg, splits, tmp_path / "pack")
    assert rows == alone[0]
    assert sorted(states) == sorted(alone[1]) == [1, 2]
    for epoch, state in states.items():
        assert _equal(state, alone[1][epoch]), (case, epoch)
        assert files[epoch] == alone[2][epoch] and files[epoch], (case, epoch)
    if cfg.adversarial:
        assert "critic" in states[2] and states[2]["critic"]["optimizer"]["state"]


def test_a_pack_of_rgb_members_reproduces_their_separate_trials(splits, tmp_path):
    cfgs = [BASE.replace(output="rgb", seed=0, epochs=2),
            BASE.replace(output="rgb", gray_start=True, loss="l1", lr=2e-3, seed=1, epochs=2, tta_flip=True)]
    separate = [run_trial(c, splits=splits, device="cpu", log=lambda s: None, work_dir=tmp_path) for c in cfgs]
    packed = run_pack(cfgs, splits=splits, device="cpu", log=lambda s: None, work_dir=tmp_path)
    for alone, member in zip(separate, packed):
        assert [r["epoch"] for r in alone] == [r["epoch"] for r in member] == [1, 2]
        for a, b in zip(alone, member):
            for key in ("val_psnr", "test_psnr"):
                assert abs(a[key] - b[key]) < 0.05, (key, a[key], b[key])
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)
