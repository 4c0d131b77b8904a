"""Datasets decoded once into a uint8 cache, then served as whole batches on the device.

Sources, in order:
1. ``samples``: crops of the colour photos bundled with scikit-image (no network, no data folder);
2. a path to an image folder;
3. ``<data root>/<dataset>`` with the layout ``<split>/<class>/*.jpg``, the data root
   coming from ``--data-root`` or ``$COLORIZE_DATA_ROOT``;
4. torchvision's download of the canonical dataset (when online).

Splits: ``train``/``val``/``test`` folders are used as they are; a missing
``val`` (or ``test``) is a seeded 20% of ``train`` (CIFAR-10: 40,000 / 10,000).
Grayscale images in a split are counted when it is decoded and left out of every
split, with a warning that names a few; a split with more than 5% of them is refused
(see ``check_grayscale``).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from study.cli import ProjectError
from study.engine.grayscale import ALLOW_GRAYSCALE_ENV, grayscale_allowed

if TYPE_CHECKING:
    import torch

SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
KNOWN = ("cifar10", "flowers102", "samples")
CACHE_VERSION = 1
SAMPLE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                 "hubble_deep_field.jpg", "ihc.png", "retina.jpg")
SAMPLE_COUNTS = {"train": 1024, "val": 256, "test": 256}
SAMPLE_MAX_BYTES = 4 << 30   # decoded crops per split of the samples dataset
# An image counts as grayscale when fewer than GRAY_PIXELS of its pixels have channels more than
# GRAY_SPREAD levels apart (JPEG noise on a gray photo stays within a few levels). Real CIFAR-10 has
# about 1.3-1.8% such photos, Flowers-102 none. They are left out of every split: a colorizer learns
# nothing from them, and the grayscale input scores ~110 dB PSNR on each (an exact copy), so 1.7% of
# them lifted the baseline's mean PSNR on CIFAR-10 val from 24.71 to 26.26 dB and hid real gains
# (docs/ablation.md). A split with more than GRAY_MAX_FRACTION is refused: probably the wrong folder.
GRAY_SPREAD = 6
GRAY_PIXELS = 0.01
GRAY_MAX_FRACTION = 0.05
GRAY_MIN_REFUSED = 5  # tiny subsets of real data (16 images, 1 gray) are not refused by chance
LAYOUT_HELP = ("Put the images at <data root>/{name}/<split>/<class>/*.jpg (splits: train, val, test; "
               "val and test may be missing) and pass --data-root <data root> or set COLORIZE_DATA_ROOT.")


class DataError(ProjectError, RuntimeError):
    """Data that cannot be found or read; the message says what and how to fix it."""


class DataWarning(UserWarning):
    """Data that works but is probably not what was meant (grayscale images among colour ones)."""


@dataclass
class Splits:
    name: str
    resolution: int
    source: str
    train: np.ndarray   # (N, H, W, 3) uint8, possibly memory-mapped
    val: np.ndarray
    test: np.ndarray

    def __getitem__(self, split: str) -> np.ndarray:
        return getattr(self, split)


def default_cache_dir() -> Path:
    return Path(os.environ.get("COLORIZE_CACHE_DIR") or Path.cwd() / ".cache").resolve()


def default_data_root() -> str | None:
    return os.environ.get("COLORIZE_DATA_ROOT") or None


# ---------------------------------------------------------------- decoding


def decode_image(path: Path | str, resolution: int) -> np.ndarray:
    """One image as (resolution, resolution, 3) uint8: shorter side resized, centre-cropped."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            return _square(im, resolution)
    except Exception as e:  # PIL raises several types for bad files
        raise DataError(f"cannot read image {path}: {e}. Replace or remove the file "
                        f"(it is not skipped: that would change the split).") from e


def _square(im: Image.Image, resolution: int) -> np.ndarray:
    w, h = im.size
    if (w, h) != (resolution, resolution):
        scale = resolution / min(w, h)
        nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
        im = im.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
        im = im.crop((left, top, left + resolution, top + resolution))
    return np.asarray(im, dtype=np.uint8)


def decode_many(paths: list[Path], resolution: int) -> np.ndarray:
    out = np.empty((len(paths), resolution, resolution, 3), dtype=np.uint8)

    def work(i):
        out[i] = decode_image(paths[i], resolution)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        list(pool.map(work, range(len(paths))))  # list(): re-raise the first DataError
    return out


