"""Colorize image files with a study's best finished trial (or a chosen one).

    python -m study.colorize --study studies/s1 [--dataset flowers102] [--trial ID] \\
        photos/ old.jpg --out colorized [--format same|png|jpeg|webp|tiff] [--side-by-side] \\
        [--[no-]flip-average] [--temperature T] [--device cpu|cuda]

The model sees only a resized copy of the input's luminance (its training
resolution, square); its colour (UV chroma) is resized back to the input's size
and combined with the input's own full-resolution luminance, so the output keeps
every detail of the input and only gains colour.

Which trial: without ``--trial``, the DONE trial (of ``--dataset``) with the best
validation PSNR that has a checkpoint; a PRUNED, RUNNING or ERROR trial is used
only when ``--trial`` names it.

Outputs: ``<out>/<input stem>.<ext>`` in the input's own format (a JPEG stays a
JPEG, at quality 95 with full-resolution chroma; a PNG stays a PNG) unless
``--format`` names one, keeping the input's EXIF (its orientation reset, as the
pixels are stored upright) and its ICC colour profile; inputs found in a folder
keep their path below it. ``--side-by-side`` also writes
``<stem>_side_by_side.<ext>`` (input | colorized). An ``--out`` that would
replace an input (an input folder itself, or an output path that is an input
file) is refused before anything is written.

Warnings (stderr, the outputs are still written): the trial does not beat its
grayscale input (best validation PSNR gain over grayscale <= 0 dB); photos far
from the size the trial was trained at (more than 4x larger or smaller than its
square; the dataset a photo resembles cannot be told from its pixels, so the
first line names the trial's dataset and resolution for the user to judge).

``--study`` is a study folder (or its s3:// URL), or the ``--out`` folder of one trial
run by ``python -m study.trial`` (its ``checkpoint/``).

Exit status: 0 all inputs done, 1 some inputs failed, 2 no usable study, trial,
checkpoint or model, a temperature outside [1e-30, 10], or a refused or unwritable
``--out`` (nothing was done: checked before the model loads).
"""
from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from study import cli
from study.cli import ProjectError
from study.colorize_model import (
    ColorizeError,
    Loaded,
    _db,
    _some,
    choose_device,
    load_model,
)
from study.config import ConfigError, TrialConfig
from study.engine import list_images, predict, rgb_to_y, rgb_to_yuv, yuv_to_rgb
from study.results import gain

EXIT_OK, EXIT_SOME_FAILED = 0, 1
SIDE_BY_SIDE = "_side_by_side"
# A photo more than this many times larger (shorter side) or smaller (longer side) than the square a trial
# was trained at gets a warning: its colour comes from a much shrunk or enlarged copy.
SIZE_FACTOR = 4


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

    ``flip_average``: the engine's test-time flip averaging (``study.engine.trial.predict``), the
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
    if cfg.output == "uv-classes":   # the annealed mean at the trial's temperature
        return model.decode(pred, cfg.temperature)
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


# ---------------------------------------------------------------- files


# Output formats: --format's choices (Pillow format name, extension). "same" follows each input.
FORMATS = {"png": ("PNG", ".png"), "jpeg": ("JPEG", ".jpg"), "webp": ("WEBP", ".webp"), "tiff": ("TIFF", ".tif")}
SAME = "same"
# An input's format, from its extension (its output name must be known before any image is read, to
# refuse an --out that would overwrite an input); other extensions are written as PNG.
BY_EXTENSION = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF",
                ".bmp": "BMP"}
JPEG_QUALITY = 95
ORIENTATION = 0x0112   # EXIF tag


@dataclass(frozen=True)
class Job:
    path: Path     # the input file
    name: Path     # its output path below --out, without the extension
    format: str    # Pillow's name of the output format
    ext: str       # the output extension, with its dot

    def output(self, out: Path, suffix: str = "") -> Path:
        # with_name, not with_suffix: a stem such as "scan.v2" keeps its dot.
        target = out / self.name
        return target.with_name(target.name + suffix + self.ext)


def output_format(path: Path, choice: str = SAME) -> tuple[str, str]:
    """(Pillow format, extension) of ``path``'s output: the input's own format for "same", else ``choice``'s."""
    if choice != SAME:
        return FORMATS[choice]
    suffix = path.suffix.lower()
    if suffix in BY_EXTENSION:
        return BY_EXTENSION[suffix], suffix
    return FORMATS["png"]


