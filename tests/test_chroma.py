"""The classification head (output: uv-classes): bins, soft targets, rebalancing, annealed mean, gray start,
flip averaging, packs that reproduce their members' trials, and the trial -> checkpoint -> resume ->
colorize path on real data."""
from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from study import cli
from study.config.trial import GAMUT_BINS, TrialConfig, UNetConfig
from study.engine.checkpoints import load_checkpoint
from study.engine.chroma import (
    CELLS,
    NEIGHBOURS,
    SIGMA,
    UV_GRID,
    ChromaBins,
    _gamut_cells,
    average_flipped,
    cell_centers,
    cell_of,
    class_loss,
    gamut_bins,
    photo_bins,
    rebalance_weights,
    smoothed,
    used_bins,
)
from study.engine.color import rgb_to_yuv
from study.engine.data import load_splits
from study.engine.evaluation import predict
from study.engine.models import build_unet
from study.engine.trial import run_pack, run_trial
from study.results.contract import CURVE_METRICS
from study.results.store import read_table


def test_grid_cells_round_trip_and_the_gamut_constant():
    centers = cell_centers()
    assert len(centers) == CELLS
    assert torch.equal(cell_of(centers, dim=1), torch.arange(CELLS))
    # study.config's constant (plan timing's head size) is the count of cells RGB reaches.
    assert GAMUT_BINS == len(_gamut_cells())
    # Pure red's V (0.615) and blue's U (0.436) are inside the grid: their cells are its edges' inner side.
    red = rgb_to_yuv(torch.tensor([1.0, 0, 0]).view(1, 3, 1, 1))[:, 1:]
    assert centers[cell_of(red).item()].tolist() == pytest.approx([-0.15, 0.6])


def test_used_bins_of_known_colours():
    # Half the pixels gray, a quarter pure red, a quarter pure green: three bins, those frequencies.
    img = np.zeros((2, 4, 4, 3), np.uint8)
    img[0] = 128
    img[1, :2] = (255, 0, 0)
    img[1, 2:] = (0, 255, 0)
    centers, prior = used_bins(torch.from_numpy(img))
    rgb = torch.tensor([[0.5, 0.5, 0.5], [1, 0, 0], [0, 1, 0]]).T.reshape(1, 3, 3, 1)
    expect = cell_centers()[cell_of(rgb_to_yuv(rgb)[:, 1:]).flatten()]
    got = {tuple(c): p for c, p in zip(centers.tolist(), prior.tolist())}
    assert got == pytest.approx({tuple(expect[0].tolist()): 0.5, tuple(expect[1].tolist()): 0.25,
                                 tuple(expect[2].tolist()): 0.25})


def test_plan_times_a_head_the_size_a_photo_dataset_gives():
    # --plan times on random images, which reach every gamut cell; a photo split uses the low-chroma ones.
    centers, prior = photo_bins()
    gamut, _ = gamut_bins()
    assert len(centers) == 244 < len(gamut) and prior.sum().item() == pytest.approx(1.0)
    assert {tuple(c) for c in centers.tolist()} <= {tuple(c) for c in gamut.tolist()}
    assert centers.norm(dim=1).max() < gamut.norm(dim=1).max()
    assert centers.norm(dim=1).min() == gamut.norm(dim=1).min()   # the gray bin is among them


def _uv(*pairs) -> torch.Tensor:
    return torch.tensor(pairs, dtype=torch.float32).T.reshape(1, 2, 1, len(pairs))


def test_soft_targets_on_known_colours():
    bins = ChromaBins(*gamut_bins())
    idx, w = bins.soft_targets(_uv((0.0, 0.0), (0.1, -0.15), (0.025, 0.0)))
    assert idx.shape == w.shape == (1, NEIGHBOURS, 1, 3)
    assert torch.allclose(w.sum(1), torch.ones(1, 3))
    centers = bins.centers[idx[0, :, 0]]            # (NEIGHBOURS, 3 colours, 2)
    # A colour on a bin's centre: that bin first, then its 4 neighbours one step away, e^-2 as heavy
    # (distance 0.05 = 2 sigma).
    for j, c in enumerate(((0.0, 0.0), (0.1, -0.15))):
        assert centers[0, j].tolist() == pytest.approx(list(c))
        assert (centers[1:, j] - torch.tensor(c)).norm(dim=1).tolist() == pytest.approx([UV_GRID] * 4)
        lead = 1 / (1 + 4 * math.exp(-UV_GRID ** 2 / (2 * SIGMA ** 2)))
        assert w[0, 0, 0, j].item() == pytest.approx(lead, rel=1e-5)
    # Halfway between (0, 0) and (0.05, 0): those two share the top weight equally.
    half = w[0, :, 0, 2]
    assert half[0].item() == pytest.approx(half[1].item())
    assert sorted(centers[:2, 2].tolist()) == [pytest.approx([0.0, 0.0]), pytest.approx([0.05, 0.0])]