def grayscale_indices(images: np.ndarray, chunk: int = 256) -> list[int]:
    """Indices of the (N, H, W, 3) uint8 images that are grayscale (R = G = B, or nearly)."""
    found = []
    for start in range(0, len(images), chunk):
        a = np.asarray(images[start:start + chunk])
        coloured = (a.max(axis=3) - a.min(axis=3)) > GRAY_SPREAD  # uint8: max >= min, no overflow
        frac = coloured.reshape(len(a), -1).mean(axis=1)
        found.extend(int(i) + start for i in np.flatnonzero(frac < GRAY_PIXELS))
    return found


def check_grayscale(dataset: str, source: str, arrays: dict, gray: dict[str, list[int]],
                    names: dict[str, list[str]] | None = None, allow: bool = False) -> dict[str, np.ndarray]:
    """``arrays`` without their grayscale images, with a warning naming a few; a split with more than
    GRAY_MAX_FRACTION of them is refused. ``allow`` (or $COLORIZE_ALLOW_GRAYSCALE=1) keeps them all."""
    allow = allow or grayscale_allowed()
    kept = dict(arrays)
    for split in SPLITS:
        idx, n = gray.get(split, []), len(arrays[split])
        if not idx or not n:
            continue
        some = [names[split][i] if names else f"#{i}" for i in idx[:5]]
        what = (f"dataset {dataset!r}: {len(idx)} of {n} {split} images ({len(idx) / n:.1%}) are grayscale "
                f"(R = G = B), e.g. {', '.join(some)}")
        if len(idx) / n > GRAY_MAX_FRACTION and len(idx) >= GRAY_MIN_REFUSED and not allow:
            raise DataError(f"{what}: more than {GRAY_MAX_FRACTION:.0%}, so colorization scores on it would mean "
                            f"little (the grayscale baseline gets inflated). Remove them from {source}, or set "
                            f"{ALLOW_GRAYSCALE_ENV}=1 to use them anyway.")
        if allow:
            warnings.warn(f"{what}; kept ({ALLOW_GRAYSCALE_ENV}=1), so the grayscale baseline scores ~110 dB "
                          f"on each and its mean PSNR is inflated.", DataWarning, stacklevel=3)
            continue
        if len(idx) >= n:
            raise DataError(f"{what}: no colour image is left in the {split} split. Use colour photos, or set "
                            f"{ALLOW_GRAYSCALE_ENV}=1 to use them anyway.")
        # np.delete copies (a memory map becomes an array): only splits that hold grayscale images pay it.
        kept[split] = np.delete(np.asarray(arrays[split]), idx, axis=0)
        warnings.warn(f"{what}; left out: they teach no colour and the grayscale input would score ~110 dB on "
                      f"each. Set {ALLOW_GRAYSCALE_ENV}=1 to keep them.", DataWarning, stacklevel=3)
    return kept


# ---------------------------------------------------------------- sources


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def folder_splits(root: Path, seed: int) -> dict[str, list[Path]]:
    """File lists per split for an image folder; missing val/test carved from train."""
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist. " + LAYOUT_HELP.format(name=root.name))
    present = {s: list_images(root / s) for s in SPLITS if (root / s).is_dir()}
    if not present.get("train"):
        raise DataError(f"no training images under {root / 'train'}. " + LAYOUT_HELP.format(name=root.name))
    train = present["train"]
    order = np.random.default_rng(seed).permutation(len(train))
    train = [train[i] for i in order]
    for split in ("val", "test"):
        if not present.get(split):
            n = len(train) // 5
            present[split], train = train[:n], train[n:]
    present["train"] = train
    return present


def _subset(items: list, limit: int, seed: int) -> list:
    if not limit or limit >= len(items):
        return items
    order = np.random.default_rng(seed + 1).permutation(len(items))[:limit]
    return [items[i] for i in sorted(order)]


def _cache_key(parts: dict) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


GRAY_FILE = "grayscale.json"


