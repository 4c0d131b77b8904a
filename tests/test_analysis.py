"""The analysis package on a small real study (tiny models trained on CPU), and on broken ones."""
from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
from conftest import PYTHON, python_env, shell_signals

from analysis import figures, grids
from analysis.__main__ import main
from analysis.build import MANIFEST
from analysis.load import best_per_variant, load_study
from analysis.style import DPI, pixel_size

PREVIEWS = 4
RESOLUTION = 32   # the samples dataset's native size
SAMPLINGS = ("maxpool-upsample", "strided-transposed")
OUTPUTS = ("rgb", "uv")
VARIANTS = [(s, o) for s in SAMPLINGS for o in OUTPUTS]
SECOND_TRIAL = "local_00004"   # a second maxpool-upsample / uv trial, with another lr
# A classification head and a lever, one trial each after the eleven above: a classification head at the paper's
# temperature and rebalancing, and a maxpool-upsample / uv trial with a discriminator.
CLASSES_TRIAL, ADVERSARIAL_TRIAL = "local_00011", "local_00012"
ALL_VARIANTS = [*VARIANTS, ("maxpool-upsample", "uv-classes")]


def analyse(study: Path, out: Path, capsys) -> tuple[int, str]:
    rc = main(["--study", str(study), "--out", str(out)])
    return rc, capsys.readouterr().err


def read_png(path: Path) -> np.ndarray:
    return mpimg.imread(path)


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def study(tmp_path_factory, cache_dir) -> Path:
    import torch

    from study.config.trial import TrialConfig
    from study.local import run_local_study
    folder = tmp_path_factory.mktemp("analysis") / "study"
    base = TrialConfig(dataset="samples", epochs=2, train_limit=32, eval_limit=16, base_filters=8,
                       batch_size=16, preview_count=PREVIEWS)
    configs = [base.replace(sampling=s, output=o) for s, o in VARIANTS]
    configs.append(base.replace(sampling="maxpool-upsample", output="uv", lr=3e-3))
    # Two more learning rates for the other variants: 11 trials, as importance needs 10 (MIN_COMPLETED).
    configs += [base.replace(sampling=s, output=o, lr=lr) for s, o in VARIANTS if (s, o) != ("maxpool-upsample", "uv")
                for lr in (3e-3, 5e-4)]
    configs += [base.replace(sampling="maxpool-upsample", output="uv-classes", temperature=0.38, rebalance=0.5),
                base.replace(sampling="maxpool-upsample", output="uv", adversarial=0.05)]
    # One thread: these models are tiny, and two threads on a busy two-core machine mostly wait for each other.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_local_study(folder, configs, cache_dir=cache_dir, log=lambda s: None)
    finally:
        torch.set_num_threads(threads)
    # As an ASHA study would have it: one trial stopped early.
    trials = pd.read_parquet(folder / "results/trials.parquet")
    trials.loc[trials["trial_id"] == "local_00000", "status"] = "PRUNED"
    trials.to_parquet(folder / "results/trials.parquet", index=False)
    _add_optuna_study(folder, trials)
    return folder


def _add_optuna_study(folder: Path, trials: pd.DataFrame) -> None:
    """An Optuna SQLite storage mirroring the trials, named in study.json (optuna_storage, optuna_study_name)."""
    import optuna

    from study.results.store import read_json, write_json
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{folder / 'optuna.db'}"
    opt = optuna.create_study(study_name="analysis-test", storage=storage, direction="maximize")
    space = {"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
             "sampling": optuna.distributions.CategoricalDistribution(SAMPLINGS),
             "output": optuna.distributions.CategoricalDistribution((*OUTPUTS, "uv-classes"))}
    for _, t in trials.iterrows():
        opt.add_trial(optuna.trial.create_trial(params={k: t[k] for k in space}, distributions=space,
                                                value=float(t["best_val_psnr"])))
    write_json(str(folder), "study.json", {**read_json(str(folder), "study.json"), "optuna_storage": storage,
                                           "optuna_study_name": "analysis-test", "metric": "val_psnr"})


@pytest.fixture(scope="module")
def report(study, tmp_path_factory) -> tuple[Path, int]:
    out = tmp_path_factory.mktemp("report")
    rc = main(["--study", str(study), "--out", str(out)])
    return out, rc


def derived_study(source: Path, folder: Path, trial_ids: list[str] | None = None, drop=(), edit=None) -> Path:
    """A copy of ``source`` limited to ``trial_ids``, without the tables in ``drop``; ``edit`` rewrites trials."""
    (folder / "results").mkdir(parents=True)
    meta = json.loads((source / "study.json").read_text())
    meta.pop("optuna_storage", None)
    (folder / "study.json").write_text(json.dumps(meta))
    for name in ("trials", "epochs", "previews"):
        if name in drop:
            continue
        df = pd.read_parquet(source / f"results/{name}.parquet")
        if trial_ids is not None:
            df = df[df["trial_id"].isin(trial_ids) | (df["trial_id"] == "")]
        if name == "trials" and edit is not None:
            df = edit(df)
        df.to_parquet(folder / f"results/{name}.parquet", index=False)
    return folder


# ------------------------------------------------------------------ a real study


def expected_files() -> set[str]:
    per_variant = {f"{kind}_samples_{s}_{o}.png" for kind in ("curves", "grid") for s, o in ALL_VARIANTS}
    return per_variant | {"temperature_curves.png", "temperature_curves_samples.csv", "heads_strip_samples.png",
        "grid_side_by_side_samples.png", "psnr_by_variant.png", "pruning.png", "importance.png",
        "importance.csv", "table_samples.csv", "report.md", "report.html",
        "pareto.png", "pareto_samples.csv", "pareto_strip_samples.png", "helped_samples.png", "helped_samples.csv",
        "progress.png"}


