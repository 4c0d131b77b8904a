import numpy as np
import pytest
import torch
from PIL import Image

import study.engine.data as data
from study.engine.data import DataError, DeviceImages, folder_splits, load_splits, preview_indices


def _folder(root, splits=("train", "test"), per_class=10, size=(40, 30)):
    rng = np.random.default_rng(0)
    for split in splits:
        for cls in ("cat", "dog"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(per_class):
                arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{i:03d}.png")
    return root


def test_image_folder_splits_resize_and_cache(tmp_path, monkeypatch):
    root = _folder(tmp_path / "tiny")
    s = load_splits(str(root), 16, cache_dir=tmp_path / "cache")
    # No val folder: a seeded 20% of train.
    assert (len(s.train), len(s.val), len(s.test)) == (16, 4, 20)
    assert s.train.dtype == np.uint8 and s.train.shape[1:] == (16, 16, 3)
    assert isinstance(s.train, np.memmap)
    # Second load comes from the cache: no decoding at all.
    monkeypatch.setattr(data, "decode_many", lambda *a: pytest.fail("decoded again"))
    s2 = load_splits(str(root), 16, cache_dir=tmp_path / "cache")
    assert np.array_equal(s2.val, s.val)
    # Another resolution is another cache entry.
    monkeypatch.undo()
    assert load_splits(str(root), 24, cache_dir=tmp_path / "cache").test.shape[1:] == (24, 24, 3)


def test_val_folder_used_and_limits(tmp_path):
    root = _folder(tmp_path / "withval", splits=("train", "val", "test"))
    files = folder_splits(root, seed=0)
    assert {k: len(v) for k, v in files.items()} == {"train": 20, "val": 20, "test": 20}
    s = load_splits(str(root), 16, cache_dir=tmp_path / "c", train_limit=8, eval_limit=5)
    assert (len(s.train), len(s.val), len(s.test)) == (8, 5, 5)


def test_missing_root_says_where_to_put_data(tmp_path, monkeypatch):
    monkeypatch.setenv("COLORIZE_OFFLINE", "1")
    monkeypatch.delenv("COLORIZE_DATA_ROOT", raising=False)
    with pytest.raises(DataError, match=r"cifar10/<split>/<class>/\*\.jpg.*--data-root"):
        load_splits("cifar10", 32, cache_dir=tmp_path)
    with pytest.raises(DataError, match="does not exist under the data root"):
        load_splits("cifar10", 32, data_root=str(tmp_path / "nowhere"), cache_dir=tmp_path)


def test_corrupt_image_is_named_not_skipped(tmp_path):
    root = _folder(tmp_path / "bad")
    bad = root / "train" / "dog" / "005.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(DataError, match="005.png"):
        load_splits(str(root), 16, cache_dir=tmp_path / "cache")


def test_samples_dataset_needs_no_data(tmp_path):
    s = load_splits("samples", 32, cache_dir=tmp_path, train_limit=64, eval_limit=16)
    assert s.train.shape == (64, 32, 32, 3) and s.test.shape == (16, 32, 32, 3)
    assert s.train.std() > 10  # real photos, not blank


def test_cifar10_split_sizes_and_slice(shared_data, cache_dir):
    files = folder_splits(shared_data / "cifar10", seed=0)
    assert {k: len(v) for k, v in files.items()} == {"train": 40000, "val": 10000, "test": 10000}
    assert not set(files["train"]) & set(files["val"])
    with pytest.warns(data.DataWarning, match="grayscale"):  # real CIFAR-10 holds a few grayscale photos
        s = load_splits("cifar10", 32, data_root=str(shared_data), cache_dir=cache_dir, train_limit=300,
                        eval_limit=100)
    # The limits pick the images; the grayscale ones among them are then left out.
    assert 280 <= len(s.train) < 300 and 90 <= len(s.val) < 100 and s.val.shape[1:] == (32, 32, 3)
    assert not data.grayscale_indices(s.train) and not data.grayscale_indices(s.val)


def test_flowers102_official_splits(shared_data, cache_dir):
    files = folder_splits(shared_data / "flowers102", seed=0)
    assert {k: len(v) for k, v in files.items()} == {"train": 1020, "val": 1020, "test": 1020}


def test_device_batches():
    imgs = np.random.default_rng(0).integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    dev = DeviceImages(imgs, "cpu")
    g = torch.Generator().manual_seed(0)
    batches = list(dev.train_batches(4, g))
    assert [b.shape[0] for b in batches] == [4, 4]  # last partial batch dropped
    b = batches[0]
    assert b.dtype == torch.float32 and b.shape == (4, 3, 8, 8) and 0 <= b.min() and b.max() <= 1
    assert b.is_contiguous(memory_format=torch.channels_last)
    seen = torch.cat(batches).mul(255).round().byte().permute(0, 2, 3, 1)
    assert all(any(torch.equal(s, torch.from_numpy(i)) for i in imgs) for s in seen)
    evals = list(dev.eval_batches(4))
    assert [b.shape[0] for b in evals] == [4, 4, 2]
    aug = next(dev.train_batches(4, g, augment=True))
    assert aug.shape == (4, 3, 8, 8)
    assert preview_indices(100, 4) == [0, 33, 66, 99]


def _mixed_folder(root, gray: int, colour: int, val_gray: int = 0):
    """Real JPEGs: colour photos crops plus some saved grayscale (as L, and as RGB with R=G=B)."""
    import skimage.data
    photo = skimage.data.astronaut()
    for split, n_gray, n_colour in (("train", gray, colour), ("val", val_gray, 10), ("test", 0, 10)):
        d = root / split / "things"
        d.mkdir(parents=True)
        for i in range(n_colour + n_gray):
            crop = photo[i * 7 % 400:][:64, i * 11 % 400:][:, :64]
            name = f"{'gray' if i < n_gray else 'colour'}_{i:03d}.jpg"
            if i < n_gray:
                g = Image.fromarray(crop).convert("L")
                (g if i % 2 else g.convert("RGB")).save(d / name, quality=90)
            else:
                Image.fromarray(crop).save(d / name, quality=90)
    return root


def test_grayscale_images_are_named_left_out_and_refused_over_five_percent(tmp_path, monkeypatch):
    monkeypatch.delenv(data.ALLOW_GRAYSCALE_ENV, raising=False)
    few = _mixed_folder(tmp_path / "few", gray=1, colour=39)  # 2.5%: a warning that names the file
    with pytest.warns(data.DataWarning, match=r"1 of 40 train images \(2\.5%\) are grayscale.*gray_000\.jpg.*"
                                              r"left out"):
        s = load_splits(str(few), 32, cache_dir=tmp_path / "cache")
    assert len(s.train) == 39 and not data.grayscale_indices(s.train)
    assert len(s.val) == len(s.test) == 10
    with pytest.warns(data.DataWarning, match="1 of 40 train"):  # from the cache: the count was kept
        assert len(load_splits(str(few), 32, cache_dir=tmp_path / "cache").train) == 39

    many = _mixed_folder(tmp_path / "many", gray=6, colour=24, val_gray=1)  # 20% of train
    with pytest.raises(DataError, match=r"6 of 30 train images \(20\.0%\) are grayscale.*gray_00\d\.jpg.*"
                                        r"COLORIZE_ALLOW_GRAYSCALE=1"):
        load_splits(str(many), 32, cache_dir=tmp_path / "cache")
    with pytest.warns(data.DataWarning, match="6 of 30 train.*kept"):
        assert len(load_splits(str(many), 32, cache_dir=tmp_path / "cache", allow_grayscale=True).train) == 30
    monkeypatch.setenv(data.ALLOW_GRAYSCALE_ENV, "1")
    with pytest.warns(data.DataWarning, match=r"1 of 11 val images.*kept"):
        assert len(load_splits(str(many), 32, cache_dir=tmp_path / "cache").val) == 11


def test_grayscale_images_would_hide_a_colorizers_gain():
    """Why they are left out: on an exact grayscale photo the grayscale input scores ~110 dB, so 2% of
    them lift its mean PSNR above a colorizer that is better on every colour image."""
    import torch

    from study.engine.color import rgb_to_y
    from study.engine.metrics import psnr
    g = torch.Generator().manual_seed(0)
    colour = torch.rand(49, 3, 8, 8, generator=g)
    photos = torch.cat([colour, torch.rand(1, 1, 8, 8, generator=g).expand(-1, 3, -1, -1)])  # the last is gray
    gray_input = rgb_to_y(photos).expand(-1, 3, -1, -1)
    colorizer = photos + 0.9 * (gray_input - photos) + 0.01  # a tenth less colour error, a small bias
    is_gray = torch.tensor([i == 49 for i in range(50)])
    assert (psnr(colorizer, photos)[:49] > psnr(gray_input, photos)[:49]).all()
    assert psnr(gray_input, photos)[49] > 100
    assert psnr(colorizer, photos).mean() < psnr(gray_input, photos).mean()        # with the gray photo
    assert psnr(colorizer, photos)[~is_gray].mean() > psnr(gray_input, photos)[~is_gray].mean()  # without it


def test_a_split_of_only_grayscale_images_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv(data.ALLOW_GRAYSCALE_ENV, raising=False)
    arrays = {s: np.full((2, 4, 4, 3), 128, np.uint8) for s in data.SPLITS}
    with pytest.raises(DataError, match="no colour image is left in the train split"):
        data.check_grayscale("tiny", "here", arrays, {"train": [0, 1]})


def test_colour_data_has_no_grayscale_warning(tmp_path):
    import warnings
    root = _mixed_folder(tmp_path / "colour", gray=0, colour=12)
    with warnings.catch_warnings():
        warnings.simplefilter("error", data.DataWarning)
        load_splits(str(root), 32, cache_dir=tmp_path / "cache")


# ---- a file name that is not valid UTF-8 (a Latin-1 "café.png" copied from an old disk)

def _latin1_folder(root):
    """Images whose names hold the byte 0xE9 (Latin-1 é), which no UTF-8 decoder accepts; one gray image, so
    the warning that names grayscale files has to print such a name too."""
    import os

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(10):
                name = os.fsdecode(f"{i:03d}-caf".encode() + b"\xe9.png")   # surrogate-escaped, as os.listdir gives it
                arr = rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)
                if split == "train" and cls == "cat" and i == 0:
                    arr[:] = arr[..., :1]
                Image.fromarray(arr).save(d / name)
    return root


