"""From a loaded study to the output folder: figures, tables, report.md and report.html.

Every section makes what the data allows and says what it could not make:
a study that is still running, or lacks a table, still gets a report.
Nothing here depends on the clock or on where the folders are, and every
loop runs over sorted keys, so a rerun on the same data writes the same bytes.
The report is made in a hidden folder beside the output folder and moved into
place once complete: a stopped run leaves the output folder as it was.
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from analysis import figures, grids, replay_study, tradeoffs
from analysis.importance import MIN_COMPLETED, STABLE_COMPLETED, ImportanceSkipped, param_importances
from analysis.load import VARIANT, Study, best_per_variant, slug, variant_label, variants
from analysis.report import Block, Bullets, Heading, Image, Table, Text, to_html, to_markdown
from analysis.style import save
from analysis.tables import EXPLANATION, HTML_COLUMNS, format_table, results_table
from study.results import FINISHED

MANIFEST = ".analysis-files"   # what the last run wrote, so files it no longer makes are removed


class Skip(Exception):
    """A figure the data does not allow; the message (a warning) says why."""


@dataclass
class Output:
    """What one run wrote and what it had to say about the study."""
    folder: Path
    warn: Callable[[str], None]
    blocks: list[Block] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def warning(self, message: str) -> None:
        self.warnings.append(message)
        self.warn(message)

    def figure(self, file: str, build, caption: str) -> bool:
        """Build, save and embed one figure; a failure is a warning and the report goes on."""
        try:
            save(build(), self.folder / file)
        except Skip as e:
            self.warning(str(e))
            return False
        except Exception as e:  # odd data in a running study must not cost the rest of the report
            self.warning(f"{file} could not be made ({type(e).__name__}: {e})")
            return False
        self.files.append(file)
        self.blocks.append(Image(file, caption))
        return True

    def table(self, frame: pd.DataFrame, caption: str, csv: str | None = None,
              html_columns: tuple[str, ...] | None = None) -> None:
        """A table in both reports (and ``csv``); report.html shows only ``html_columns`` when given."""
        if csv:
            frame.to_csv(self.folder / csv, index=False, lineterminator="\n")
            self.files.append(csv)
            caption += f" (CSV: `{csv}`)"
        self.blocks.append(Table(format_table(frame), caption, html_columns))

    def text(self, text: str) -> None:
        self.blocks.append(Text(text))

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(Heading(text, level))


def write_report(study: Study, out: str | Path, warn: Callable[[str], None] = lambda m: None,
                 replay: tuple | None = None) -> Output:
    """The report of ``study`` in ``out``: written into a hidden folder beside it and moved into place at
    the end, so an interrupted run (Ctrl-C, SIGTERM, an error) leaves ``out`` as it was and nothing else."""
    out_dir = Path(out).absolute()
    made = [p for p in (out_dir.parent, *out_dir.parent.parents) if not p.exists()]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.partial-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        output = _write_into(study, staging, warn, replay)
        _move_into_place(staging, out_dir, output.files + ["report.md", "report.html"])
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in made:   # innermost first; only folders this run made, and only while empty
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    output.folder = out_dir
    return output


def _write_into(study: Study, folder: Path, warn: Callable[[str], None], replay: tuple | None = None) -> Output:
    output = Output(folder, warn)
    for message in study.warnings:
        output.warning(message)
    if _grayscale_rule(study) == "kept":
        output.warning("grayscale photos were kept in the data splits: the grayscale input's baseline is inflated "
                       "(it scores ~110 dB on each of them) and every gain over it is understated")
    _check_progress(study, output)
    best = best_per_variant(study.trials)
    for section in (_results, _failed, _tradeoff, _temperature, _heads, _helped, _progress, _curves, _grids, _side_by_side,
                    _hyperparameters, _pruning, _importance):
        try:
            section(study, best, output)
        except Exception as e:  # one broken section still leaves the others and the report
            output.warning(f"{section.__name__.strip('_')} section failed ({type(e).__name__}: {e})")
    if replay is not None:   # (curves, settings) of analysis.replay_study, checked before anything was written
        replay_study.section(study, *replay, output)

    blocks = [Heading(f"Study report: {study.name}", 1), Text(_summary(study))]
    if output.warnings:
        blocks += [Heading("Warnings"), Bullets(tuple(output.warnings))]
    blocks += output.blocks
    # Bytes, not text mode: the same UTF-8 and "\n" on every platform.
    (folder / "report.md").write_bytes(to_markdown(blocks).encode())
    (folder / "report.html").write_bytes(to_html(blocks, f"Study report: {study.name}").encode())
    (folder / MANIFEST).write_bytes("".join(f"{name}\n" for name in output.files + ["report.md", "report.html"]
                                            ).encode())
    return output


def _move_into_place(staging: Path, out: Path, files: list[str]) -> None:
    """``staging`` becomes ``out``: one rename when ``out`` is new; else each file replaces its old version and
    what the previous run wrote and this one did not is removed (files not ours are left alone). Ctrl-C and
    SIGTERM wait until this is done."""
    with _signals_held():
        if not out.exists():
            staging.rename(out)
            return
        manifest = out / MANIFEST
        previous = manifest.read_bytes().decode().split() if manifest.is_file() else []
        for name in [*files, MANIFEST]:
            os.replace(staging / name, out / name)
        for name in sorted(set(previous) - set(files)):
            if "/" not in name:   # only ever our own flat file names
                (out / name).unlink(missing_ok=True)
        staging.rmdir()


@contextmanager
def _signals_held():
    """SIGINT and SIGTERM are delivered after the block (the main thread's handlers then run as usual)."""
    held = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, held)


