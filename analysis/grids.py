"""Visual grids of the fixed preview images: grayscale input, original, predictions."""
from __future__ import annotations

import io
from dataclasses import dataclass

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.style import new_figure, styled

MISSING = 0.5          # a preview that is not in the table shows as a mid-grey cell
CELL_INCHES = 1.3      # each image's size in the saved figure, whatever its resolution


@dataclass
class Grid:
    """Equal-size images composed into rows: ``image`` is (rows*H, columns*W, 3) floats in [0, 1]."""
    image: np.ndarray
    row_labels: list[str]
    image_indices: list[int]
    missing: int                 # cells without a preview


class Previews:
    """Look-ups into the previews table (PNG bytes keyed as in study/results/store.py)."""

    def __init__(self, df: pd.DataFrame):
        self.df = df

    def reference(self, dataset: str, resolution: int, kind: str) -> dict[int, bytes]:
        rows = self.df[(self.df["kind"] == kind) & (self.df["dataset"] == dataset)
                       & (self.df["resolution"] == resolution)]
        return dict(zip(rows["image_index"].astype(int), rows["png"]))

    def predictions(self, trial_id: str, epoch: int) -> dict[int, bytes]:
        rows = self.df[(self.df["kind"] == "prediction") & (self.df["trial_id"] == trial_id)
                       & (self.df["epoch"] == epoch)]
        return dict(zip(rows["image_index"].astype(int), rows["png"]))

    def preview_epoch(self, trial: pd.Series) -> int | None:
        """The trial's best epoch when it has previews, else its latest epoch that has; None if none."""
        rows = self.df[(self.df["kind"] == "prediction") & (self.df["trial_id"] == trial["trial_id"])]
        epochs = sorted(set(rows["epoch"].astype(int)))
        if not epochs:
            return None
        best = trial.get("best_epoch")
        return int(best) if pd.notna(best) and int(best) in epochs else epochs[-1]


def decode(png: bytes) -> np.ndarray:
    """PNG bytes as (H, W, 3) floats in [0, 1]; grayscale PNGs are repeated over RGB."""
    # matplotlib returns PNGs as floats in [0, 1] already, whatever their bit depth.
    image = mpimg.imread(io.BytesIO(png), format="png").astype(np.float64)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return image[..., :3]


def compose(rows: list[dict[int, bytes]], indices: list[int], labels: list[str]) -> Grid:
    """One row per dict of previews, one column per image index; unreadable or absent cells are grey."""
    images = [[_decode_or_none(row.get(i)) for i in indices] for row in rows]
    shapes = [im.shape for row in images for im in row if im is not None]
    if not shapes:
        raise ValueError("no readable preview image")
    # The most common shape is the cell; an image of another size is a stray, shown as missing.
    cell = max(sorted(set(shapes)), key=shapes.count)
    blank = np.full(cell, MISSING)
    cells = [[im if im is not None and im.shape == cell else blank for im in row] for row in images]
    missing = sum(im is None or im.shape != cell for row in images for im in row)
    image = np.concatenate([np.concatenate(row, axis=1) for row in cells], axis=0)
    return Grid(image, labels, indices, missing)


def _decode_or_none(png: bytes | None) -> np.ndarray | None:
    if png is None:
        return None
    try:
        return decode(png)
    except Exception:  # a corrupt PNG is one grey cell, not a failed report
        return None


def variant_grid(previews: Previews, trial: pd.Series, epoch: int) -> Grid:
    """Grayscale inputs, originals and the trial's predictions at ``epoch`` (rows) on its preview images."""
    dataset, resolution = trial["dataset"], int(trial["resolution"])
    predicted = previews.predictions(trial["trial_id"], epoch)
    rows = [previews.reference(dataset, resolution, "grayscale"), previews.reference(dataset, resolution, "original"),
            predicted]
    labels = ["grayscale input", "original", f"prediction\n{trial['trial_id']}, epoch {epoch}"]
    return compose(rows, sorted(predicted), labels)