def test_non_utf8_file_names_load_and_cache(tmp_path):
    import warnings

    root = _latin1_folder(tmp_path / "latin1")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        s = load_splits(str(root), 16, cache_dir=tmp_path / "cache")
        # The cache key hashes the names' bytes: a second load is a cache hit (one cache entry).
        again = load_splits(str(root), 16, cache_dir=tmp_path / "cache")
    assert (len(s.train), len(s.val), len(s.test)) == (15, 4, 20)   # 16 train less the gray one, 4 val
    assert any("000-caf\udce9.png" in str(w.message) for w in seen)
    assert np.array_equal(again.test, s.test) and len(list((tmp_path / "cache" / "data").iterdir())) == 1


def test_non_utf8_file_names_through_the_trial_command(tmp_path):
    import subprocess

    from conftest import PYTHON, python_env

    root = _latin1_folder(tmp_path / "latin1")
    p = subprocess.run([PYTHON, "-m", "study.trial", "--dataset", str(root), "--resolution", "16", "--depth", "2",
                        "--base-filters", "4", "--batch-size", "8", "--epochs", "1", "--preview-count", "2",
                        "--device", "cpu", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out")],
                       cwd=tmp_path, env=python_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Traceback" not in p.stderr and "best val PSNR" in p.stdout
    assert "000-caf\\udce9.png" in p.stderr   # the grayscale warning names the file, escaped, not a crash


def test_the_data_is_decoded_and_read_back_without_torch(tmp_path):
    # A driver checks a study's data before Ray starts (study.run's prepare_data): decoding and the cache need
    # numpy and PIL only; torch comes with the first tensor made (DeviceImages), in a trial.
    import subprocess

    from conftest import PYTHON, python_env
    code = ("import sys\nfrom study.engine import load_splits\n"
            "for _ in range(2):\n    s = load_splits('samples', 16, cache_dir=sys.argv[1], train_limit=8, eval_limit=4)\n"
            "print(s.train.shape, 'torch' in sys.modules)\n"
            "from study.engine import DeviceImages\nDeviceImages(s.val, 'cpu')\nprint('torch' in sys.modules)\n")
    p = subprocess.run([PYTHON, "-c", code, str(tmp_path)], env=python_env(), capture_output=True, text=True, timeout=300)
    assert p.stdout.split("\n")[:2] == ["(8, 16, 16, 3) False", "True"], p.stdout + p.stderr[-2000:]