def test_a_colour_with_no_bin_around_it_targets_its_nearest_bin():
    bins = ChromaBins(torch.tensor([[0.3, 0.3], [-0.2, 0.4]]), torch.tensor([0.5, 0.5]))
    idx, w = bins.soft_targets(_uv((0.0, 0.0), (0.3, 0.31)))
    assert idx[0, 0, 0].tolist() == [0, 0] and w[0, 0, 0].tolist() == [1.0, 1.0]
    assert w[0, 1:].abs().sum() == 0


def test_annealed_mean_is_the_expectation_at_1_and_the_mode_as_t_gets_small():
    bins = ChromaBins(*gamut_bins())
    torch.manual_seed(0)
    logits = torch.randn(2, len(bins), 3, 3) * 2
    p = torch.softmax(logits, 1)
    expected = torch.einsum("nqhw,qc->nchw", p, bins.centers)
    assert torch.allclose(bins.decode(logits, 1.0), expected, atol=1e-6)
    mode = bins.centers[logits.argmax(1)].permute(0, 3, 1, 2)
    assert (bins.decode(logits, 0.01) - mode).abs().max() < 1e-3
    # Lower temperatures move the decoded colour monotonically from the mean towards the mode.
    gaps = [(bins.decode(logits, t) - mode).abs().mean().item() for t in (1.0, 0.6, 0.38, 0.2, 0.05)]
    assert gaps == sorted(gaps, reverse=True)


def test_rebalancing_weights():
    centers, _ = gamut_bins()
    prior = torch.distributions.Dirichlet(torch.full((len(centers),), 0.3)).sample((), ) + 1e-4
    prior = prior / prior.sum()
    p = smoothed(prior, centers).float()
    assert p.sum().item() == pytest.approx(1.0, abs=1e-5)
    for r in (0.0, 0.5, 1.0):
        w = rebalance_weights(prior, centers, r)
        assert (p * w).sum().item() == pytest.approx(1.0, abs=1e-5)   # expectation 1 under p~
    assert torch.allclose(rebalance_weights(prior, centers, 0.0), torch.ones(len(centers)))  # empirical: none
    w = rebalance_weights(prior, centers, 1.0)                        # every class the same weighted mass
    assert torch.allclose(p * w, torch.full_like(p, 1 / len(p)), rtol=1e-4)
    # Rare colours gain weight; and per pixel, the loss is scaled by the nearest bin's weight.
    assert w[p.argmin()] > 1 > w[p.argmax()]
    bins = ChromaBins(centers, prior)
    logits, uv = torch.randn(1, len(centers), 2, 2), _uv((0.0, 0.0), (0.1, 0.1), (0.2, -0.1), (0.0, 0.3))
    uv = uv.reshape(1, 2, 2, 2)
    plain, weighted = class_loss(logits, uv, bins, None), class_loss(logits, uv, bins, w)
    nearest = bins.soft_targets(uv)[0][:, 0]
    assert torch.allclose(weighted, plain * w[nearest])


def test_gray_start_decodes_to_gray_and_flip_averaging_mixes_probabilities():
    model = build_unet(UNetConfig(depth=2, output="uv-classes", base_filters=4, gray_start=True)).eval()
    y = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        for t in (1.0, 0.38):
            assert model.decode(model(y), t).abs().max() < 2e-3
        torch.nn.init.normal_(model.head.weight, std=0.5)
        a, b = model(y), model(y.flip(3)).flip(3)
        both = predict(model, y, flip=True)
        mixed = (torch.softmax(a, 1) + torch.softmax(b, 1)) / 2
        assert torch.allclose(torch.exp(both), mixed, atol=1e-6)
        assert torch.allclose(average_flipped(a, b), both, atol=1e-6)
        # Mirror-equivariant: the mirrored input's averaged prediction is the mirror of this one's.
        assert torch.allclose(predict(model, y.flip(3), flip=True).flip(3), both, atol=1e-5)


# ---------------------------------------------------------------- real training

BASE = TrialConfig(dataset="samples", train_limit=128, eval_limit=32, base_filters=8, batch_size=32, epochs=2,
                   preview_count=2, output="uv-classes")
# Members differ in temperature, rebalancing, weight averaging, flip averaging, gray start, seed, and one
# has a discriminator of its own.
CFGS = [BASE.replace(temperature=0.38, rebalance=0.5, ema=0.9, tta_flip=True, seed=0),
        BASE.replace(temperature=1.0, rebalance=0.0, gray_start=True, seed=1, lr=2e-3),
        BASE.replace(temperature=0.2, rebalance=1.0, adversarial=0.05, seed=2, chroma_weight=1.0)]