def test_every_expected_file_is_written_and_embedded(report):
    out, rc = report
    assert rc == 0
    assert {p.name for p in out.iterdir()} - {MANIFEST} == expected_files()
    md, html = (out / "report.md").read_text(), (out / "report.html").read_text()
    for png in sorted(p.name for p in out.glob("*.png")):
        assert md.count(f"]({png})") == 1, png
        assert html.count(f'src="{png}"') == 1, png
    assert "| beats_grayscale |" in md
    assert "<table>" in html
    assert "## Warnings" not in md and "<h2>Warnings</h2>" not in html


def test_pngs_have_the_figure_size_and_are_not_blank(study, report):
    out, _ = report
    for png in sorted(out.glob("*.png")):
        assert read_png(png).std() > 0, png.name
    s = load_study(study)
    width, height = pixel_size(figures.pruning_figure(s.trials, s.epochs))
    assert read_png(out / "pruning.png").shape[:2] == (height, width)
    curves = read_png(out / "curves_samples_maxpool-upsample_uv.png")
    assert curves.shape[:2] == (round(3.8 * DPI), round(10 * DPI))
    grid = read_png(out / "grid_samples_maxpool-upsample_uv.png")
    assert grid.shape[:2] == (round((0.6 + 3 * grids.CELL_INCHES) * DPI), round((2.0 + PREVIEWS * grids.CELL_INCHES) * DPI))


def test_curves_have_one_labelled_line_per_split_and_faint_others(study):
    s = load_study(study)
    members = s.trials[(s.trials["sampling"] == "maxpool-upsample") & (s.trials["output"] == "uv")]
    best_id = members.sort_values("best_val_psnr").iloc[-1]["trial_id"]
    loss_ax, psnr_ax = figures.curves_figure(s.epochs, members, best_id).axes
    labelled = [line for line in loss_ax.lines if not line.get_label().startswith("_")]
    assert [line.get_label() for line in labelled] == ["training", "validation", "test"]
    assert len(loss_ax.lines) == 3   # the best trial's; the others are drawn as one faint collection per split
    epochs = s.epochs[s.epochs["trial_id"] == best_id]
    for line, split in zip(labelled, ("train", "val", "test")):
        assert list(line.get_xdata()) == list(epochs["epoch"])
        assert np.allclose(line.get_ydata(), epochs[f"{split}_loss"])
    faint = [c for c in loss_ax.collections if c.get_label().startswith("_")]
    others = members[members.trial_id != best_id].trial_id
    assert len(faint) == 3 and all(len(c.get_segments()) == len(others) for c in faint)
    for c, split in zip(faint, ("train", "val", "test")):   # each other trial's curve, as recorded
        for segment, trial_id in zip(c.get_segments(), others):
            own = s.epochs[s.epochs.trial_id == trial_id].sort_values("epoch")
            assert np.allclose(segment, own[["epoch", f"{split}_loss"]].to_numpy(float))
    assert max(c.get_alpha() for c in faint) < 0.5


def test_grid_rows_are_grayscale_original_prediction_at_the_best_epoch(study):
    s = load_study(study)
    previews = grids.Previews(s.previews)
    for _, trial in s.trials.iterrows():
        epoch = previews.preview_epoch(trial)
        assert epoch == trial["best_epoch"]
        grid = grids.variant_grid(previews, trial, epoch)
        assert grid.image.shape == (3 * RESOLUTION, PREVIEWS * RESOLUTION, 3) and grid.missing == 0
        first = grid.image_indices[0]
        rows = [previews.reference("samples", RESOLUTION, "grayscale")[first],
                previews.reference("samples", RESOLUTION, "original")[first],
                previews.predictions(trial["trial_id"], epoch)[first]]
        for r, png in enumerate(rows):
            assert np.array_equal(grid.image[r * RESOLUTION:(r + 1) * RESOLUTION, :RESOLUTION], grids.decode(png))
    side, left_out = grids.side_by_side_grid(previews, best_per_variant(s.trials))
    assert side.image.shape == ((2 + len(ALL_VARIANTS)) * RESOLUTION, PREVIEWS * RESOLUTION, 3) and left_out == []


def test_results_table_equals_the_parquet_data(study, report):
    out, _ = report
    table = pd.read_csv(out / "table_samples.csv").set_index(["sampling", "output"])
    trials = pd.read_parquet(study / "results/trials.parquet")
    assert len(table) == len(ALL_VARIANTS)
    for (sampling, output), group in trials.groupby(["sampling", "output"]):
        best = group.loc[group["best_val_psnr"].idxmax()]
        row = table.loc[(sampling, output)]
        assert row["best_trial"] == best["trial_id"] and row["trials"] == len(group)
        for column in ("val_psnr", "test_psnr", "val_ssim", "test_ssim", "val_colourfulness", "test_colourfulness"):
            assert row[column] == pytest.approx(best[f"best_{column}"], rel=1e-12), column
        assert row["test_gray_psnr"] == pytest.approx(best["test_gray_psnr"], rel=1e-12)
        assert row["test_gain_db"] == pytest.approx(best["best_test_psnr"] - best["test_gray_psnr"], rel=1e-9)
        assert row["beats_grayscale"] == ("yes" if best["best_test_psnr"] > best["test_gray_psnr"] else "no")
    assert list(table["val_psnr"]) == sorted(table["val_psnr"], reverse=True)


def test_importance_comes_from_the_optuna_study(report):
    out, _ = report
    importance = pd.read_csv(out / "importance.csv")
    assert set(importance["parameter"]) <= {"lr", "sampling", "output"}
    assert importance["importance"].sum() == pytest.approx(1.0)
    md = (out / "report.md").read_text()
    # It says what it rests on: the fixture's 13 trials, each mirrored as a completed Optuna trial.
    assert "hyperparameter importance not shown" not in md
    assert md.count("from 13 completed Optuna trials") >= 3   # the text, the table's and the figure's captions