def _summary(study: Study) -> str:
    counts = ", ".join(f"{n} {s}" for s, n in study.status_counts().items() if n)
    meta = ", ".join(f"{k} `{study.meta[k]}`" for k in ("space", "metric") if study.meta.get(k))
    gray = _grayscale_rule(study)
    data = {"left out": " Grayscale photos were left out of the data splits, so the grayscale baseline is "
                        "scored on colour photos only.",
            "kept": " Grayscale photos were kept in the data splits: the grayscale input scores ~110 dB on each, "
                    "so its baseline is inflated and gains over it are understated."}.get(gray, "")
    return (f"{len(study.trials)} trials ({counts or 'none'}), {len(study.epochs)} epochs reported"
            + (f"; {meta}" if meta else "") + ". A variant is dataset x sampling technique x output space; each "
            "is represented by its trial with the highest validation PSNR (in RGB, never by loss: RGB and UV "
            "losses live in different spaces)." + data)


def _grayscale_rule(study: Study) -> str | None:
    """"left out" or "kept": what the study did with grayscale photos; None when study.json is missing."""
    # Studies from before study.json recorded the rule kept their grayscale photos (study.engine.data).
    return study.meta.get("grayscale", "kept") if study.meta else None


def _check_progress(study: Study, output: Output) -> None:
    if study.present["trials"] and study.trials.empty and "trials" not in study.unreadable:
        output.warning("the trials table is empty: no trial has started")
    elif not study.trials.empty and not study.trials["status"].isin(FINISHED).any():
        counts = ", ".join(f"{n} {s}" for s, n in study.status_counts().items() if n)
        output.warning(f"no trial has finished yet ({counts}): every number below is provisional")
    if not study.trials.empty and study.trials["best_val_psnr"].isna().all():
        output.warning("no trial has reported an epoch yet: the tables hold no metrics and there are no "
                       "curves, grids or PSNR plots")


# ------------------------------------------------------------------ sections


def _results(study: Study, best: pd.DataFrame, output: Output) -> None:
    output.heading("Results per dataset")
    datasets = sorted(study.trials["dataset"].dropna().unique())
    if not datasets:
        output.text("No trials, so no results table.")
        return
    output.text(EXPLANATION)
    for dataset in datasets:
        output.heading(dataset, 3)
        output.table(results_table(study.trials, dataset, ["depth", *study.hyperparameters()]),
                     f"Best trial per variant on {dataset}", csv=f"table_{slug(dataset)}.csv",
                     html_columns=HTML_COLUMNS)