@pytest.fixture(scope="module")
def splits(cache_dir):
    return load_splits("samples", 32, cache_dir=cache_dir, train_limit=128, eval_limit=32)


def test_a_pack_reproduces_its_members_separate_trials(splits, tmp_path):
    quiet = dict(splits=splits, device="cpu", log=lambda s: None)
    separate = [run_trial(c, work_dir=tmp_path / f"t{i}", **quiet) for i, c in enumerate(CFGS)]
    packed = run_pack(CFGS, work_dir=tmp_path / "pack", **quiet)
    for alone, member in zip(separate, packed):
        assert [r["epoch"] for r in alone] == [r["epoch"] for r in member] == [1, 2]
        for a, b in zip(alone, member):
            for key in ("val_psnr", "test_psnr", *CURVE_METRICS):
                assert abs(a[key] - b[key]) < 0.05, (key, a[key], b[key])
            assert a["val_colourfulness"] == pytest.approx(b["val_colourfulness"], abs=0.01)
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)
    row = separate[0][-1]
    # The row's own metrics are those at its temperature, 0.38: one point of its curve.
    assert row["val_psnr"] == pytest.approx(row["val_psnr_t038"], abs=1e-4)
    assert row["val_colourfulness"] == pytest.approx(row["val_colourfulness_t038"], abs=1e-6)


def test_the_temperature_only_decodes_so_one_trial_gives_the_whole_curve(splits, tmp_path):
    """Without a discriminator the temperature changes no training step: trials at two temperatures
    train identically, and each one's curve (val and test) is the other's, which is why the ablation
    reads its T = 1 and T = 0.38 rows off one trial."""
    quiet = dict(splits=splits, device="cpu", log=lambda s: None)
    cfg = BASE.replace(rebalance=0.5, epochs=1)
    cold, warm = (run_trial(cfg.replace(temperature=t), work_dir=tmp_path / str(t), **quiet)[-1] for t in (1.0, 0.2))
    assert cold["train_loss"] == warm["train_loss"]
    assert any(k.startswith("test_") for k in CURVE_METRICS)
    for key in CURVE_METRICS:
        assert cold[key] == pytest.approx(warm[key], abs=1e-9), key
    # Each trial's own figures are its point on the shared curve, and the two points differ.
    assert cold["test_psnr"] == pytest.approx(cold["test_psnr_t100"], abs=1e-9)
    assert warm["test_psnr"] == pytest.approx(warm["test_psnr_t020"], abs=1e-9)
    assert warm["test_colourfulness"] > cold["test_colourfulness"]


def _resumed_equals_uninterrupted(cfg: TrialConfig, splits, tmp_path) -> tuple[dict, dict]:
    quiet = dict(splits=splits, device="cpu", log=lambda s: None)
    kept = {}

    def keep(row, folder):
        if folder is not None:
            shutil.copytree(folder, tmp_path / f"e{row['epoch']}", dirs_exist_ok=True)
            kept[row["epoch"]] = tmp_path / f"e{row['epoch']}"

    whole = run_trial(cfg, report=keep, work_dir=tmp_path / "a", **quiet)
    final = load_checkpoint(kept[2])
    first = load_checkpoint(kept[1])
    shutil.rmtree(kept[2])
    resumed = run_trial(cfg, resume_from=kept[1], report=keep, work_dir=tmp_path / "b", **quiet)
    assert [r["epoch"] for r in resumed] == [1, 2]
    for key in ("val_psnr", "test_psnr", "train_loss"):
        assert resumed[1][key] == pytest.approx(whole[1][key], rel=1e-5, abs=1e-5), key
    return first, final, load_checkpoint(kept[2])


def test_the_discriminator_survives_a_resume(splits, tmp_path):
    cfg = BASE.replace(output="uv", adversarial=0.05)
    first, final, resumed = _resumed_equals_uninterrupted(cfg, splits, tmp_path)
    assert first["critic"]["optimizer"]["state"], "the discriminator's Adam state is in the checkpoint"
    for name, w in final["critic"]["net"].items():
        assert torch.allclose(resumed["critic"]["net"][name], w, atol=1e-5), name
    steps = [s["step"] for s in resumed["critic"]["optimizer"]["state"].values()]
    assert steps and all(float(s) == float(final["critic"]["optimizer"]["state"][0]["step"]) for s in steps)


