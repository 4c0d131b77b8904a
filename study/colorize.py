"""Colorize image files with a study's best trial (or a chosen one).

    python -m study.colorize --study studies/s1 [--dataset flowers102] [--trial ID] \\
        photos/ old.jpg --out colorized [--side-by-side] [--[no-]flip-average] [--device cpu|cuda]

The model sees only a resized copy of the input's luminance (its training
resolution, square); its colour (UV chroma) is resized back to the input's size
and combined with the input's own full-resolution luminance, so the output keeps
every detail of the input and only gains colour.

Outputs: ``<out>/<input stem>.png`` (inputs found in a folder keep their path
below it), and with ``--side-by-side`` also ``<stem>_side_by_side.png``
(input | colorized). An ``--out`` that would replace an input (an input folder
itself, or an output path that is an input file) is refused before anything is
written. Exit status: 0 all inputs done, 1 some inputs failed, 2 no usable
study, trial, checkpoint or model, or a refused ``--out`` (nothing was done).
"""
from __future__ import annotations

import argparse
import itertools
import pickle
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from study.cli import ProjectError
from study.color import rgb_to_y, rgb_to_yuv, yuv_to_rgb
from study.config import TrialConfig
from study.contract import default_trial
from study.data import list_images
from study.models import build_unet
from study.results import read_table, resolve
from study.train import CHECKPOINT_FILE, load_checkpoint, pick_device, predict

EXIT_OK, EXIT_SOME_FAILED, EXIT_NO_MODEL = 0, 1, 2
SIDE_BY_SIDE = "_side_by_side"


class ColorizeError(ProjectError, RuntimeError):
    """No usable study, trial, checkpoint or model, or a refused --out (exit status 2); the message names it."""
    exit_status = EXIT_NO_MODEL


class InputError(ProjectError, RuntimeError):
    """One input cannot be colorized; the others still are (exit status 1)."""


# ---------------------------------------------------------------- the core


@torch.inference_mode()
def colorize_image(model: torch.nn.Module, cfg: TrialConfig, image: np.ndarray,
                   device: torch.device | str, flip_average: bool = False) -> np.ndarray:
    """(H, W, 3) RGB or (H, W) gray uint8 -> (H, W, 3) RGB uint8 with the input's own luminance."""
    device = torch.device(device)
    y = luminance(image, device)
    uv = predict_uv(model, cfg, y, device, flip_average)
    # Chroma is smooth, so bilinear upsampling loses little; the detail comes from the full-res Y.
    uv = F.interpolate(uv, size=y.shape[-2:], mode="bilinear", align_corners=False)
    rgb = combine(y, uv)
    return (rgb[0] * 255).round().byte().permute(1, 2, 0).cpu().numpy()


def luminance(image: np.ndarray, device: torch.device) -> torch.Tensor:
    """(1, 1, H, W) Y in [0, 1]; a gray image's value is its luminance."""
    # Move uint8 to the device and convert there: a quarter of the bytes to copy. torch.tensor
    # copies, as arrays from PIL are read-only (which torch.from_numpy warns about).
    x = torch.tensor(image, dtype=torch.uint8).to(device).float() / 255
    if x.ndim == 2:
        return x[None, None]
    return rgb_to_y(x.permute(2, 0, 1)[None])