def _failed(study: Study, best: pd.DataFrame, output: Output) -> None:
    failed = study.trials[study.trials["status"] == "ERROR"]
    if failed.empty:
        return
    output.heading("Failed trials")
    frame = pd.DataFrame({"trial_id": failed["trial_id"],
                          "variant": [variant_label(v) for v in failed[list(VARIANT)].values],
                          "epochs_run": failed["epochs_run"],
                          "error": [str(e)[:160] for e in failed["error"]]})
    output.table(frame, f"{len(failed)} trial(s) ended in ERROR")


def _curves(study: Study, best: pd.DataFrame, output: Output) -> None:
    output.heading("Learning curves")
    _missing_variants(study, best, output, "no curves")
    trained = set(study.epochs["trial_id"])
    for _, trial in best.iterrows():
        variant = _variant(trial)
        members = study.trials[(study.trials[list(VARIANT)] == list(variant)).all(axis=1)]

        def build():
            if trial["trial_id"] not in trained:
                raise Skip(f"{variant_label(variant)}: trial {trial['trial_id']} has no rows in the epochs "
                           "table: no curves")
            return figures.curves_figure(study.epochs, members, trial["trial_id"])
        output.figure(f"curves_{slug(*variant)}.png", build,
                      f"{variant_label(variant)}: training, validation and test loss (left) and validation and "
                      f"test PSNR with the grayscale input's as dashed lines (right) against epoch of trial "
                      f"{trial['trial_id']} (best of {len(members)}; others faint).")


def _variant(trial: pd.Series) -> tuple[str, str, str]:
    return tuple(trial[list(VARIANT)])


def _missing_variants(study: Study, best: pd.DataFrame, output: Output, what: str) -> None:
    """Warn about the variants none of whose trials has reported an epoch."""
    shown = set(map(tuple, best[list(VARIANT)].values.tolist()))
    for variant in variants(study.trials):
        if variant not in shown:
            output.warning(f"{variant_label(variant)}: no trial has reported an epoch yet: {what}")


def _grids(study: Study, best: pd.DataFrame, output: Output) -> None:
    output.heading("Visual grids")
    if study.previews.empty:
        if study.present["previews"]:
            output.warning("the previews table holds no images: no visual grids")
        output.text("No preview images in the study, so no visual grids.")
        return
    previews = grids.Previews(study.previews)
    for _, trial in best.iterrows():
        variant = variant_label(_variant(trial))
        file = f"grid_{slug(*_variant(trial))}.png"
        epoch = previews.preview_epoch(trial)

        def build():
            if epoch is None:
                raise Skip(f"{variant}: trial {trial['trial_id']} has no previews: no visual grid")
            grid = grids.variant_grid(previews, trial, epoch)
            _note_missing(grid, file, output)
            return grids.grid_figure(grid, f"{variant}: {trial['trial_id']}, epoch {epoch}")
        output.figure(file, build, f"{variant}: grayscale inputs, originals and predictions of trial "
                                   f"{trial['trial_id']} at epoch {epoch} on the fixed preview images.")


def _side_by_side(study: Study, best: pd.DataFrame, output: Output) -> None:
    if study.previews.empty or best.empty:
        return
    output.heading("Variants side by side")
    previews = grids.Previews(study.previews)
    for dataset in sorted(best["dataset"].unique()):
        file = f"grid_side_by_side_{slug(dataset)}.png"

        def build():
            made = grids.side_by_side_grid(previews, best[best["dataset"] == dataset])
            if made is None:
                raise Skip(f"{dataset}: no variant has previews: no side-by-side grid")
            grid, left_out = made
            for label in left_out:
                output.warning(f"{file}: {dataset} / {label} is at another resolution and is left out")
            _note_missing(grid, file, output)
            return grids.grid_figure(grid, f"{dataset}: every variant's best trial")
        output.figure(file, build, f"{dataset}: the same preview images through every variant's best trial (one "
                                   "row per variant), to judge RGB against UV and one sampling technique against another.")