def side_by_side_grid(previews: Previews, best: pd.DataFrame) -> tuple[Grid, list[str]] | None:
    """One dataset's variants (rows, after grayscale and original) on the same preview images.

    ``best`` holds each variant's best trial. Only variants at the dataset's
    most common resolution can share images; the others are returned by
    label so the caller can say they were left out.
    """
    with_previews = [(t, previews.preview_epoch(t)) for _, t in best.iterrows()]
    with_previews = [(t, e) for t, e in with_previews if e is not None]
    if not with_previews:
        return None
    resolutions = [int(t["resolution"]) for t, _ in with_previews]
    resolution = max(sorted(set(resolutions)), key=resolutions.count)
    shown = [(t, e) for t, e in with_previews if int(t["resolution"]) == resolution]
    left_out = [f"{t['sampling']} / {t['output']}" for t, _ in with_previews if int(t["resolution"]) != resolution]
    predicted = [previews.predictions(t["trial_id"], e) for t, e in shown]
    # Columns: the images every variant predicted (the same indices when preview_count agrees),
    # falling back to all of them so differing counts still give a grid.
    common = set.intersection(*(set(p) for p in predicted))
    indices = sorted(common or set().union(*predicted))
    dataset = shown[0][0]["dataset"]
    rows = [previews.reference(dataset, resolution, "grayscale"), previews.reference(dataset, resolution, "original"),
            *predicted]
    labels = ["grayscale input", "original", *(f"{t['sampling']}\n{t['output']}, depth {int(t['depth'])}"
                                               for t, _ in shown)]
    return compose(rows, indices, labels), left_out


def strip_grid(previews: Previews, members: pd.DataFrame, labels: list[str]) -> Grid | None:
    """Grayscale inputs, originals, then one row per member (its preview epoch), on the images all share.

    ``members`` are trials of one dataset and resolution (e.g. a few Pareto-front members); None when
    none has previews.
    """
    shown = [(t, previews.preview_epoch(t), label) for (_, t), label in zip(members.iterrows(), labels)]
    shown = [(t, e, label) for t, e, label in shown if e is not None]
    if not shown:
        return None
    predicted = [previews.predictions(t["trial_id"], e) for t, e, _ in shown]
    indices = sorted(set.intersection(*(set(p) for p in predicted)) or set().union(*predicted))
    first = shown[0][0]
    dataset, resolution = first["dataset"], int(first["resolution"])
    rows = [previews.reference(dataset, resolution, "grayscale"), previews.reference(dataset, resolution, "original"),
            *predicted]
    return compose(rows, indices, ["grayscale input", "original", *(f"{label}\nepoch {e}" for _, e, label in shown)])


def label_inches(labels: list[str]) -> float:
    """The width left of the images for the row labels: 2 inches, more for a line over 22 characters
    ("uv-classes + adversarial 0.1"), which would otherwise be cut at the figure's edge."""
    longest = max((len(line) for label in labels for line in label.splitlines()), default=0)
    return max(2.0, 0.35 + 0.075 * longest)


@styled
def grid_figure(grid: Grid, title: str) -> Figure:
    """The composed image with its rows labelled and its columns numbered by test image index."""
    rows, cols = len(grid.row_labels), len(grid.image_indices)
    fig = new_figure(label_inches(grid.row_labels) + CELL_INCHES * cols, 0.6 + CELL_INCHES * rows)
    ax = fig.subplots()
    ax.imshow(grid.image, interpolation="nearest")
    ax.set_anchor("E")   # the images to the right: the width left over goes to the labels
    h, w = grid.image.shape[0] / rows, grid.image.shape[1] / cols
    ax.set_yticks((np.arange(rows) + 0.5) * h, grid.row_labels)
    ax.set_xticks((np.arange(cols) + 0.5) * w, [f"#{i}" for i in grid.image_indices])
    # Thin white rules between cells: dark images would otherwise run into each other.
    for y in np.arange(1, rows) * h - 0.5:
        ax.axhline(y, color="white", linewidth=1)
    for x in np.arange(1, cols) * w - 0.5:
        ax.axvline(x, color="white", linewidth=1)
    ax.tick_params(length=0, labelsize="small")
    ax.grid(False)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(title, fontsize="medium")
    return fig