def _cached(cache_dir: Path, label: str, key_parts: dict, build) -> tuple[dict[str, np.ndarray], dict]:
    """Memory-mapped uint8 arrays, built once by ``build()`` and kept under ``cache_dir``, and the
    indices of their grayscale images per split (found once, when decoding)."""
    folder = cache_dir / "data" / f"{label}-{_cache_key({**key_parts, 'v': CACHE_VERSION})}"
    if not all((folder / f"{s}.npy").exists() for s in SPLITS):
        arrays = build()
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
        try:
            for s in SPLITS:
                np.save(tmp / f"{s}.npy", arrays[s])
            (tmp / GRAY_FILE).write_text(json.dumps({s: grayscale_indices(arrays[s]) for s in SPLITS}))
            (tmp / "source.json").write_text(json.dumps(key_parts, indent=2, default=str))
            tmp.rename(folder)
        except OSError as e:  # another process finished first (theirs is identical), or the disk is full
            shutil.rmtree(tmp, ignore_errors=True)
            if not folder.is_dir():
                raise DataError(f"cannot write the decoded-image cache {folder}: {e}. Free some space there or "
                                f"point --cache-dir (or COLORIZE_CACHE_DIR) at a writable folder.") from e
    arrays = {s: np.load(folder / f"{s}.npy", mmap_mode="r") for s in SPLITS}
    try:
        gray = json.loads((folder / GRAY_FILE).read_text())
    except (OSError, ValueError):  # a cache from before the grayscale count
        gray = {s: grayscale_indices(arrays[s]) for s in SPLITS}
    return arrays, gray


def _names_hash(names) -> str:
    """A hash of file names as the file system stores them: bytes, since a name need not be valid UTF-8
    (os.fsencode gives back the original bytes of a name Python decoded with surrogate escapes)."""
    return hashlib.sha1(b"\n".join(os.fsencode(n) for n in names)).hexdigest()


def _from_folder(root: Path, resolution: int, limits: dict, seed: int, cache_dir: Path, label: str):
    files = folder_splits(root, seed)
    files = {s: _subset(files[s], limits[s], seed) for s in SPLITS}
    key = {"source": str(root.resolve()), "resolution": resolution, "seed": seed,
           "files": {s: [len(files[s]), sum(p.stat().st_size for p in files[s]),
                         _names_hash(p.relative_to(root) for p in files[s])]
                     for s in SPLITS}}
    arrays, gray = _cached(cache_dir, label, key, lambda: {s: decode_many(files[s], resolution) for s in SPLITS})
    names = {s: [str(p.relative_to(root)) for p in files[s]] for s in SPLITS}
    return arrays, gray, names


def check_samples_size(resolution: int, train_limit: int, eval_limit: int) -> None:
    """DataError when the samples dataset's crops would not fit SAMPLE_MAX_BYTES per split: they are made,
    not read, so a typo in a limit (``--train-limit 100000000``) would fill memory before failing."""
    for split, limit in (("train", train_limit), ("val", eval_limit), ("test", eval_limit)):
        n = limit or SAMPLE_COUNTS[split]
        size = n * resolution * resolution * 3
        if size > SAMPLE_MAX_BYTES:
            raise DataError(f"dataset 'samples': {n:,} {split} crops of {resolution}x{resolution} would take "
                            f"{size / 2 ** 30:.1f} GiB, over the limit of {SAMPLE_MAX_BYTES // 2 ** 30} GiB per "
                            f"split (SAMPLE_MAX_BYTES in study/engine/data.py); lower train_limit / eval_limit or the "
                            f"resolution")


def _samples(resolution: int, limits: dict, seed: int, cache_dir: Path):
    """Seeded crops of scikit-image's bundled colour photos; each split uses its own band of every photo."""
    import skimage

    data_dir = Path(skimage.__file__).parent / "data"
    bands = {"train": (0.0, 0.6), "val": (0.6, 0.8), "test": (0.8, 1.0)}

    def build():
        photos = [np.asarray(Image.open(data_dir / name).convert("RGB")) for name in SAMPLE_PHOTOS]
        rng = np.random.default_rng(seed)
        out = {}
        for split, (lo, hi) in bands.items():
            n = limits[split] or SAMPLE_COUNTS[split]
            crops = np.empty((n, resolution, resolution, 3), np.uint8)
            for i in range(n):
                photo = photos[i % len(photos)]
                h, w = photo.shape[:2]
                top0, top1 = int(lo * h), int(hi * h)
                side = min(2 * resolution, top1 - top0, w)
                top = rng.integers(top0, top1 - side + 1)
                left = rng.integers(0, w - side + 1)
                crops[i] = _square(Image.fromarray(photo[top:top + side, left:left + side]), resolution)
            out[split] = crops
        return out

    check_samples_size(resolution, limits["train"], limits["val"])
    key = {"source": "skimage-samples", "photos": SAMPLE_PHOTOS, "resolution": resolution,
           "limits": limits, "seed": seed}
    return _cached(cache_dir, "samples", key, build)[0]