def _note_missing(grid: grids.Grid, file: str, output: Output) -> None:
    if grid.missing:
        output.warning(f"{file}: {grid.missing} preview image(s) missing or unreadable (grey cells)")


def _hyperparameters(study: Study, best: pd.DataFrame, output: Output) -> None:
    output.heading("Test PSNR by variant")
    if figures.scored(study.trials).empty:
        output.text("No trial has a test PSNR yet.")
        return
    output.figure("psnr_by_variant.png", lambda: figures.psnr_by_variant_figure(study.trials),
                  "Every trial's test PSNR by dataset, output space, sampling technique and depth; "
                  "the dashed line is the grayscale input.")


def _tradeoff(study: Study, best: pd.DataFrame, output: Output) -> None:
    output.heading("Fidelity against vividness")
    data = tradeoffs.scored(study.trials)
    if data.empty:
        output.text("No trial has reported an epoch yet, so no Pareto front.")
        return
    chosen = tradeoffs.colorize_default(study.trials)
    output.text("Each trial at its best validation epoch: its validation PSNR gain over the grayscale input "
                "(fidelity) against its colourfulness ratio (vividness; 1 = as colourful as the originals). "
                "The Pareto front holds the trials no other trial beats on both; the star is the trial "
                "`python -m study.colorize --dataset <dataset>` uses by default (the best validation PSNR "
                "among DONE trials with a checkpoint)"
                + (f"; without `--dataset` it uses {chosen['trial_id']} ({chosen['dataset']})." if chosen is not None
                   else "; no trial has a checkpoint yet."))
    output.figure("pareto.png", lambda: tradeoffs.pareto_figure(study.trials),
                  "Validation PSNR gain over grayscale against colourfulness ratio, one point per trial, per "
                  "dataset; the front is joined and ringed, the star is colorize's default.")
    levers = tradeoffs.levers(study.trials, study.hyperparameters())
    previews = grids.Previews(study.previews) if not study.previews.empty else None
    for dataset in sorted(data["dataset"].unique()):
        table = tradeoffs.front_table(study.trials, dataset, levers)
        output.table(table, f"{dataset}: the Pareto front, from the most faithful to the most vivid",
                     csv=f"pareto_{slug(dataset)}.csv", html_columns=_front_html_columns(table))
        if previews is None:
            continue
        members = tradeoffs.strip_members(tradeoffs.pareto_front(data[data["dataset"] == dataset]))
        file = f"pareto_strip_{slug(dataset)}.png"

        def build():
            labels = [f"{t['trial_id']}\n{t[tradeoffs.FIDELITY]:+.2f} dB, colour {t[tradeoffs.VIVIDNESS]:.2f}"
                      for _, t in members.iterrows()]
            grid = grids.strip_grid(previews, members, labels)
            if grid is None:
                raise Skip(f"{dataset}: no Pareto front member has previews: no preview strip")
            _note_missing(grid, file, output)
            return grids.grid_figure(grid, f"{dataset}: Pareto front members, most faithful first")
        output.figure(file, build, f"{dataset}: up to four Pareto front members, from the most faithful to the "
                                   "most vivid, on the fixed preview images.")


# The page holds the front's objectives and four levers at most (it must fit a 1,300 px window), the head
# and the colour levers first; report.md and the CSV have every lever that varies.
FRONT_HTML_COLUMNS = ("trial_id", "colorize_default", "val_gain_db", "val_colourfulness", "test_gain_db",
                      "test_colourfulness")
FRONT_HTML_LEVERS = 4
COLOUR_LEVERS = ("output", "adversarial", "chroma_weight", "temperature", "rebalance")