def test_importance_is_withheld_below_ten_completed_trials(study, tmp_path, capsys):
    few = ["local_00001", SECOND_TRIAL]
    folder = derived_study(study, tmp_path / "study", few)
    _add_optuna_study(folder, pd.read_parquet(folder / "results/trials.parquet"))
    rc, err = analyse(folder, tmp_path / "out", capsys)
    assert rc == 0
    assert "warning: hyperparameter importance not shown: it would rest on 2 completed Optuna trial(s)" in err
    assert "under 10" in err and "Not shown: it would rest on 2 completed" in (tmp_path / "out/report.md").read_text()
    assert not (tmp_path / "out/importance.png").exists() and not (tmp_path / "out/importance.csv").exists()


def test_importance_finds_the_storage_beside_study_json_and_needs_ten_trials(study, tmp_path, monkeypatch):
    from analysis.importance import ImportanceSkipped, param_importances
    meta = json.loads((study / "study.json").read_text())
    # On a laptop the recorded absolute path is gone; the copied optuna.db sits beside study.json.
    moved = {**meta, "optuna_storage": "sqlite:////nowhere/optuna.db"}
    assert param_importances(moved, study)[0] == pytest.approx(param_importances(meta, study)[0])
    with pytest.raises(ImportanceSkipped, match="not there"):
        param_importances(moved, tmp_path)
    # Recorded relative (study.run's default): the study folder's, never one in the working directory.
    relative = {**meta, "optuna_storage": "sqlite:///optuna.db"}
    monkeypatch.chdir(tmp_path)
    (tmp_path / "optuna.db").write_bytes(b"a decoy in the working directory")
    assert param_importances(relative, study)[0] == pytest.approx(param_importances(meta, study)[0])
    (tmp_path / "optuna.db").unlink()
    import optuna
    optuna.create_study(study_name="one", storage=f"sqlite:///{tmp_path / 'optuna.db'}").add_trial(
        optuna.trial.create_trial(params={}, distributions={}, value=1.0))
    with pytest.raises(ImportanceSkipped, match="rest on 1 completed Optuna trial.*under 10"):
        param_importances({"optuna_storage": f"sqlite:///{tmp_path / 'optuna.db'}", "name": "one"}, tmp_path)