def predict_uv(model: torch.nn.Module, cfg: TrialConfig, y: torch.Tensor, device: torch.device,
               flip_average: bool = False) -> torch.Tensor:
    """The model's chroma, (1, 2, s, s) at its training resolution s.

    ``flip_average``: the engine's test-time flip averaging (``study.train.predict``), the
    output for the input averaged with the un-mirrored output for its mirror image.
    """
    s = cfg.image_size
    # A plain resize to the training square, not a crop (which would leave parts of the input
    # without colour) and not a letterbox (padding bars the model never saw in training bleed
    # into the edges and waste resolution). The aspect distortion is undone exactly when the
    # chroma is resized back, and chroma is low-frequency, so it costs little.
    # Bicubic + antialias, like the PIL bicubic resize the training data went through.
    small = F.interpolate(y, size=(s, s), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    pred = predict(model, small, flip=flip_average)
    if cfg.output == "uv":
        return pred
    # An RGB model's own luminance is discarded: only its colour is used, like a UV model's.
    return rgb_to_yuv(pred.clamp(0, 1))[:, 1:]


def combine(y: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Y (N, 1, H, W) + UV (N, 2, H, W) -> RGB in [0, 1] whose luminance is exactly Y.

    Clipping an out-of-gamut colour (a bright Y with strong chroma) would change its
    luminance; instead each such pixel's chroma is shrunk towards gray just enough
    to fit, which keeps Y and the hue.
    """
    zeros = torch.zeros_like(y)
    gray = yuv_to_rgb(torch.cat([y, zeros, zeros], 1))    # Y in every channel
    chroma = yuv_to_rgb(torch.cat([zeros, uv], 1))       # what UV adds to each channel
    room = torch.where(chroma > 0, 1 - gray, gray)       # distance to the bound it heads for
    scale = (room / chroma.abs().clamp_min(1e-12)).amin(1, keepdim=True).clamp(0, 1)
    return (gray + scale * chroma).clamp(0, 1)


# ---------------------------------------------------------------- study, trial, checkpoint


@dataclass
class Loaded:
    model: torch.nn.Module   # in eval mode, on the device
    cfg: TrialConfig
    row: pd.Series           # the trial's row of the trials table
    epoch: int | None        # the epoch the checkpoint was saved after
    location: str            # where the checkpoint was read from


def load_model(study: str, dataset: str | None, trial_id: str | None, device: torch.device) -> Loaded:
    """The chosen trial's model, rebuilt from the config saved with its weights."""
    row = pick_trial(read_trials(study), study, dataset, trial_id)
    state, location = read_checkpoint(row["checkpoint_path"], study)
    try:
        cfg = TrialConfig.from_dict(state["config"])
        model = build_unet(cfg.model, cfg.image_size)
        model.load_state_dict(state["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ColorizeError(f"the checkpoint of trial {row['trial_id']} ({row['checkpoint_path']}) does not "
                            f"hold a model this code can rebuild: {type(e).__name__}: {e}") from e
    return Loaded(model.to(device).eval(), cfg, row, state.get("epoch"), location)


def read_trials(study: str) -> pd.DataFrame:
    if "://" not in study and not Path(study).is_dir():
        raise ColorizeError(f"study folder {study} does not exist")
    try:
        trials = read_table(study, "trials")
    except Exception as e:  # unreachable store, corrupt Parquet
        raise ColorizeError(f"cannot read {study}/results/trials.parquet: {type(e).__name__}: {e}") from e
    if trials is None or trials.empty:
        raise ColorizeError(f"{study} has no trials (no results/trials.parquet): is it a study folder?")
    return trials


def pick_trial(trials: pd.DataFrame, study: str, dataset: str | None, trial_id: str | None) -> pd.Series:
    """The trial named, else the best by best_val_psnr among those with a checkpoint (of ``dataset``)."""
    rows = trials
    if trial_id is not None:
        rows = rows[rows["trial_id"] == trial_id]
        if rows.empty:
            raise ColorizeError(f"study {study} has no trial {trial_id!r}; it has {_some(trials['trial_id'])}")
    if dataset is not None:
        rows = rows[rows["dataset"] == dataset]
        if rows.empty:
            raise ColorizeError(f"study {study} has no trial{' ' + trial_id if trial_id else ''} of dataset "
                                f"{dataset!r}; its datasets: {_some(trials['dataset'].unique())}")
    row = default_trial(rows)   # the contract's rule, which analysis marks in its report too
    if row is None and trial_id is not None:
        raise ColorizeError(f"trial {trial_id} of study {study} has no checkpoint (it never finished an epoch)")
    if row is None:
        raise ColorizeError(f"no {'such ' if dataset else ''}trial of study {study} has a checkpoint")
    return row


def _some(values, n: int = 10) -> str:
    values = sorted(map(str, values))
    return ", ".join(values[:n]) + (f" and {len(values) - n} more" if len(values) > n else "")


def read_checkpoint(recorded: str, study: str) -> tuple[dict, str]:
    """The checkpoint dict, loaded with weights_only (no pickled code runs), and where it was found.

    A folder on a remote file system (s3://...) is copied to a temporary folder first.
    """
    fs, folder = locate_checkpoint(recorded, study)
    location = folder if isinstance(fs, pafs.LocalFileSystem) else f"{fs.type_name}://{folder}"
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            return load_checkpoint(folder), location
        # torch.load needs a local file; the folder is small (weights and a few previews).
        with tempfile.TemporaryDirectory(prefix="colorize-ckpt-") as tmp:
            pafs.copy_files(folder, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
            return load_checkpoint(tmp), location
    except pickle.UnpicklingError as e:
        # torch's message is a page of advice; the line naming the refused global is the news.
        reason = next((line for line in str(e).splitlines() if "WeightsUnpickler" in line), str(e).splitlines()[0])
        reason = reason.split(" Please use")[0]
        raise ColorizeError(f"refusing checkpoint {location}/{CHECKPOINT_FILE}: it holds more than tensors and "
                            f"plain values, and loading it would run pickled code ({reason.strip()})") from e
    except Exception as e:
        raise ColorizeError(f"cannot load checkpoint {location}/{CHECKPOINT_FILE}: {type(e).__name__}: {e}") from e


def locate_checkpoint(recorded: str, study: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, folder) holding the checkpoint: the recorded place, else the same tail in the study.

    A relative path is relative to the study folder (the Ray runner records its checkpoints so).
    A study folder copied to another machine keeps its checkpoints but not their recorded
    absolute paths: ``/old/home/s1/checkpoints/t1`` is found as ``<study>/checkpoints/t1``.
    """
    study_fs, root = _resolve(study)
    if "://" in recorded or PurePosixPath(recorded).is_absolute():
        fs, folder = _resolve(recorded)
    else:
        fs, folder = study_fs, f"{root.rstrip('/')}/{recorded}"
    errors: list[str] = []
    if _has_checkpoint(fs, folder, errors):
        return fs, folder
    parts = [p for p in PurePosixPath(folder).parts if p != "/"]
    for i in range(len(parts)):  # the longest tail first
        candidate = "/".join([root.rstrip("/"), *parts[i:]])
        if _has_checkpoint(study_fs, candidate, errors):
            return study_fs, candidate
    detail = f" (reading failed: {errors[0]})" if errors else ""
    raise ColorizeError(f"checkpoint {recorded}/{CHECKPOINT_FILE} does not exist, nor does a folder with that "
                        f"path's tail under the study folder {study}{detail}")


def _resolve(location: str) -> tuple[pafs.FileSystem, str]:
    try:
        return resolve(location)
    except Exception as e:  # unknown scheme, malformed URI
        raise ColorizeError(f"cannot open {location}: {type(e).__name__}: {e}") from e


def _has_checkpoint(fs: pafs.FileSystem, folder: str, errors: list[str]) -> bool:
    try:
        return fs.get_file_info(f"{folder}/{CHECKPOINT_FILE}").type == pafs.FileType.File
    except OSError as e:  # e.g. no credentials for a bucket: said in the final message
        errors.append(f"{type(e).__name__}: {e}")
        return False


def choose_device(name: str | None) -> torch.device:
    try:
        device = pick_device(name)
    except RuntimeError as e:
        raise ColorizeError(f"--device {name}: {e}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ColorizeError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
    return device


# ---------------------------------------------------------------- files


def collect_inputs(args: list[str], side_by_side: bool) -> tuple[list[tuple[Path, Path]], list[str]]:
    """(input file, output path relative to --out without .png) pairs, and errors for bad arguments.

    A file given by name is tried whatever its extension (it fails clearly if it is not an
    image); a folder contributes the images below it, keeping their relative paths.
    """
    found: list[tuple[Path, Path]] = []
    errors: list[str] = []
    for arg in args:
        path = Path(arg)
        if path.is_dir():
            files = [(f, f.relative_to(path).with_suffix("")) for f in list_images(path)]
            if not files:
                errors.append(f"{path}: no images (jpg, jpeg, png, bmp, webp, tif) in this folder")
        elif path.is_file():
            files = [(path, Path(path.stem))]
        else:
            errors.append(f"{path}: no such file or folder")
            continue
        found.extend(files)
    return assign_names(_unique_files(found), side_by_side), errors


def _unique_files(found: list[tuple[Path, Path]]) -> list[tuple[Path, Path]]:
    # A file named twice (or given and also inside a given folder) is done once.
    seen: set[Path] = set()
    out = []
    for path, name in found:
        if path.resolve() not in seen:
            seen.add(path.resolve())
            out.append((path, name))
    return out


def assign_names(found: list[tuple[Path, Path]], side_by_side: bool) -> list[tuple[Path, Path]]:
    """Distinct output names: a clash (a.jpg and a.png, or two folders' a.jpg) gets the extension, then a number."""
    taken: set[str] = set()
    out = []
    for path, name in found:
        for candidate in _candidates(name, path.suffix.lstrip(".").lower() or "file"):
            # Lower-case: on case-insensitive file systems A.png and a.png are the same file.
            keys = {str(candidate).lower() + s for s in (["", SIDE_BY_SIDE] if side_by_side else [""])}
            if not keys & taken:
                taken |= keys
                out.append((path, candidate))
                break
    return out


def _candidates(name: Path, ext: str):
    yield name
    yield name.with_name(f"{name.name}_{ext}")
    for k in itertools.count(2):
        yield name.with_name(f"{name.name}_{ext}_{k}")


def check_out(out: Path, args: list[str], jobs: list[tuple[Path, Path]], side_by_side: bool) -> None:
    """Refuse an ``--out`` that would replace an input: an input folder itself, or an output file that is an input.

    Checked before anything is written: an overwritten photo cannot be recovered.
    """
    target = out.resolve()
    for arg in args:
        if Path(arg).is_dir() and Path(arg).resolve() == target:
            raise ColorizeError(f"--out {out} is the input folder {arg}: the colorized PNGs would be mixed with "
                                f"(and could replace) the inputs; give another --out folder")
    inputs = {path.resolve(): path for path, _ in jobs}
    suffixes = ["", SIDE_BY_SIDE] if side_by_side else [""]
    for _, name in jobs:
        for suffix in suffixes:
            written = (target / name).with_name(name.name + suffix + ".png")
            if written in inputs:
                raise ColorizeError(f"--out {out} would overwrite the input {inputs[written]} with its colorized "
                                    f"version; give another --out folder")


def read_image(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """(H, W) gray or (H, W, 3) RGB uint8, and the alpha channel (H, W) if the image has one."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)  # upright, as image viewers show it
            return _pixels(im), _alpha(im)
    except UnidentifiedImageError as e:
        raise InputError(f"{path}: not an image (Pillow does not recognise its format)") from e
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise InputError(f"{path}: unreadable image: {type(e).__name__}: {e}") from e


def _pixels(im: Image.Image) -> np.ndarray:
    if im.mode.startswith("I;16"):  # 16-bit gray: Pillow's convert("L") would clip, not scale
        return (np.asarray(im, dtype=np.float64) / 257).round().clip(0, 255).astype(np.uint8)
    if im.mode in ("1", "L", "LA", "I", "F"):
        return np.asarray(im.convert("L"))
    return np.asarray(im.convert("RGB"))


def _alpha(im: Image.Image) -> np.ndarray | None:
    if "A" in im.getbands() or "transparency" in im.info:
        return np.asarray(im.convert("RGBA").getchannel("A"))
    return None


def colorize_file(model: torch.nn.Module, cfg: TrialConfig, path: Path, target: Path,
                  device: torch.device, side_by_side: bool, flip_average: bool = False) -> list[Path]:
    """Colorize one file into ``target``.png (and the side-by-side); returns the files written."""
    image, alpha = read_image(path)
    rgb = colorize_image(model, cfg, image, device, flip_average)
    written = [_save(rgb if alpha is None else np.dstack([rgb, alpha]), target, "")]
    if side_by_side:
        shown = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image
        written.append(_save(np.concatenate([shown, rgb], axis=1), target, SIDE_BY_SIDE))
    return written


def _save(pixels: np.ndarray, target: Path, suffix: str) -> Path:
    # with_name, not with_suffix: a stem such as "scan.v2" keeps its dot.
    out = target.with_name(target.name + suffix + ".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(out)
    return out


# ---------------------------------------------------------------- CLI


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m study.colorize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders (searched recursively)")
    p.add_argument("--study", required=True, help="study folder (or pyarrow URI such as s3://bucket/study)")
    p.add_argument("--dataset", help="use the best trial of this dataset only (e.g. flowers102)")
    p.add_argument("--trial", help="use this trial id instead of the best one")
    p.add_argument("--out", required=True, type=Path, help="folder for the PNGs")
    p.add_argument("--side-by-side", action="store_true", help="also write <stem>_side_by_side.png")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--flip-average", action=argparse.BooleanOptionalAction, default=None,
                   help="average the colours predicted for each photo and its mirror image (twice the compute); "
                        "default: as the trial was evaluated (its tta_flip)")
    return p


def describe(loaded: Loaded, device: torch.device) -> str:
    row, cfg = loaded.row, loaded.cfg
    psnr = row.get("best_val_psnr", float("nan"))
    text = (f"trial {row['trial_id']} ({cfg.dataset}, {cfg.output} output, {cfg.image_size}px, "
            f"best val PSNR {psnr:.2f} dB) on {device}; checkpoint {loaded.location}")
    best = row.get("best_epoch")
    if loaded.epoch is not None and pd.notna(best) and int(best) != int(loaded.epoch):
        # The runners keep a trial's latest checkpoint, which need not be its best epoch's.
        text += f" is from epoch {loaded.epoch}, the best val PSNR was at epoch {int(best)}"
    return text


def main(argv: list[str] | None = None) -> int:
    """The command; a ``ColorizeError`` (nothing done) reaches ``study.cli``'s handler: exit status 2."""
    args = parser().parse_args(argv)
    jobs, errors = collect_inputs(args.inputs, args.side_by_side)
    check_out(args.out, args.inputs, jobs, args.side_by_side)
    device = choose_device(args.device)
    loaded = load_model(args.study, args.dataset, args.trial, device)
    flip = loaded.cfg.tta_flip if args.flip_average is None else args.flip_average
    print(f"colorizing with {describe(loaded, device)}" + (", averaged with mirror images" if flip else ""))
    for message in errors:
        print(f"error: {message}", file=sys.stderr)
    failed = len(errors)
    for path, name in jobs:
        try:
            for out in colorize_file(loaded.model, loaded.cfg, path, args.out / name, device, args.side_by_side,
                                     flip):
                print(f"wrote {out}")
        except InputError as e:
            failed += 1
            print(f"error: {e}", file=sys.stderr)
        except Exception as e:  # one bad input (e.g. out of memory, unwritable --out) must not stop the rest
            failed += 1
            print(f"error: {path}: {type(e).__name__}: {e}", file=sys.stderr)
    print(f"{len(jobs) + len(errors) - failed} of {len(jobs) + len(errors)} inputs colorized into {args.out}")
    return EXIT_SOME_FAILED if failed else EXIT_OK


if __name__ == "__main__":
    from study import cli
    # Run as __main__, this module's errors are __main__.ColorizeError: recognised as ProjectError subclasses.
    sys.exit(cli.run(main))