def collect_inputs(args: list[str], side_by_side: bool, fmt: str = SAME) -> tuple[list[Job], list[str]]:
    """A job per input file (output name below --out and format), and errors for bad arguments.

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
    return assign_names(_unique_files(found), side_by_side, fmt), errors


def _unique_files(found: list[tuple[Path, Path]]) -> list[tuple[Path, Path]]:
    # A file named twice (or given and also inside a given folder) is done once.
    seen: set[Path] = set()
    out = []
    for path, name in found:
        if path.resolve() not in seen:
            seen.add(path.resolve())
            out.append((path, name))
    return out


def assign_names(found: list[tuple[Path, Path]], side_by_side: bool, fmt: str = SAME) -> list[Job]:
    """Distinct output files: a clash (a.jpg and a.png with --format png, or two folders' a.jpg) gets the
    input's extension, then a number."""
    taken: set[str] = set()
    out = []
    for path, name in found:
        pil_format, ext = output_format(path, fmt)
        for candidate in _candidates(name, path.suffix.lstrip(".").lower() or "file"):
            # Lower-case: on case-insensitive file systems A.png and a.png are the same file.
            keys = {str(candidate).lower() + s + ext for s in (["", SIDE_BY_SIDE] if side_by_side else [""])}
            if not keys & taken:
                taken |= keys
                out.append(Job(path, candidate, pil_format, ext))
                break
    return out


def _candidates(name: Path, ext: str):
    yield name
    yield name.with_name(f"{name.name}_{ext}")
    for k in itertools.count(2):
        yield name.with_name(f"{name.name}_{ext}_{k}")


def check_out(out: Path, args: list[str], jobs: list[Job], side_by_side: bool) -> None:
    """Refuse an ``--out`` that would replace an input: an input folder itself, or an output file that is an input.

    Checked before anything is written: an overwritten photo cannot be recovered.
    """
    target = out.resolve()
    for arg in args:
        if Path(arg).is_dir() and Path(arg).resolve() == target:
            raise ColorizeError(f"--out {out} is the input folder {arg}: the colorized images would be mixed with "
                                f"(and could replace) the inputs; give another --out folder")
    inputs = {job.path.resolve(): job.path for job in jobs}
    for job in jobs:
        for suffix in (["", SIDE_BY_SIDE] if side_by_side else [""]):
            written = job.output(target, suffix)
            if written in inputs:
                raise ColorizeError(f"--out {out} would overwrite the input {inputs[written]} with its colorized "
                                    f"version; give another --out folder")


@dataclass
class Photo:
    pixels: np.ndarray            # (H, W) gray or (H, W, 3) RGB uint8, upright
    alpha: np.ndarray | None      # (H, W) uint8 when the image has transparency
    exif: bytes | None            # the input's EXIF, orientation reset (the pixels are upright now)
    icc: bytes | None             # the input's ICC profile


def read_image(path: Path) -> Photo:
    """The pixels (upright, as image viewers show them), alpha, EXIF and ICC profile of an image file."""
    try:
        with Image.open(path) as im:
            exif = im.getexif()
            icc = im.info.get("icc_profile") or None
            im = ImageOps.exif_transpose(im)
            return Photo(_pixels(im), _alpha(im), _upright_exif(exif), icc)
    except UnidentifiedImageError as e:
        raise InputError(f"{path}: not an image (Pillow does not recognise its format)") from e
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise InputError(f"{path}: unreadable image: {type(e).__name__}: {e}") from e


def _upright_exif(exif: Image.Exif) -> bytes | None:
    if not exif:
        return None
    # exif_transpose already turned the pixels; a kept orientation tag would make viewers turn them again.
    exif.pop(ORIENTATION, None)
    return exif.tobytes()


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


def colorize_file(model: torch.nn.Module, cfg: TrialConfig, job: Job, out: Path, device: torch.device,
                  side_by_side: bool, flip_average: bool = False,
                  note: Callable[[str], None] = lambda m: None) -> list[Path]:
    """Colorize one input into its output file below ``out`` (and the side-by-side); returns the files written.

    ``note`` gets a line for each thing of the input the output cannot keep.
    """
    photo = read_image(job.path)
    rgb = colorize_image(model, cfg, photo.pixels, device, flip_average)
    icc = _rgb_profile(photo.icc, job, note)
    alpha = photo.alpha
    if alpha is not None and job.format == "JPEG":
        note(f"{job.path}: JPEG has no transparency; its alpha channel is dropped (--format png keeps it)")
        alpha = None
    pixels = rgb if alpha is None else np.dstack([rgb, alpha])
    written = [_save(pixels, job.output(out), job.format, photo.exif, icc)]
    if side_by_side:
        shown = np.repeat(photo.pixels[..., None], 3, axis=2) if photo.pixels.ndim == 2 else photo.pixels
        # No EXIF: its size and camera fields describe one photo, not two side by side.
        written.append(_save(np.concatenate([shown, rgb], axis=1), job.output(out, SIDE_BY_SIDE), job.format,
                             None, icc))
    return written


def _rgb_profile(icc: bytes | None, job: Job, note: Callable[[str], None]) -> bytes | None:
    """The input's ICC profile when it can describe colour pixels (an RGB profile), else None."""
    if icc is None:
        return None
    # Bytes 16-19 of an ICC header: the colour space of the data it describes.
    if icc[16:20] == b"RGB ":
        return icc
    space = icc[16:20].decode("ascii", "replace").strip() or "unknown"
    note(f"{job.path}: its ICC profile is for {space} data, which cannot describe the colorized RGB pixels; "
         "the output has no profile (viewers assume sRGB)")
    return None


def _save(pixels: np.ndarray, path: Path, pil_format: str, exif: bytes | None, icc: bytes | None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    options: dict = {}
    if pil_format != "BMP":   # BMP holds neither
        options.update({k: v for k, v in (("exif", exif), ("icc_profile", icc)) if v})
    if pil_format == "JPEG":
        # subsampling 0 (4:4:4): colour is all the model adds, so JPEG's default halving of chroma would cost most.
        options.update(quality=JPEG_QUALITY, subsampling=0)
    elif pil_format == "WEBP":
        options.update(quality=JPEG_QUALITY)
    Image.fromarray(pixels).save(path, format=pil_format, **options)
    return path


# ---------------------------------------------------------------- CLI


def parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m study.colorize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files, or folders searched recursively for jpg, jpeg, png, bmp, webp and tif files")
    p.add_argument("--study", required=True,
                   help="study folder, or a pyarrow URI such as s3://bucket/study, or the --out folder of "
                        "python -m study.trial (required)")
    p.add_argument("--dataset", help="choose among this dataset's trials only, e.g. cifar10, flowers102 "
                                     "(default: all datasets)")
    p.add_argument("--trial", help="use this trial id, whatever its status (default: the DONE trial with the best "
                                   "val PSNR)")
    p.add_argument("--out", required=True, type=Path, help="folder for the colorized images (required)")
    p.add_argument("--format", choices=[SAME, *FORMATS], default=SAME,
                   help="output format: same (as each input; others as png), png, jpeg, webp, tiff (default: same)")
    p.add_argument("--side-by-side", action="store_true",
                   help="also write <stem>_side_by_side.<ext>, input | colorized (default: off)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available, else cpu)")
    p.add_argument("--flip-average", action=argparse.BooleanOptionalAction, default=None,
                   help="average the colours predicted for each photo and its mirror image, twice the compute "
                        "(default: as the trial was evaluated, its tta_flip)")
    p.add_argument("--temperature", type=float,
                   help="uv-classes trials: decode at this temperature, >= 1e-30 and <= 10 (1: the expected colour, "
                        "towards 0: the most likely one; lower paints more vivid colours without retraining) "
                        "(default: the trial's own)")
    return p


def check_temperature(temperature: float) -> None:
    """The trial parameter's own rule (NaN fails too); the decoding is sound at any temperature it accepts."""
    try:
        TrialConfig.check_value("temperature", temperature)
    except ConfigError as e:
        raise ColorizeError(f"--temperature: {e}") from None


def with_temperature(loaded: Loaded, temperature: float | None) -> TrialConfig:
    """The trial's config, decoding at ``temperature`` when given; refused for a head it does not apply to."""
    if temperature is None:
        return loaded.cfg
    if loaded.cfg.output != "uv-classes":
        raise ColorizeError(f"--temperature applies to uv-classes trials only; trial {loaded.row['trial_id']} "
                            f"predicts {loaded.cfg.output}: leave --temperature out, or pick a uv-classes trial "
                            "with --trial")
    return loaded.cfg.replace(temperature=temperature)


def describe(loaded: Loaded, device: torch.device) -> str:
    row, cfg = loaded.row, loaded.cfg
    text = (f"trial {row['trial_id']} ({row.get('status', '?')}, {cfg.dataset} at {cfg.image_size}px, "
            f"{cfg.output} output, best val PSNR {_db(row.get('best_val_psnr'))}) on {device}; "
            f"checkpoint {loaded.location}")
    best = row.get("best_epoch")
    if loaded.epoch is not None and pd.notna(best) and int(best) != int(loaded.epoch):
        # The runners keep a trial's latest checkpoint, which need not be its best epoch's.
        text += f" is from epoch {loaded.epoch}, the best val PSNR was at epoch {int(best)}"
    return text


def model_warnings(loaded: Loaded) -> list[str]:
    """What makes the trial a poor colorizer whatever the photos: it does not beat its grayscale input."""
    row = loaded.row
    trial = row["trial_id"]
    if pd.isna(row.get("best_val_psnr")) or pd.isna(row.get("val_gray_psnr")):
        return [f"trial {trial} has no validation PSNR against the grayscale input on record: whether it "
                "colorizes better than leaving the photos gray is unknown"]
    g = float(gain(row))   # the contract's gain over grayscale of a trial row
    if g > 0:
        return []
    return [f"trial {trial} does not beat its grayscale input: its best val PSNR {_db(row['best_val_psnr'])} is "
            f"{g:+.2f} dB from the grayscale input's {_db(row['val_gray_psnr'])}, so its colours are likely worse "
            "than none; train longer, or pick another trial with --trial"]


def size_warnings(jobs: list[Job], cfg: TrialConfig, trial: str) -> list[str]:
    """Photos far from the square the trial was trained at, found from their headers (nothing decoded)."""
    s = cfg.image_size
    large, small = [], []
    for job in jobs:
        try:
            with Image.open(job.path) as im:
                w, h = im.size
        except Exception:  # reported when the file is colorized
            continue
        if min(w, h) > SIZE_FACTOR * s:
            large.append(f"{job.path.name} {w}x{h}")
        elif max(w, h) * SIZE_FACTOR < s:
            small.append(f"{job.path.name} {w}x{h}")
    said = []
    for found, how, effect in ((large, "larger", "shrunk, so its colours are coarse; a trial trained at a higher "
                                               "resolution fits them better"),
                               (small, "smaller", "enlarged, so its colours are blurred")):
        if found:
            said.append(f"{len(found)} of {len(jobs)} inputs are over {SIZE_FACTOR}x {how} than the {s}x{s} px "
                        f"{cfg.dataset} images trial {trial} was trained on ({_some(found, 3)}): the model sees "
                        f"each {effect}")
    return said


def main(argv: list[str] | None = None) -> int:
    """The command; a ``ColorizeError`` (nothing done) reaches ``study.cli``'s handler: exit status 2."""
    args = parser().parse_args(argv)
    if args.temperature is not None:
        check_temperature(args.temperature)
    jobs, errors = collect_inputs(args.inputs, args.side_by_side, args.format)
    check_out(args.out, args.inputs, jobs, args.side_by_side)
    # Before the model loads: a folder that cannot be written is found once, not per image.
    cli.check_writable(f"--out {args.out}", args.out, "the colorized images")
    device = choose_device(args.device)
    loaded = load_model(args.study, args.dataset, args.trial, device)
    cfg = with_temperature(loaded, args.temperature)
    flip = cfg.tta_flip if args.flip_average is None else args.flip_average
    print(f"colorizing with {describe(loaded, device)}" + (", averaged with mirror images" if flip else "")
          + (f", decoded at temperature {cfg.temperature:g}" if cfg.output == "uv-classes" else ""))

    def warn(message: str) -> None:
        print(f"warning: {message}", file=sys.stderr)
    for message in model_warnings(loaded) + size_warnings(jobs, cfg, loaded.row["trial_id"]):
        warn(message)
    for message in errors:
        print(f"error: {message}", file=sys.stderr)
    failed = len(errors)
    for job in jobs:
        try:
            for out in colorize_file(loaded.model, cfg, job, args.out, device, args.side_by_side, flip, warn):
                print(f"wrote {out}")
        except InputError as e:
            failed += 1
            print(f"error: {e}", file=sys.stderr)
        except Exception as e:  # one bad input (e.g. out of memory, unwritable --out) must not stop the rest
            failed += 1
            print(f"error: {job.path}: {type(e).__name__}: {e}", file=sys.stderr)
    print(f"{len(jobs) + len(errors) - failed} of {len(jobs) + len(errors)} inputs colorized into {args.out}")
    return EXIT_SOME_FAILED if failed else EXIT_OK


if __name__ == "__main__":
    from study import cli
    # Run as __main__, this module's errors are __main__.ColorizeError: recognised as ProjectError subclasses.
    sys.exit(cli.run(main))