def test_a_rerun_in_a_fresh_process_gives_identical_bytes_without_torch(study, report, tmp_path):
    out, _ = report
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # A file an earlier run made and this one no longer makes: the rerun removes it.
    (out / "curves_gone.png").write_bytes(b"stale")
    (out / MANIFEST).write_text((out / MANIFEST).read_text() + "curves_gone.png\n")
    # The CLI's own main in a process of its own, which must never have imported torch or Ray.
    code = ("import sys; from analysis.__main__ import main; rc = main(sys.argv[1:]); "
            "assert not {'torch', 'ray'} & set(sys.modules), 'torch or ray imported'; sys.exit(rc)")
    done = subprocess.run([PYTHON, "-c", code, "--study", str(study), "--out", str(out)],
                          cwd=tmp_path, env=python_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert after.keys() == before.keys()
    assert [name for name in sorted(after) if after[name] != before[name]] == []


# ------------------------------------------------------------------ bad input


def test_not_a_study_folder_exits_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "absent"):
        rc, err = analyse(folder, tmp_path / "out", capsys)
        assert rc == 2 and "is not a" in err
    assert not (tmp_path / "out").exists()
    done = subprocess.run([PYTHON, "-m", "analysis", "--study", str(tmp_path / "empty"), "--out", str(tmp_path / "out")],
                          cwd=tmp_path, env=python_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "not a study folder" in done.stderr


def test_without_previews_curves_are_made_and_grids_explained(study, tmp_path, capsys):
    folder = derived_study(study, tmp_path / "study", ["local_00001", SECOND_TRIAL], drop=("previews",))
    rc, err = analyse(folder, tmp_path / "out", capsys)
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert rc == 0
    assert "curves_samples_maxpool-upsample_uv.png" in files and "pruning.png" in files
    assert not any(f.startswith("grid_") for f in files)
    assert "previews.parquet is missing" in err
    assert "previews.parquet is missing" in (tmp_path / "out/report.md").read_text()


def test_a_variant_without_previews_is_named(study, tmp_path, capsys):
    folder = derived_study(study, tmp_path / "study", ["local_00001", "local_00003"])
    previews = pd.read_parquet(folder / "results/previews.parquet")
    previews[previews["trial_id"] != "local_00003"].to_parquet(folder / "results/previews.parquet", index=False)
    rc, err = analyse(folder, tmp_path / "out", capsys)
    assert rc == 0
    assert "samples / strided-transposed / uv: trial local_00003 has no previews" in err
    assert (tmp_path / "out/grid_samples_maxpool-upsample_uv.png").is_file()
    assert not (tmp_path / "out/grid_samples_strided-transposed_uv.png").exists()
    side = read_png(tmp_path / "out/grid_side_by_side_samples.png")
    assert side.std() > 0


def test_no_finished_trial_gives_a_provisional_report(study, tmp_path, capsys):
    def running(trials):
        return trials.assign(status="RUNNING")
    folder = derived_study(study, tmp_path / "study", ["local_00001"], edit=running)
    rc, err = analyse(folder, tmp_path / "out", capsys)
    assert rc == 0 and "no trial has finished yet (1 RUNNING)" in err
    assert "no trial has finished yet" in (tmp_path / "out/report.md").read_text()
    assert (tmp_path / "out/curves_samples_maxpool-upsample_uv.png").is_file()
    assert (tmp_path / "out/table_samples.csv").is_file()


def test_trials_without_any_epoch_and_missing_tables(study, tmp_path, capsys):
    def just_started(trials):
        # What trial_row writes before the first epoch: no best_*/final_* columns at all.
        keep = [c for c in trials.columns if not c.startswith(("best_", "final_")) and not c.endswith("gray_psnr")]
        return trials[keep].assign(status="RUNNING", epochs_run=0)
    folder = derived_study(study, tmp_path / "study", ["local_00001"], drop=("epochs", "previews"), edit=just_started)
    rc, err = analyse(folder, tmp_path / "out", capsys)
    assert rc == 0 and "no trial has reported an epoch yet" in err
    table = pd.read_csv(tmp_path / "out/table_samples.csv", keep_default_na=False)
    assert table["beats_grayscale"].tolist() == ["n/a"]

    (tmp_path / "bare").mkdir()
    (tmp_path / "bare/study.json").write_text("{}")
    rc, err = analyse(tmp_path / "bare", tmp_path / "bare-out", capsys)
    assert rc == 0 and "trials.parquet is missing" in err
    assert "trials.parquet is missing" in (tmp_path / "bare-out/report.md").read_text()


# ------------------------------------------------------------------ front, what helped, how fast


def test_pareto_front_keeps_exactly_the_undominated_trials(study, report):
    from analysis import tradeoffs
    from study.results.contract import default_trial
    out, _ = report
    s = load_study(study)
    data = tradeoffs.scored(s.trials)
    front = tradeoffs.pareto_front(data)
    x, y = tradeoffs.VIVIDNESS, tradeoffs.FIDELITY

    def dominated(r) -> bool:
        return bool(((data[x] >= r[x]) & (data[y] >= r[y]) & ((data[x] > r[x]) | (data[y] > r[y]))).any())
    on_front = set(front["trial_id"])
    assert on_front and all(dominated(r) != (r["trial_id"] in on_front) for _, r in data.iterrows())
    assert list(front[x]) == sorted(front[x]) and list(front[y]) == sorted(front[y], reverse=True)
    # A tie: the smaller trial id stands for both; a synthetic point that beats everything is the whole front.
    tied = pd.concat([data.assign(trial_id="zz_" + data["trial_id"]), data], ignore_index=True)
    assert set(tradeoffs.pareto_front(tied)["trial_id"]) == on_front
    top = data.iloc[[0]].assign(trial_id="top", **{x: data[x].max() + 1, y: data[y].max() + 1})
    assert list(tradeoffs.pareto_front(pd.concat([data, top]))["trial_id"]) == ["top"]
    # The table marks the trial study.colorize picks (the best val PSNR with a checkpoint).
    table = pd.read_csv(out / "pareto_samples.csv", keep_default_na=False)
    assert set(table["trial_id"]) == on_front
    raw = pd.read_parquet(study / "results/trials.parquet")
    best = raw.loc[raw["best_val_psnr"].idxmax(), "trial_id"]
    assert default_trial(s.trials)["trial_id"] == best
    assert list(table.loc[table["colorize_default"] == "yes", "trial_id"]) == ([best] if best in on_front else [])
    assert f"without `--dataset` it uses {best}" in (out / "report.md").read_text()


def test_what_helped_table_equals_the_parquet_data(study, report):
    out, _ = report
    table = pd.read_csv(out / "helped_samples.csv")
    trials = pd.read_parquet(study / "results/trials.parquet")
    trials["gain"] = trials["best_test_psnr"] - trials["test_gray_psnr"]
    # Never started_at, finished_at, seed...; nor temperature and rebalance, which keep their defaults.
    assert set(table["lever"]) == {"adversarial", "lr", "output", "sampling"}
    for _, row in table.iterrows():
        values = trials[trials[row["lever"]].map(lambda v: f"{v:g}" if isinstance(v, float) else str(v))
                        == str(row["value"])]["gain"]
        assert row["trials"] == len(values)
        assert row["median_test_gain_db"] == pytest.approx(values.median())
        assert row["best_test_gain_db"] == pytest.approx(values.max())


def test_what_helped_groups_a_searched_range_in_quartiles(study):
    from analysis import tradeoffs
    s = load_study(study)
    trials = s.trials.assign(lr=np.geomspace(3e-4, 3e-3, len(s.trials)))   # as a log-uniform search draws it
    table = tradeoffs.helped_table(trials, "samples", ["lr", "output"])
    lr = table[table["lever"] == "lr"]
    assert 2 <= len(lr) <= 4 and lr["trials"].sum() == len(trials)
    assert all("-" in v for v in lr["value"])
    assert set(table[table["lever"] == "output"]["value"]) == {"rgb", "uv", "uv-classes"}

    fig = tradeoffs.helped_figure(trials, "samples", ["lr", "output"])
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_xlabel() for ax in panels] == ["lr", "output"]
    assert all(ax.get_ylabel() == "test gain over grayscale (dB)" for ax in panels)
    data = tradeoffs.scored(trials)
    gains = data["best_test_psnr"] - data["test_gray_psnr"]
    # lr on a numeric axis: one point per trial at (its lr, its gain).
    points = np.concatenate([c.get_offsets() for c in panels[0].collections if len(c.get_offsets())])
    assert np.allclose(sorted(map(tuple, points)), sorted(zip(data["lr"], gains)))
    # output as categories: the ticks are its values, the points the gains, the bars the medians per value.
    output_ax = panels[1]
    assert [t.get_text() for t in output_ax.get_xticklabels()] == ["rgb", "uv", "uv-classes"]
    *strips, bars = [c for c in output_ax.collections if len(c.get_offsets())]
    assert sorted(np.concatenate([c.get_offsets() for c in strips])[:, 1]) == pytest.approx(sorted(gains))
    medians = gains.groupby(data["output"]).median()
    assert np.allclose(bars.get_offsets(), [(0, medians["rgb"]), (1, medians["uv"]), (2, medians["uv-classes"])])