def _torchvision(name: str, resolution: int, limits: dict, seed: int, cache_dir: Path):
    """The canonical dataset through torchvision's download (needs the network)."""
    import torchvision

    root = cache_dir / "torchvision"
    if os.environ.get("COLORIZE_OFFLINE"):
        raise DataError(f"dataset {name!r}: no data root given and downloads are off (COLORIZE_OFFLINE). "
                        + LAYOUT_HELP.format(name=name))
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20)
    try:
        if name == "cifar10":
            train = torchvision.datasets.CIFAR10(root, train=True, download=True).data
            test = torchvision.datasets.CIFAR10(root, train=False, download=True).data
            order = np.random.default_rng(seed).permutation(len(train))
            val, train = train[order[:10000]], train[order[10000:]]
            arrays = {"train": train, "val": val, "test": test}
            if resolution != 32:
                arrays = {s: np.stack([_square(Image.fromarray(a), resolution) for a in arr])
                          for s, arr in arrays.items()}
            files = None
        elif name == "flowers102":
            files = {s: list(torchvision.datasets.Flowers102(root, split=s, download=True)._image_files)
                     for s in SPLITS}
        else:
            raise DataError(f"dataset {name!r} is not known to torchvision here; pass an image folder path")
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"dataset {name!r}: no data root was given and downloading it failed ({e}). "
                        + LAYOUT_HELP.format(name=name)) from e
    finally:
        socket.setdefaulttimeout(old_timeout)
    if files is not None:
        files = {s: _subset(files[s], limits[s], seed) for s in SPLITS}
        arrays, gray = _cached(cache_dir, name, {"source": "torchvision", "resolution": resolution, "limits": limits},
                               lambda: {s: decode_many(files[s], resolution) for s in SPLITS})
        return arrays, gray, {s: [Path(p).name for p in files[s]] for s in SPLITS}
    arrays = {s: arrays[s][np.sort(np.random.default_rng(seed + 1).permutation(len(arrays[s]))[:limits[s]])]
              if limits[s] and limits[s] < len(arrays[s]) else arrays[s] for s in SPLITS}
    return arrays, {s: grayscale_indices(arrays[s]) for s in SPLITS}, None


def load_splits(dataset: str, resolution: int, data_root: str | None = None, cache_dir: Path | str | None = None,
                train_limit: int = 0, eval_limit: int = 0, seed: int = 0, allow_grayscale: bool = False) -> Splits:
    """Decoded uint8 splits of ``dataset`` at ``resolution`` (decoded once, then cached).

    Grayscale images are left out of every split with a warning (DataWarning); a split with more than
    GRAY_MAX_FRACTION of them is refused. ``allow_grayscale`` or $COLORIZE_ALLOW_GRAYSCALE=1 keeps them.
    """
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    data_root = data_root or default_data_root()
    limits = {"train": train_limit, "val": eval_limit, "test": eval_limit}
    gray, names = {}, None  # the bundled sample photos are known to be colour
    if dataset == "samples":
        arrays, source = _samples(resolution, limits, seed, cache_dir), "scikit-image sample photos"
    elif dataset not in KNOWN and (os.sep in dataset or Path(dataset).is_dir()):
        root = Path(dataset)
        (arrays, gray, names), source = _from_folder(root, resolution, limits, seed, cache_dir, root.name), str(root)
    elif data_root:
        root = Path(data_root) / dataset
        if not root.is_dir():
            raise DataError(f"dataset {dataset!r}: {root} does not exist under the data root {data_root}. "
                            + LAYOUT_HELP.format(name=dataset))
        (arrays, gray, names), source = _from_folder(root, resolution, limits, seed, cache_dir, dataset), str(root)
    elif dataset in KNOWN:
        (arrays, gray, names), source = _torchvision(dataset, resolution, limits, seed, cache_dir), "torchvision"
    else:
        raise DataError(f"dataset {dataset!r} is neither one of {list(KNOWN)} nor an existing image folder")
    for s in SPLITS:
        if len(arrays[s]) == 0:
            raise DataError(f"dataset {dataset!r} has no images in its {s} split ({source})")
    arrays = check_grayscale(dataset, source, arrays, gray, names, allow_grayscale)
    return Splits(dataset, resolution, source, arrays["train"], arrays["val"], arrays["test"])