def test_a_classification_trial_resumes_as_if_uninterrupted(splits, tmp_path):
    _, final, resumed = _resumed_equals_uninterrupted(BASE.replace(rebalance=0.5, ema=0.9), splits, tmp_path)
    for name, w in final["model"].items():
        assert torch.allclose(resumed["model"][name].float(), w.float(), atol=1e-5), name
    assert torch.equal(final["model"]["classes.centers"], resumed["model"]["classes.centers"])


def test_trial_cli_trains_both_levers_and_colorize_paints_with_them(tmp_path, cache_dir, capsys):
    from study.colorize import main as colorize_main
    from study.local import run_local_study
    from study.trial import main as trial_main

    common = ["--dataset", "samples", "--train-limit", "64", "--eval-limit", "16", "--base-filters", "8",
              "--batch-size", "32", "--epochs", "1", "--preview-count", "2", "--cache-dir", str(cache_dir),
              "--device", "cpu"]
    for name, extra in (("classes", ["--output", "uv-classes", "--temperature", "0.38"]),
                        ("adversarial", ["--adversarial", "0.01"])):
        assert trial_main([*common, *extra, "--out", str(tmp_path / name)]) == 0
        state = load_checkpoint(tmp_path / name / "checkpoint")
        assert ("classes.centers" in state["model"]) == (name == "classes")
        assert ("critic" in state) == (name == "adversarial")
        assert (tmp_path / name / "checkpoint").glob("prediction_*.png")
    capsys.readouterr()
    # Through a study to study.colorize: the classification head's colours at its temperature.
    study = tmp_path / "study"
    cfgs = [TrialConfig(dataset="samples", epochs=1, train_limit=64, eval_limit=16, base_filters=8,
                        preview_count=1, output="uv-classes", temperature=t, seed=0) for t in (1.0, 0.2)]
    ids = run_local_study(study, cfgs + [cfgs[0].replace(output="uv")], cache_dir=cache_dir, log=lambda s: None)
    # The epochs table holds each classification trial's temperature curve; the UV trial's is missing.
    epochs = read_table(str(study), "epochs").set_index("trial_id")
    assert epochs.loc[ids[:2], list(CURVE_METRICS)].notna().all().all()
    assert epochs.loc[ids[2], list(CURVE_METRICS)].isna().all()
    assert epochs.loc[ids[0], "val_psnr"] == pytest.approx(epochs.loc[ids[0], "val_psnr_t100"])
    uv_trial, ids = ids[2], ids[:2]
    photo = tmp_path / "astronaut.png"
    Image.fromarray(skdata.astronaut()).resize((48, 40)).save(photo)
    outs = []
    for tid in ids:
        out = tmp_path / f"out-{tid}"
        rc = cli.run(colorize_main, ["--study", str(study), "--trial", tid, str(photo), "--out", str(out),
                                     "--device", "cpu"])
        assert rc == 0, capsys.readouterr()
        outs.append(np.asarray(Image.open(out / "astronaut.png")).astype(float))
    assert outs[0].shape == (40, 48, 3)
    # Same weights and seed, two temperatures: T = 0.2 paints more saturated colour than the mean.
    chroma = [rgb_to_yuv(torch.from_numpy(o / 255).permute(2, 0, 1)[None].float())[:, 1:].norm(dim=1).mean()
              for o in outs]
    assert chroma[1] > chroma[0]
    # --temperature moves a trained model along the trade: the T = 1 trial decoded at 0.2 paints exactly
    # what the T = 0.2 trial (same seed, so the same weights) paints.
    out = tmp_path / "out-at-020"
    capsys.readouterr()
    rc = cli.run(colorize_main, ["--study", str(study), "--trial", ids[0], "--temperature", "0.2", str(photo),
                                 "--out", str(out), "--device", "cpu"])
    said = capsys.readouterr()
    assert rc == 0 and "decoded at temperature 0.2" in said.out, said
    assert np.array_equal(np.asarray(Image.open(out / "astronaut.png")).astype(float), outs[1])
    # Refused with one message, nothing written: a head without a temperature, and a bad value.
    for trial, value, words in ((uv_trial, "0.5", "applies to uv-classes trials only"),
                                (ids[0], "0", "--temperature: temperature=0.0 must be in (0, 10]"),
                                (ids[0], "nan", "--temperature: temperature=nan must be a finite number")):
        out = tmp_path / f"refused-{trial}-{value}"
        rc = cli.run(colorize_main, ["--study", str(study), "--trial", trial, "--temperature", value, str(photo),
                                     "--out", str(out), "--device", "cpu"])
        err = capsys.readouterr().err
        assert rc == 2 and words in err and "Traceback" not in err, err
        assert len([ln for ln in err.splitlines() if ln.startswith("error:")]) == 1 and not out.exists()