def test_bookkeeping_columns_are_not_hyperparameters(study, tmp_path):
    def bookkeeping(trials):
        n = len(trials)
        return trials.assign(pack_id=np.arange(n) % 2, pack_size=2, restarts=np.arange(n), resumed_at_epoch=1,
                             gpu_ids=[str(i) for i in range(n)])
    folder = derived_study(study, tmp_path / "study", edit=bookkeeping)
    s = load_study(folder)
    assert s.trials["started_at"].nunique() > 1 and isinstance(s.trials["started_at"].dtype, pd.DatetimeTZDtype)
    assert s.hyperparameters() == ["adversarial", "lr", "output", "sampling"]


def test_progress_counts_every_epoch_once_and_a_pack_epoch_once(study):
    from analysis import tradeoffs
    s = load_study(study)
    curve = tradeoffs.progress(s.trials, s.epochs)
    assert len(curve) == len(s.epochs)
    assert curve["cumulative_seconds"].iloc[-1] == pytest.approx(s.epochs["seconds"].sum())
    assert curve["cumulative_seconds"].is_monotonic_increasing and curve["best_gain_db"].is_monotonic_increasing
    gains = s.epochs["val_psnr"] - s.epochs["val_gray_psnr"]
    assert curve["best_gain_db"].iloc[-1] == pytest.approx(gains.max())
    # Finished in time order: each trial's epochs after its start.
    assert curve.groupby("trial_id")["epoch"].apply(lambda e: e.is_monotonic_increasing).all()
    assert tradeoffs.device_kind(s.trials) == "CPU"
    # Two trials fused in one pack report the same epoch seconds: the device spent them once.
    packed = s.trials.assign(pack_id=pd.array([0, 0] + [None] * (len(s.trials) - 2), dtype="Int64"))
    epochs = s.epochs.copy()
    pair = packed["trial_id"].iloc[:2].tolist()
    for e in sorted(epochs["epoch"].unique()):
        rows = epochs["trial_id"].isin(pair) & (epochs["epoch"] == e)
        epochs.loc[rows, "seconds"] = 3.0
    total = tradeoffs.progress(packed, epochs)["cumulative_seconds"].iloc[-1]
    assert total == pytest.approx(epochs["seconds"].sum() - 3.0 * epochs["epoch"].nunique())


def test_importance_of_a_two_objective_study_is_for_the_first_objective(tmp_path):
    import optuna

    from analysis.importance import param_importances
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    opt = optuna.create_study(study_name="two", storage=storage, directions=["maximize", "maximize"])
    space = {"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
             "dropout": optuna.distributions.FloatDistribution(0.0, 0.5)}
    dropouts = np.random.default_rng(0).permutation(np.linspace(0.0, 0.5, 12))
    for lr, dropout in zip(np.geomspace(1e-4, 1e-2, 12), dropouts):   # 12: importance needs 10 completed trials
        # The first objective depends on lr alone, the second on dropout alone.
        opt.add_trial(optuna.trial.create_trial(params={"lr": float(lr), "dropout": float(dropout)}, distributions=space,
                                                values=[float(np.log10(lr)), float(dropout)]))
    importances, completed = param_importances({"optuna_storage": storage, "optuna_study_name": "two"}, tmp_path)
    assert list(importances) == ["lr", "dropout"] and importances["lr"] > 0.5 and completed == 12


def test_the_report_says_how_grayscale_photos_were_treated(study, report, tmp_path):
    import json
    import shutil
    out, rc = report
    assert rc == 0 and "Grayscale photos were left out" in (out / "report.md").read_text()
    # A study from before the rule was recorded kept them: the report says its baseline is inflated.
    old = tmp_path / "old"
    shutil.copytree(study, old, ignore=shutil.ignore_patterns("checkpoints"))
    meta = json.loads((old / "study.json").read_text())
    del meta["grayscale"]
    (old / "study.json").write_text(json.dumps(meta))
    assert main(["--study", str(old), "--out", str(tmp_path / "report")]) == 0
    assert "Grayscale photos were kept" in (tmp_path / "report" / "report.md").read_text()


# ------------------------------------------------------------------ a report that does not mislead


def test_a_healthy_study_has_no_warnings_and_unhealthy_ones_do(study, tmp_path):
    from analysis.build import write_report
    healthy = write_report(load_study(study), tmp_path / "healthy")
    assert healthy.warnings == []
    md = (tmp_path / "healthy/report.md").read_text()
    assert "## Warnings" not in md
    # Grayscale photos kept (a study from before the rule was recorded): the baseline is inflated.
    kept = derived_study(study, tmp_path / "kept")
    meta = json.loads((kept / "study.json").read_text())
    meta.pop("grayscale")
    (kept / "study.json").write_text(json.dumps(meta))
    _add_optuna_study(kept, pd.read_parquet(kept / "results/trials.parquet"))
    warnings = write_report(load_study(kept), tmp_path / "kept-out").warnings
    assert [w for w in warnings if "grayscale photos were kept" in w] and len(warnings) == 1, warnings
    assert "## Warnings" in (tmp_path / "kept-out/report.md").read_text()
    # Two trials: too few for importance.
    two = derived_study(study, tmp_path / "two", ["local_00001", SECOND_TRIAL])
    _add_optuna_study(two, pd.read_parquet(two / "results/trials.parquet"))
    warnings = write_report(load_study(two), tmp_path / "two-out").warnings
    assert len(warnings) == 1 and "rest on 2 completed" in warnings[0], warnings


def test_captions_match_their_figures(study, report):
    out, _ = report
    md = (out / "report.md").read_text()
    s = load_study(study)

    def caption(png: str) -> str:
        return md.split(f"]({png})\n\n*", 1)[1].split("*\n", 1)[0]
    pruning = figures.pruning_figure(s.trials, s.epochs)
    assert len(pruning.axes) == 2 and "Two panels" in caption("pruning.png")
    assert "so far" not in caption("pruning.png")   # the third panel it once promised is the progress figure
    curves = caption("curves_samples_maxpool-upsample_uv.png")
    assert "(left)" in curves and "(right)" in curves and "validation and test PSNR" in curves