# ---------------------------------------------------------------- device batches


def preview_indices(n: int, count: int) -> list[int]:
    """The same evenly spaced test indices for every trial of a dataset."""
    count = min(count, n)
    return sorted({int(i) for i in np.linspace(0, n - 1, count).round()})


class DeviceImages:
    """A split as a uint8 tensor on the device; batches come out as float RGB in [0, 1].

    NHWC uint8 permuted to NCHW is already channels_last in memory, so batches
    need no copy for channels_last convolutions.
    """

    def __init__(self, images: np.ndarray, device: torch.device | str):
        import torch   # here, not above: decoding and the cache need no torch (a driver's data check before Ray)
        self.images = torch.from_numpy(np.array(images, dtype=np.uint8, copy=True)).to(device)
        self.device = self.images.device

    def __len__(self) -> int:
        return self.images.shape[0]

    def to_float(self, uint8_nhwc: torch.Tensor) -> torch.Tensor:
        return uint8_nhwc.permute(0, 3, 1, 2).float().div_(255)

    def take(self, index) -> torch.Tensor:
        return self.to_float(self.images[index])

    def train_batches(self, batch_size: int, generator: torch.Generator, augment: bool | float = False):
        """Shuffled training batches; ``augment``: a strength (True = 1.0, see ``augment_batch``), 0 = none."""
        import torch
        strength = float(augment)
        n = len(self)
        perm = torch.randperm(n, device=self.device, generator=generator)
        # Drop the last partial batch: tiny batches make BatchNorm statistics noisy.
        stop = max(n - batch_size + 1, 1) if n >= batch_size else 1
        for start in range(0, stop, batch_size):
            x = self.take(perm[start:start + batch_size])
            yield augment_batch(x, generator, strength) if strength > 0 else x

    def eval_batches(self, batch_size: int):
        for start in range(0, len(self), batch_size):
            yield self.take(slice(start, start + batch_size))


def augment_batch(x: torch.Tensor, generator: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """Per-image horizontal flips and random translations by up to ``strength * side / 8`` pixels
    (reflect-padded crops); above strength 1 also random resized crops (zoom up to 1 + (strength - 1) / 2).

    Random values are drawn and applied on the device: reading offsets back with ``.tolist()`` was a
    host sync in every training step. Input and target both come from the augmented RGB batch, so
    they stay aligned.
    """
    import torch
    n, c, h, w = x.shape
    dev = x.device
    flip = torch.rand(n, 1, 1, 1, device=dev, generator=generator) < 0.5
    x = torch.where(flip, x.flip(3), x)
    pad = min(max(int(h * strength / 8), 1), h - 1, w - 1)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="reflect")
    offsets = torch.randint(0, 2 * pad + 1, (2, n, 1, 1), device=dev, generator=generator)
    # One gather of each image's window from the flattened padded image (3x faster on the CPU than
    # indexing with four broadcast index tensors).
    rows = offsets[0] + torch.arange(h, device=dev)[:, None]                       # (n, h, 1)
    flat = rows * (w + 2 * pad) + offsets[1] + torch.arange(w, device=dev)          # (n, h, w)
    x = padded.reshape(n, c, -1).gather(2, flat.view(n, 1, h * w).expand(n, c, h * w)).view(n, c, h, w)
    if strength > 1:
        # Random resized crop: a window of side 1/zoom anywhere inside the image, resized back.
        scale = 1 / (1 + (strength - 1) / 2 * torch.rand(n, device=dev, generator=generator))
        shift = (1 - scale) * (2 * torch.rand(2, n, device=dev, generator=generator) - 1)
        theta = torch.zeros(n, 2, 3, device=dev, dtype=x.dtype)
        theta[:, 0, 0] = theta[:, 1, 1] = scale
        theta[:, 0, 2], theta[:, 1, 2] = shift[0], shift[1]
        grid = torch.nn.functional.affine_grid(theta, [n, c, h, w], align_corners=False)
        x = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="reflection",
                                            align_corners=False)
    return x.contiguous(memory_format=torch.channels_last)
