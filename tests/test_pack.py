"""Fused trial packs reproduce separate trials (real data, real training on the CPU)."""
import shutil

import pytest
import torch
from syncs import count_syncs

from study.config import SAMPLINGS, ConfigError, UNetConfig
from study.config.trial import TrialConfig
from study.engine.checkpoints import CHECKPOINT_FILE, PACK_FILE
from study.engine.data import DeviceImages, load_splits
from study.engine.evaluation import EvalSplit, evaluate, evaluate_members
from study.engine.fused import FusedUNet
from study.engine.member import Member
from study.engine.models import UNet, build_unet
from study.engine.trial import PackStep, run_pack, run_trial

BASE = TrialConfig(dataset="samples", train_limit=128, eval_limit=32, base_filters=8, batch_size=32,
                   epochs=2, preview_count=2)
# Members differ in lr, loss (mse, l1, huber), seed, schedule, warm-up, weight decay, weight averaging,
# flip averaging, chroma weighting, augmentation strength and epochs.
CFGS = [BASE.replace(lr=1e-3, seed=0, ema=0.9, tta_flip=True, chroma_weight=2.0),
        BASE.replace(lr=3e-3, loss="l1", seed=1, schedule="cosine", warmup_epochs=1, weight_decay=0.05),
        BASE.replace(lr=2e-3, seed=2, schedule="onecycle", augment=True, augment_strength=2.0, epochs=3,
                     loss="huber")]
TOL_DB = 0.05


@pytest.fixture(scope="module")
def splits(cache_dir):
    return load_splits("samples", 32, cache_dir=cache_dir, train_limit=128, eval_limit=32)


@pytest.fixture(scope="module")
def separate(splits, tmp_path_factory):
    """The three members as three ordinary trials."""
    work = tmp_path_factory.mktemp("separate")
    return [run_trial(c, splits=splits, device="cpu", log=lambda s: None, work_dir=work) for c in CFGS]


@pytest.fixture(scope="module")
def packed(splits, tmp_path_factory):
    """The same three as one pack, keeping every checkpoint folder it reports."""
    kept = tmp_path_factory.mktemp("kept")
    reports = []

    def report(rows, folder):
        reports.append((rows, folder))
        if folder is not None:
            shutil.copytree(folder, kept / f"epoch-{rows[next(iter(rows))]['epoch']}")
        return set()

    hist = run_pack(CFGS, splits=splits, device="cpu", report=report, log=lambda s: None,
                    work_dir=tmp_path_factory.mktemp("work"))
    return hist, reports, kept


def _close(a: list[dict], b: list[dict]) -> None:
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("val_psnr", "test_psnr"):
            assert abs(ra[key] - rb[key]) < TOL_DB, (key, ra, rb)
        assert ra["val_gray_psnr"] == pytest.approx(rb["val_gray_psnr"], abs=1e-4)
        assert ra["lr"] == pytest.approx(rb["lr"], rel=1e-6)
        assert ra["best_epoch"] == rb["best_epoch"]


@pytest.mark.parametrize("sampling", sorted(SAMPLINGS))
@pytest.mark.parametrize("output", ["rgb", "uv"])
@pytest.mark.parametrize("gray_starts", [(False, False, True), (True, True, True)])
def test_fused_forward_is_each_members_forward(sampling, output, gray_starts):
    torch.manual_seed(0)
    members = [build_unet(UNetConfig(depth=2, sampling=sampling, output=output, base_filters=4, max_filters=6,
                                     dropout=d, gray_start=g)) for d, g in zip((0.0, 0.2, 0.0), gray_starts)]
    for m in members:  # a trained head: gray_start's zero head would hide the correction path
        torch.nn.init.normal_(m.head.weight, std=0.3)
    fused = FusedUNet(members)
    y = torch.rand(5, 3, 16, 16)
    for train in (True, False):  # batch statistics, then running statistics
        fused.train(train)
        for m in members:
            m.train(train)
        out = fused(y)
        for k in (0, 2):  # member 1's dropout draws differ; the others must be untouched by it
            assert torch.allclose(out[:, k], members[k](y[:, k:k + 1]), atol=1e-5)
    # Running statistics went into the fused buffers; sync_members hands them to each member.
    fresh = [build_unet(m.config) for m in members]
    fused.sync_members()
    assert not torch.allclose(members[0].stem[1].running_mean, fresh[0].stem[1].running_mean)


def test_pack_reproduces_separate_trials(separate, packed):
    hist, reports, _ = packed
    for alone, in_pack in zip(separate, hist):
        _close(in_pack, alone)
    # Every active member is reported every epoch; a member leaves after its own epochs.
    assert [sorted(rows) for rows, _ in reports] == [[0, 1, 2], [0, 1, 2], [2]]
    assert all("error" not in r for h in hist for r in h)


def test_a_trial_is_a_pack_of_one(splits, separate, tmp_path):
    """Both runners are one loop: a pack of one member is its trial, row for row, bit for bit."""
    folders = []

    def report(rows, folder):
        folders.append(sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) if folder else None)

    (alone,) = run_pack(CFGS[1:2], splits=splits, device="cpu", log=lambda s: None, work_dir=tmp_path, report=report)

    def timeless(h):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in h]

    assert timeless(alone) == timeless(separate[1])
    # The same member checkpoint as a trial's, in the pack's layout.
    assert folders[-1] == ["member-0", "member-0/checkpoint.pt", "member-0/prediction_00000.png",
                           "member-0/prediction_00031.png", PACK_FILE]