def test_epoch_axes_have_whole_epochs_even_for_one_epoch(study):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    s = load_study(study)
    first = s.epochs[s.epochs["epoch"] == 1]
    trials = s.trials.assign(epochs_run=1)
    members = trials[(trials["sampling"] == "maxpool-upsample") & (trials["output"] == "uv")]
    for fig in (figures.curves_figure(first, members, "local_00001"), figures.pruning_figure(trials, first),
                figures.curves_figure(s.epochs, members, "local_00001")):
        FigureCanvasAgg(fig).draw()
        for ax in fig.axes:
            labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
            assert labels and all(label.isdigit() for label in labels), labels


def test_results_table_puts_what_matters_first_and_the_page_shows_only_that(report):
    from analysis.tables import COLUMNS, HTML_COLUMNS
    out, _ = report
    table = pd.read_csv(out / "table_samples.csv")
    assert list(table.columns[:10]) == ["sampling", "output", "test_gain_db", "val_gain_db", "val_psnr",
                                        "test_psnr", "val_colourfulness", "test_colourfulness", "beats_grayscale",
                                        "status"]
    assert list(table.columns) == [*COLUMNS, "depth", "adversarial", "lr"]   # then the best trial's configuration
    html = (out / "report.html").read_text()
    first = html.index("<table>")
    header = html[first:html.index("</tr>", first)]
    assert header == "<table>\n<tr>" + "".join(f"<th>{c}</th>" for c in HTML_COLUMNS)
    assert "| test_ssim |" in (out / "report.md").read_text()   # report.md keeps every column


def find_browser() -> str | None:
    import shutil
    return next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome", "chrome")
                 if shutil.which(b)), None)


MEASURE = """<script>
document.body.setAttribute('data-measure', JSON.stringify({width: document.documentElement.scrollWidth,
  height: document.documentElement.scrollHeight,
  tables: Array.from(document.querySelectorAll('table')).map(t => [t.scrollWidth, t.clientWidth])}));
</script>
</body>"""