def _front_html_columns(table: pd.DataFrame) -> tuple[str, ...]:
    shown = [c for c in FRONT_HTML_COLUMNS if c in table]
    levers = [c for c in COLOUR_LEVERS if c in table] + [c for c in table if c not in (*shown, *COLOUR_LEVERS,
                                                                                       "best_epoch")]
    return (*shown, *levers[:FRONT_HTML_LEVERS])


def _temperature(study: Study, best: pd.DataFrame, output: Output) -> None:
    output.heading("Decoding temperature")
    if not (study.trials["output"] == tradeoffs.CLASSES).any():
        output.text(f"No trial uses the classification head (`output: {tradeoffs.CLASSES}`), so there are no "
                    "temperature curves.")
        return
    curves = tradeoffs.temperature_curves(study.trials, study.epochs)
    if curves.empty:
        output.text(f"No `{tradeoffs.CLASSES}` trial has metrics at the curve temperatures in the epochs table "
                    "(none has reported an epoch, or the study predates them), so there are no temperature curves.")
        return
    temperatures = ", ".join(f"{t:g}" for t in tradeoffs.CURVE_TEMPERATURES)
    output.text(f"A classification trial decodes its predicted colour distribution at a temperature T (the "
                "annealed mean: T = 1 the mean colour, towards 0 the most likely one), and every evaluation also "
                f"measures it at T = {temperatures}. Without a discriminator, training does not depend on T, so "
                "each curve is what the same trial would score at those temperatures: one trained model moves "
                "along the fidelity/vividness trade without retraining. Each trial at its best validation epoch.")
    output.figure("temperature_curves.png", lambda: tradeoffs.temperature_figure(study.trials, curves),
                  "Validation PSNR gain over grayscale against colourfulness ratio of each classification trial "
                  f"decoded at T = {temperatures} (marker per temperature, line per trial, the trial's own "
                  "temperature ringed), over every trial's point in grey.")
    for dataset, table in curves.groupby("dataset", sort=True):
        output.table(table[list(tradeoffs.CURVE_COLUMNS)],
                     f"{dataset}: each classification trial at its best validation epoch, decoded at each "
                     "curve temperature (test columns n/a where the study did not record them)",
                     csv=f"temperature_curves_{slug(dataset)}.csv")


def _heads(study: Study, best: pd.DataFrame, output: Output) -> None:
    data = tradeoffs.scored(study.trials)
    if data.empty:
        return
    output.heading("Heads on the same images")
    previews = grids.Previews(study.previews) if not study.previews.empty else None
    for dataset in sorted(data["dataset"].unique()):
        members = tradeoffs.head_members(study.trials, dataset)
        groups = ", ".join(f"`{g}`" for g in members["group"])
        if len(members) < 2:
            output.text(f"{dataset}: every trial has the same head and adversarial setting ({groups}), so there "
                        "are no heads to compare.")
            continue
        if previews is None:
            output.text(f"{dataset}: no preview images in the study, so no strip comparing the heads ({groups}).")
            continue
        file = f"heads_strip_{slug(dataset)}.png"

        def build():
            # Short lines: the labels share the figure's fixed left margin.
            labels = [f"{t['group']}" + (f" {t['adversarial']:g}" if "adversarial" in t['group'] else "")
                      + f"\n{t['trial_id']}\n{t[tradeoffs.FIDELITY]:+.2f} dB, colour {t[tradeoffs.VIVIDNESS]:.2f}"
                      for _, t in members.iterrows()]
            grid = grids.strip_grid(previews, members, labels)
            if grid is None:
                raise Skip(f"{dataset}: no head's best trial has previews: no heads strip")
            shown = len(grid.row_labels) - 2
            if shown < len(members):
                output.warning(f"{file}: {len(members) - shown} of the {len(members)} heads' best trials have no "
                               "previews and are left out")
            _note_missing(grid, file, output)
            return grids.grid_figure(grid, f"{dataset}: each head's best trial")
        output.figure(file, build, f"{dataset}: the same preview images through the best trial (highest validation "
                                   f"PSNR) of each head and adversarial setting ({groups}), one row each after "
                                   "the grayscale inputs and the originals; each row gives the trial's validation "
                                   "gain over grayscale and colourfulness ratio.")