def test_member_checkpoint_loads_into_plain_unet(packed, splits):
    hist, _, kept = packed
    folder = kept / "epoch-2"
    assert sorted(p.name for p in folder.iterdir()) == ["member-0", "member-1", "member-2", PACK_FILE]
    assert len(list((folder / "member-1").glob("prediction_*.png"))) == 2
    state = torch.load(folder / "member-1" / CHECKPOINT_FILE, weights_only=True)
    cfg = TrialConfig.from_dict(state["config"])
    assert cfg == CFGS[1] and state["epoch"] == 2 and state["history"][-1]["epoch"] == 2
    model = UNet(cfg.model)
    model.load_state_dict(state["model"])
    v = evaluate(model, DeviceImages(splits.val, "cpu"), cfg, 256)
    assert v["psnr"] == pytest.approx(hist[1][1]["val_psnr"], abs=1e-3)
    assert "raw_model" not in state
    # One checkpoint format: a member's holds what a trial's holds, enough to resume it alone.
    assert set(state) == {"model", "optimizer", "scheduler", "generator", "rng", "epoch", "history", "config",
                          "status"}
    # With ema, "model" holds the averaged weights: they differ from the trained ones and are the ones
    # evaluated (with member 0's flip averaging).
    state = torch.load(folder / "member-0" / CHECKPOINT_FILE, weights_only=True)
    assert not torch.allclose(state["model"]["head.weight"], state["raw_model"]["head.weight"])
    model.load_state_dict(state["model"])
    v = evaluate(model, DeviceImages(splits.val, "cpu"), CFGS[0], 256)
    assert v["psnr"] == pytest.approx(hist[0][1]["val_psnr"], abs=1e-3)


def test_pruned_and_diverged_members_leave_others_unchanged(splits, separate, tmp_path):
    seen = []

    def report(rows, folder):
        seen.append(sorted(rows))
        return {1} if 1 in rows else set()  # prune member 1 after its first epoch

    # Member 3 diverges at once (an absurd learning rate): an ERROR row, and it leaves.
    cfgs = CFGS + [BASE.replace(lr=1e30, seed=3)]
    hist = run_pack(cfgs, splits=splits, device="cpu", report=report, log=lambda s: None, work_dir=tmp_path)
    assert seen == [[0, 1, 2, 3], [0, 2], [2]]
    assert len(hist[1]) == 1 and len(hist[3]) == 1 and "error" in hist[3][0]
    assert "lower the learning rate" in hist[3][0]["error"]
    _close(hist[0], separate[0])
    _close(hist[2], separate[2])
    _close(hist[1], separate[1][:1])
    assert list(tmp_path.iterdir()) == []  # checkpoint folders are removed after report


def _as_before_the_shared_format(folder, dst):
    """A pack checkpoint as packs wrote it before they shared the trial's: pack.pt held every member's whole
    state ("model" the trained weights, "average" the averaged ones), member folders held no optimizer."""
    pack = torch.load(folder / PACK_FILE, weights_only=True)
    members = []
    for k in range(len(pack["members"])):
        state = torch.load(folder / f"member-{k}" / CHECKPOINT_FILE, weights_only=True)
        old = {key: state[key] for key in ("optimizer", "scheduler", "generator", "history", "status", "config")}
        if "raw_model" in state:
            old.update(model=state["raw_model"], average=state["model"], updates=state["updates"])
        else:
            old["model"] = state["model"]
        members.append(old)
    dst.mkdir()
    torch.save({"members": members, "epoch": pack["epoch"], "rng": pack["rng"]}, dst / PACK_FILE)
    return dst


@pytest.mark.parametrize("written_by", ["this version", "packs before the shared format"])
def test_resume_from_pack_file_is_exact(written_by, splits, packed, tmp_path):
    hist, _, kept = packed
    folder = kept / "epoch-1"
    if written_by != "this version":
        folder = _as_before_the_shared_format(folder, tmp_path / "old")
    epochs = []
    resumed = run_pack(CFGS, splits=splits, device="cpu", resume_from=folder, log=lambda s: None,
                       work_dir=tmp_path / "work", report=lambda rows, folder: epochs.append(rows[2]["epoch"]))
    assert epochs == [2, 3]  # it continued, not restarted

    def timeless(h):
        return [[{k: v for k, v in r.items() if k != "seconds"} for r in rows] for rows in h]

    assert timeless(resumed) == timeless(hist)


def test_members_must_share_structure(splits):
    with pytest.raises(ConfigError, match="share depth"):
        run_pack([BASE, BASE.replace(depth=2)], splits=splits, device="cpu")


def test_host_syncs_per_epoch_do_not_grow_with_steps(monkeypatch, cache_dir, tmp_path):
    counts = count_syncs(monkeypatch)
    per_run = {}
    for limit in (32, 128):  # 1 and 4 training steps per epoch
        splits = load_splits("samples", 32, cache_dir=cache_dir, train_limit=limit, eval_limit=32)
        cfgs = [c.replace(train_limit=limit, epochs=1) for c in CFGS]
        counts["n"] = 0
        run_pack(cfgs, splits=splits, device="cpu", work_dir=tmp_path, log=lambda s: None)
        per_run[limit] = counts["n"]
    assert per_run[32] == per_run[128], per_run


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_pack_steps_and_evaluation_never_sync(splits):
    dev = torch.device("cuda")
    step = PackStep([Member(i, c.replace(precision="bf16"), dev, 4) for i, c in enumerate(CFGS)], dev, "bf16")
    train = DeviceImages(splits.train, dev)
    split = EvalSplit.prepare(DeviceImages(splits.val, dev), 64)
    for x in step.batches(train, 32):  # warm-up: cuDNN autotuning, lazy init
        step(x)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        total = torch.zeros(len(CFGS), device=dev)
        for _ in range(2):
            for x in step.batches(train, 32):
                total += step(x)
        sums = evaluate_members(step.fused, step.terms, split, 32, "bf16")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(total).all() and torch.isfinite(sums).all()