def test_report_fits_a_1300px_window_in_a_real_browser(report, tmp_path):
    """report.html laid out by headless Chromium in a 1,300 px window: nothing wider than the window, no table
    that must scroll, and a full-page screenshot (docs/report-check.md runs the same check by hand)."""
    import html as html_lib
    import re
    import shutil
    browser = find_browser()
    if browser is None:
        pytest.skip("no Chromium or Chrome on PATH (Debian: apt-get install chromium): the page's width is unchecked")
    out, _ = report
    page = tmp_path / "page"
    shutil.copytree(out, page)
    (page / "measure.html").write_text((page / "report.html").read_text().replace("</body>", MEASURE))
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    dom = subprocess.run([*flags, "--window-size=1300,1000", "--dump-dom", (page / "measure.html").as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    found = re.search(r'data-measure="([^"]*)"', dom)
    assert found, dom[-2000:]
    measure = json.loads(html_lib.unescape(found.group(1)))
    assert measure["width"] <= 1300, measure
    assert measure["tables"] and all(scroll <= client for scroll, client in measure["tables"]), measure
    shot = tmp_path / "report.png"
    subprocess.run([*flags, f"--window-size=1300,{measure['height']}", f"--screenshot={shot}",
                    (page / "report.html").as_uri()], capture_output=True, timeout=120)
    pixels = read_png(shot)
    assert pixels.shape[1] == 1300 and pixels.shape[0] == measure["height"] and pixels.std() > 0


# ------------------------------------------------------------------ heads and levers


def test_temperature_curves_are_the_epochs_table_at_the_best_epoch(study, report):
    from analysis import tradeoffs
    from study.results.contract import CURVE_TEMPERATURES
    out, _ = report
    table = pd.read_csv(out / "temperature_curves_samples.csv")
    trials = pd.read_parquet(study / "results/trials.parquet").set_index("trial_id")
    epochs = pd.read_parquet(study / "results/epochs.parquet")
    assert list(table.columns) == ["trial_id", "best_epoch", "temperature", "rebalance", "val_gain_db",
                                   "val_colourfulness", "test_gain_db", "test_colourfulness"]
    assert list(table["trial_id"]) == [CLASSES_TRIAL] * len(CURVE_TEMPERATURES)
    assert list(table["temperature"]) == list(CURVE_TEMPERATURES)
    history = epochs[epochs["trial_id"] == CLASSES_TRIAL]
    best = history.loc[history["val_psnr"].idxmax()]
    assert (table["best_epoch"] == best["epoch"]).all() and best["epoch"] == trials.at[CLASSES_TRIAL, "best_epoch"]
    assert (table["rebalance"] == trials.at[CLASSES_TRIAL, "rebalance"]).all()
    for _, row in table.iterrows():
        t = f"t{round(row['temperature'] * 100):03d}"
        for split in ("val", "test"):
            assert row[f"{split}_gain_db"] == pytest.approx(best[f"{split}_psnr_{t}"] - best[f"{split}_gray_psnr"],
                                                            rel=1e-12)
            assert row[f"{split}_colourfulness"] == pytest.approx(best[f"{split}_colourfulness_{t}"], rel=1e-12)
    # At the trial's own temperature the curve is its own score, as the trials table has it.
    own = table[table["temperature"] == trials.at[CLASSES_TRIAL, "temperature"]].iloc[0]
    assert own["val_gain_db"] == pytest.approx(trials.at[CLASSES_TRIAL, "best_val_psnr"]
                                               - trials.at[CLASSES_TRIAL, "val_gray_psnr"], rel=1e-9)
    assert own["test_colourfulness"] == pytest.approx(trials.at[CLASSES_TRIAL, "best_test_colourfulness"], rel=1e-9)
    # The figure draws the same four points as one line, the trial's own temperature ringed.
    s = load_study(study)
    fig = tradeoffs.temperature_figure(s.trials, tradeoffs.temperature_curves(s.trials, s.epochs))
    ax = fig.axes[0]
    line, = [ln for ln in ax.lines if ln.get_label().startswith(CLASSES_TRIAL)]
    assert np.allclose(line.get_xydata(), table[["val_colourfulness", "val_gain_db"]].to_numpy())
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert [f"T = {t:g}" for t in CURVE_TEMPERATURES] == [x for x in labels if x.startswith("T = ")]
    md = (out / "report.md").read_text()
    assert "](temperature_curves.png)" in md and "No trial uses the classification head" not in md


def test_the_front_marks_each_trials_head_and_lever(study, report):
    from analysis import tradeoffs
    from analysis.figures import output_palette
    s = load_study(study)
    data = tradeoffs.scored(s.trials)
    fig = tradeoffs.pareto_figure(s.trials)
    ax = fig.axes[0]
    fig.draw_without_rendering()   # lays it out: the legend stands beside the panel, hiding no point
    assert ax.get_legend().get_window_extent().x0 >= ax.get_window_extent().x1
    assert ax.get_legend().get_window_extent().x1 <= fig.bbox.x1 + 1
    points = next(c for c in ax.collections if len(c.get_offsets()) == len(data))
    paths = [p.vertices for p in points.get_paths()]
    assert len(paths) == len(data)

    def marker_of(trial_id):
        row = data[data["trial_id"] == trial_id].iloc[0]
        at, = np.flatnonzero(np.isclose(points.get_offsets(), [row[tradeoffs.VIVIDNESS], row[tradeoffs.FIDELITY]])
                             .all(axis=1))
        return paths[at]
    others = [marker_of(t) for t in data["trial_id"] if t != ADVERSARIAL_TRIAL]
    assert all(np.array_equal(m, others[0]) for m in others)
    assert not np.array_equal(marker_of(ADVERSARIAL_TRIAL), others[0])
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[:legend.index("Pareto front")] == ["output", "rgb", "uv", "uv-classes", tradeoffs.LEVER, "none",
                                                     "adversarial"]
    # Without an adversarial trial, plain dots and no lever in the legend.
    plain = s.trials[s.trials["trial_id"] != ADVERSARIAL_TRIAL]
    ax = tradeoffs.pareto_figure(plain).axes[0]
    assert tradeoffs.LEVER not in [t.get_text() for t in ax.get_legend().get_texts()]
    assert len(ax.collections[0].get_paths()) == 1
    # A head keeps its colour in a study that lacks another head.
    assert output_palette(data[data["output"] != "rgb"]) == {k: v for k, v in output_palette(data).items() if k != "rgb"}
    # The front table names the head and the levers that vary, temperature and rebalance included when they do.
    front = pd.read_csv(report[0] / "pareto_samples.csv")
    assert {"output", "adversarial"} <= set(front.columns) and "temperature" not in front.columns
    s.trials = s.trials.assign(temperature=np.where(s.trials["output"] == "uv-classes", 1.0, 0.38),
                               rebalance=np.where(s.trials["output"] == "uv-classes", 0.0, 0.5))
    table = tradeoffs.front_table(s.trials, "samples", tradeoffs.levers(s.trials, s.hyperparameters()))
    assert {"output", "adversarial", "temperature", "rebalance"} <= set(table.columns)


def test_the_heads_strip_has_the_best_trial_of_each_head(study, report):
    from analysis import tradeoffs
    out, _ = report
    s = load_study(study)
    members = tradeoffs.head_members(s.trials, "samples")
    assert list(members["group"]) == ["rgb", "uv", "uv + adversarial", "uv-classes"]
    raw = pd.read_parquet(study / "results/trials.parquet")
    for _, member in members.iterrows():
        group = raw[(raw["output"] == member["output"]) & ((raw["adversarial"] > 0) == ("adversarial" in member["group"]))]
        assert member["trial_id"] == group.loc[group["best_val_psnr"].idxmax(), "trial_id"]
    grid = grids.strip_grid(grids.Previews(s.previews), members, list(members["group"]))
    assert len(grid.row_labels) == len(members) + 2 and grid.missing == 0
    assert grid.image.shape[:2] == ((len(members) + 2) * RESOLUTION, PREVIEWS * RESOLUTION)
    png = read_png(out / "heads_strip_samples.png")
    assert png.shape[:2] == (round((0.6 + (len(members) + 2) * grids.CELL_INCHES) * DPI),
                             round((2.0 + PREVIEWS * grids.CELL_INCHES) * DPI))
    assert "(`rgb`, `uv`, `uv + adversarial`, `uv-classes`)" in (out / "report.md").read_text()
    # A longer group label widens the label column rather than running off the figure's edge.
    assert grids.label_inches(["uv-classes + adversarial 0.1\nlocal_00005"]) > 2.0 == grids.label_inches(
        ["grayscale input", "uv + adversarial 0.05"])


def test_one_head_and_no_classification_trial_are_said_not_drawn(study, tmp_path, capsys):
    folder = derived_study(study, tmp_path / "study", ["local_00001", SECOND_TRIAL])
    rc, err = analyse(folder, tmp_path / "out", capsys)
    assert rc == 0 and "failed" not in err
    md = (tmp_path / "out/report.md").read_text()
    assert "No trial uses the classification head (`output: uv-classes`), so there are no temperature curves" in md
    assert "samples: every trial has the same head and adversarial setting (`uv`)" in md
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert not {"temperature_curves.png", "temperature_curves_samples.csv", "heads_strip_samples.png"} & files


def test_an_epochs_table_without_the_curve_still_analyses(study, tmp_path, capsys):
    from study.results.contract import CURVE_METRICS
    folder = derived_study(study, tmp_path / "study", ["local_00001", CLASSES_TRIAL])
    epochs = pd.read_parquet(folder / "results/epochs.parquet")
    epochs.drop(columns=list(CURVE_METRICS)).to_parquet(folder / "results/epochs.parquet", index=False)
    rc, err = analyse(folder, tmp_path / "out", capsys)
    assert rc == 0 and "failed" not in err and "could not be made" not in err
    md = (tmp_path / "out/report.md").read_text()
    assert "No `uv-classes` trial has metrics at the curve temperatures" in md
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert "temperature_curves.png" not in files and {"pareto.png", "heads_strip_samples.png"} <= files


# ------------------------------------------------------------------ stopped runs, a refused --out, a cut table


def _partial(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.partial-*"))


@pytest.mark.parametrize("sig, status, line", [(signal.SIGINT, 130, "interrupted (Ctrl-C)"),
                                               (signal.SIGTERM, 143, "terminated (SIGTERM)")])
@pytest.mark.parametrize("earlier", [False, True], ids=["new-out", "earlier-report"])
def test_a_stopped_run_leaves_out_as_it_was(study, report, tmp_path, sig, status, line, earlier):
    """Stopped while it draws, the command says so in one line, exits 130/143, and --out is as before:
    absent, or the earlier report byte for byte; no partial folder is left beside it."""
    import shutil
    out = tmp_path / "out"
    for _ in range(3):   # a loaded machine may let the command end between its last figure and the signal
        shutil.rmtree(out, ignore_errors=True)
        if earlier:
            shutil.copytree(report[0], out)
        before = {p.name: p.read_bytes() for p in out.iterdir()} if earlier else None
        p = subprocess.Popen([PYTHON, "-m", "analysis", "--study", str(study), "--out", str(out)], cwd=tmp_path,
                             env=python_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=shell_signals)
        deadline = time.monotonic() + 240
        while not any(any(q.suffix == ".png" for q in d.iterdir()) for d in _partial(out)):   # figures under way
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()
            time.sleep(0.1)
        p.send_signal(sig)
        stdout, err = p.communicate(timeout=120)
        if p.returncode != 0:
            break
        assert (out / "report.md").is_file() and _partial(out) == [], err   # it ended first, whole
    assert p.returncode == status, err
    shown = [ln for ln in err.splitlines() if not ln.startswith("warning:")]
    assert shown == [line] and "Traceback" not in err, err
    assert _partial(out) == []
    if earlier:
        assert {q.name: q.read_bytes() for q in out.iterdir()} == before
    else:
        assert not out.exists()


@pytest.mark.parametrize("inside", ["results", "results/report", "results/a/b"])
def test_out_inside_the_studys_results_is_refused(study, tmp_path, capsys, inside):
    folder = derived_study(study, tmp_path / "study", ["local_00001"])
    listing = sorted(str(p) for p in folder.rglob("*"))
    rc, err = analyse(folder, folder / inside, capsys)
    assert rc == 2 and err.startswith(f"error: --out {folder / inside} is inside the study's results folder"), err
    assert sorted(str(p) for p in folder.rglob("*")) == listing


def test_a_cut_trials_table_is_called_unreadable_and_nothing_else(study, tmp_path, capsys):
    folder = derived_study(study, tmp_path / "study", ["local_00001"])
    table = folder / "results/trials.parquet"
    table.write_bytes(table.read_bytes()[: table.stat().st_size // 2])
    rc, err = analyse(folder, tmp_path / "out", capsys)
    assert rc == 0 and "results/trials.parquet is unreadable" in err
    assert "no trial has started" not in err and "trials table is empty" not in err


# ------------------------------------------------------------------ replayed search strategies


def test_replay_refuses_a_study_of_three_trials_and_writes_nothing(study, tmp_path, capsys):
    folder = derived_study(study, tmp_path / "study", ["local_00001", "local_00002", "local_00003"])
    rc = main(["--study", str(folder), "--out", str(tmp_path / "out"), "--replay"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith("error: --replay: the study study has 3 trial(s) with recorded epochs; a replay needs at "
                          "least 4")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_replay_reports_the_compute_each_strategy_needs_to_find_the_best_trial(study, tmp_path, capsys):
    from analysis.replay import STRATEGIES
    from analysis.replay_study import study_curves
    from analysis.load import load_study

    rc = main(["--study", str(study), "--out", str(tmp_path / "out"), "--replay", "--replay-seeds", "3"])
    assert rc == 0, capsys.readouterr().err
    report = (tmp_path / "out/report.md").read_text()
    trials = pd.read_parquet(study / "results/trials.parquet")
    assert "## Replayed search strategies" in report
    assert f"This rests on the study's {len(trials)} trials with recorded epochs" in report
    assert "can only propose configurations this study sampled" in report
    table = pd.read_csv(tmp_path / "out/replay.csv")
    assert table["strategy"].tolist() == [s.name for s in STRATEGIES] and (table["seeds"] == 3).all()
    assert (tmp_path / "out/replay.png").stat().st_size > 10_000
    # The curves are the study's own rows: each trial's val PSNR per epoch, and its best is the study's best.
    curves = study_curves(load_study(study))
    epochs = pd.read_parquet(study / "results/epochs.parquet")
    for k, trial_id in enumerate(curves.ids):
        mine = epochs[epochs["trial_id"] == trial_id].sort_values("epoch")
        assert curves.val[k, :curves.length[k]].tolist() == mine["val_psnr"].tolist()
    assert curves.ids[curves.best()] == best_per_variant(trials.assign(dataset="all", sampling="", output=""))["trial_id"][0]
    assert "lr" in {a.name for a in curves.axes} and "sampling" in {a.name for a in curves.axes}