def _helped(study: Study, best: pd.DataFrame, output: Output) -> None:
    output.heading("What helped")
    data = tradeoffs.scored(study.trials)
    levers = tradeoffs.levers(study.trials, study.hyperparameters())
    if data.empty or not levers:
        output.text("Nothing to compare: " + ("no trial has reported an epoch yet." if data.empty else
                                              "no configuration value varies within a dataset."))
        return
    output.text("Each trial's test PSNR gain over the grayscale input (at its best validation epoch) against "
                "each lever that varies, per dataset. Levers are not varied one at a time in a search, so read "
                "these as where good trials lie, not as controlled effects.")
    for dataset in sorted(data["dataset"].unique()):
        table = tradeoffs.helped_table(study.trials, dataset, levers)
        if table.empty:
            output.text(f"{dataset}: no lever varies among its trials.")
            continue
        output.figure(f"helped_{slug(dataset)}.png", lambda: tradeoffs.helped_figure(study.trials, dataset, levers),
                      f"{dataset}: test gain over grayscale against each lever, one panel per lever, one point "
                      "per trial; on a panel of categories the bar is the median per value.")
        output.table(table, f"{dataset}: trials, median and best test gain (dB) per lever value",
                     csv=f"helped_{slug(dataset)}.csv")


def _progress(study: Study, best: pd.DataFrame, output: Output) -> None:
    output.heading("How fast the study found it")
    if study.epochs.empty or study.trials.empty:
        output.text("No epochs reported yet.")
        return
    kind = tradeoffs.device_kind(study.trials)
    output.figure("progress.png", lambda: tradeoffs.progress_figure(study.trials, study.epochs),
                  f"Per dataset, the best validation gain over grayscale found so far against the {kind} seconds "
                  "all trials had spent (each epoch's own seconds; a fused pack's epoch counted once), so "
                  "studies and settings can be compared by cost.")


def _pruning(study: Study, best: pd.DataFrame, output: Output) -> None:
    output.heading("Pruning")
    if study.trials.empty:
        output.text("No trials, so no pruning picture.")
        return
    output.figure("pruning.png", lambda: figures.pruning_figure(study.trials, study.epochs),
                  "Two panels: epochs run per trial by status (left), and each trial's best validation PSNR "
                  "against its epochs run, by status (right). The best found against the seconds spent is in "
                  "\"How fast the study found it\".")


def _importance(study: Study, best: pd.DataFrame, output: Output) -> None:
    output.heading("Hyperparameter importance")
    try:
        importances, completed = param_importances(study.meta, study.folder)
    except ImportanceSkipped as e:
        output.warning(f"hyperparameter importance not shown: {e}")
        output.text(f"Not shown: {e}.")
        return
    basis = f"from {completed} completed Optuna trials"
    if completed < STABLE_COMPLETED:
        basis += (f" (fewer than the {STABLE_COMPLETED} Optuna's documentation prefers for a stable ranking: "
                  "read it with \"What helped\")")
    output.text(f"Importance {basis}. Importances are shown from {MIN_COMPLETED} completed trials on: Optuna's "
                f"evaluator (PED-ANOVA) compares the best 10% of trials with all, and with fewer that top set "
                "is just the 2 best.")
    frame = pd.DataFrame({"parameter": list(importances), "importance": list(importances.values())})
    output.table(frame, f"optuna.importance.get_param_importances on the Optuna study, {basis}, normalised to "
                        "sum 1", csv="importance.csv")
    objective = f" ({study.meta['metric']})" if study.meta.get("metric") else ""
    output.figure("importance.png", lambda: figures.importance_figure(importances, completed),
                  f"Hyperparameter importance for the Optuna objective{objective}, {basis}.")
