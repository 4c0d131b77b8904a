"""study.colorize on a real (tiny) study: outputs, luminance kept, bad inputs, trial choice, safe loading."""
from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import PYTHON, python_env
from PIL import Image
from skimage import data as skdata

from study import cli
from study.colorize import collect_inputs, colorize_image, main, predict_uv
from study.colorize_model import load_model
from study.config.trial import TrialConfig
from study.engine.checkpoints import CHECKPOINT_FILE
from study.engine.color import rgb_to_y, rgb_to_yuv
from study.local import run_local_study
from study.results.store import ResultsWriter, read_table


@pytest.fixture(scope="module")
def study(tmp_path_factory, cache_dir) -> Path:
    """Three real trials (UV, RGB, and RGB with gray_start), trained for one tiny epoch each."""
    folder = tmp_path_factory.mktemp("colorize") / "study"
    # base_filters=8: a narrow UNet trains in half the time, and these tests need a real model, not a good one.
    cfgs = [TrialConfig(dataset="samples", epochs=1, train_limit=128, eval_limit=32, output=o, preview_count=2,
                        base_filters=8, gray_start=g) for o, g in (("uv", False), ("rgb", False), ("rgb", True))]
    run_local_study(folder, cfgs, cache_dir=cache_dir, log=lambda s: None)
    return folder


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Odd sizes and aspects: colour, grayscale ("L"), colour with alpha, and two non-images."""
    folder = tmp_path_factory.mktemp("inputs")
    astronaut = Image.fromarray(skdata.astronaut())
    files = {"colour": folder / "astronaut.png", "gray": folder / "coffee_gray.png",
             "rgba": folder / "chelsea_alpha.png", "text": folder / "notes.txt", "corrupt": folder / "broken.png"}
    astronaut.resize((50, 37)).save(files["colour"])
    Image.fromarray(skdata.coffee()).convert("L").resize((80, 120)).save(files["gray"])
    rgba = Image.fromarray(skdata.chelsea()).resize((33, 21)).convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.arange(33, dtype=np.uint8) * 7, (21, 1))))
    rgba.save(files["rgba"])
    files["text"].write_text("not an image\n")
    files["corrupt"].write_bytes(b"\x00garbage bytes, not a PNG" * 40)
    return files


def luma(pixels: np.ndarray) -> np.ndarray:
    """Y in [0, 1] of (H, W) gray or (H, W, 3+) uint8 pixels, with study.engine.color."""
    x = torch.from_numpy(np.asarray(pixels, dtype=np.float64)) / 255
    if x.ndim == 2:
        return x.numpy()
    return rgb_to_y(x[..., :3].permute(2, 0, 1)[None])[0, 0].numpy()


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.run(main, [str(a) for a in argv])   # as `python -m study.colorize` runs it
    out, err = capsys.readouterr()
    return rc, out, err


def trials(study: Path) -> pd.DataFrame:
    return read_table(str(study), "trials")


def write_trials(study: Path, table: pd.DataFrame) -> None:
    """The trials rows as ``table`` has them, through the study's own writer (its journal stays consistent)."""
    with ResultsWriter(str(study)) as writer:
        writer.upsert("trials", table.to_dict("records"))


# ---------------------------------------------------------------- the CLI on a real study


def test_colorizes_files_keeping_size_and_luminance_and_reports_bad_inputs(study, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    rc, stdout, err = run(capsys, "--study", study, *inputs.values(), "--out", out, "--side-by-side",
                          "--device", "cpu")
    assert rc == 1  # some inputs failed, the others were done
    assert "notes.txt" in err and "broken.png" in err and "not an image" in err
    for key in ("colour", "gray", "rgba"):
        source = np.asarray(Image.open(inputs[key]))
        result = Image.open(out / f"{inputs[key].stem}.png")
        assert result.size == Image.open(inputs[key]).size
        pixels = np.asarray(result)
        # The model only adds colour: the input's full-resolution luminance is kept (uint8 rounding aside).
        assert np.abs(luma(pixels) - luma(source)).max() <= 1 / 255, key
        w, h = result.size
        assert Image.open(out / f"{inputs[key].stem}_side_by_side.png").size == (2 * w, h)
    rgba = np.asarray(Image.open(out / "chelsea_alpha.png"))
    assert rgba.shape[-1] == 4 and (rgba[..., 3] == np.asarray(Image.open(inputs["rgba"]))[..., 3]).all()
    assert not (out / "notes.png").exists() and not (out / "broken.png").exists()
    assert "3 of 5 inputs" in stdout


def test_all_good_inputs_exit_0_and_folders_keep_subpaths(study, inputs, tmp_path, capsys):
    folder = tmp_path / "photos"
    (folder / "a").mkdir(parents=True)
    (folder / "b").mkdir()
    shutil.copy(inputs["colour"], folder / "a" / "x.png")
    shutil.copy(inputs["gray"], folder / "b" / "x.png")
    rc, _, err = run(capsys, "--study", study, folder, "--out", tmp_path / "out")
    assert rc == 0, err
    assert (tmp_path / "out" / "a" / "x.png").is_file() and (tmp_path / "out" / "b" / "x.png").is_file()


def test_out_that_would_replace_an_input_is_refused_before_anything_is_written(study, inputs, tmp_path, capsys):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(inputs["colour"], folder / "a.jpg.png")   # its output name under --out photos/.. is itself
    shutil.copy(inputs["gray"], folder / "sub" / "b.png")
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    cases = [  # (arguments, the input the message must name)
        ([folder, "--out", folder], str(folder)),                                  # the input folder itself
        ([folder / "sub", "--out", folder / "sub" / "."], "sub"),                   # the same folder, spelt otherwise
        ([folder / "sub" / "b.png", "--out", folder / "sub"], "b.png"),            # an output path equal to an input
        ([folder / "sub" / "b.png", "--side-by-side", "--out", folder / "sub"], "b.png"),
        ([folder, "--out", folder.parent / "photos" / "sub" / ".."], str(folder)),
    ]
    for argv, named in cases:
        rc, stdout, err = run(capsys, "--study", study, *argv)
        assert rc == 2, (argv, err)
        assert "--out" in err and named in err and "another --out" in err and "Traceback" not in err, err
        assert "wrote" not in stdout
    # The real command line: the message, no traceback, status 2.
    p = subprocess.run([PYTHON, "-m", "study.colorize", "--study", str(study), str(folder), "--out", str(folder)],
                       capture_output=True, text=True, env=python_env(), timeout=300)
    assert p.returncode == 2 and p.stderr.startswith("error: --out") and "Traceback" not in p.stderr, p.stderr
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    # Colorizing a file into its own folder is fine when no input is replaced.
    rc, _, err = run(capsys, "--study", study, folder / "a.jpg.png", "--out", folder / "sub")
    assert rc == 0 and (folder / "sub" / "a.jpg.png").is_file() and (folder / "sub" / "b.png").read_bytes() == \
        before[folder / "sub" / "b.png"], err


def test_best_trial_by_default_and_trial_option(study, inputs, tmp_path, capsys):
    table = trials(study)
    best = table.sort_values("best_val_psnr").iloc[-1]["trial_id"]
    other = next(t for t in table["trial_id"] if t != best)
    _, stdout, _ = run(capsys, "--study", study, inputs["colour"], "--out", tmp_path / "best")
    assert f"trial {best} " in stdout
    rc, stdout, _ = run(capsys, "--study", study, "--trial", other, inputs["colour"], "--out", tmp_path / "other")
    assert rc == 0 and f"trial {other} " in stdout
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "best" / "astronaut.png")),
                              np.asarray(Image.open(tmp_path / "other" / "astronaut.png")))
    rc, _, err = run(capsys, "--study", study, "--trial", "nope", inputs["colour"], "--out", tmp_path / "x")
    assert rc == 2 and "'nope'" in err


def test_dataset_option(study, inputs, tmp_path, capsys):
    rc, _, _ = run(capsys, "--study", study, "--dataset", "samples", inputs["colour"], "--out", tmp_path / "o")
    assert rc == 0
    rc, _, err = run(capsys, "--study", study, "--dataset", "flowers102", inputs["colour"], "--out", tmp_path / "o")
    assert rc == 2 and "flowers102" in err and "samples" in err


def test_missing_study_exits_2_naming_it(inputs, tmp_path, capsys):
    rc, _, err = run(capsys, "--study", tmp_path / "no_study", inputs["colour"], "--out", tmp_path / "out")
    assert rc == 2 and "no_study" in err and "does not exist" in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- where the checkpoint is


def copy_study(study: Path, target: Path, checkpoint_path, checkpoints: bool = True) -> Path:
    """A copy of the study (with or without its checkpoints) whose trials table records
    ``checkpoint_path(trial_id)`` instead."""
    shutil.copytree(study, target, ignore=None if checkpoints else shutil.ignore_patterns("checkpoints"))
    table = trials(target)
    table["checkpoint_path"] = [checkpoint_path(t) for t in table["trial_id"]]
    write_trials(target, table)
    return target


def test_study_copied_elsewhere_finds_its_checkpoints(study, inputs, tmp_path, capsys):
    # Recorded on another machine: an absolute path that does not exist here.
    moved = copy_study(study, tmp_path / "elsewhere" / study.name,
                       lambda t: f"/nonexistent/home/{study.name}/checkpoints/{t}")
    rc, stdout, err = run(capsys, "--study", moved, inputs["colour"], "--out", tmp_path / "out")
    assert rc == 0, err
    assert f"checkpoint {moved / 'checkpoints'}" in stdout


def test_relative_checkpoint_path_is_relative_to_the_study(study, inputs, tmp_path, capsys, monkeypatch):
    # As the Ray runner records them; the working directory does not matter.
    rel = copy_study(study, tmp_path / "rel", lambda t: f"checkpoints/{t}")
    monkeypatch.chdir(tmp_path)
    rc, stdout, err = run(capsys, "--study", rel, inputs["colour"], "--out", tmp_path / "out")
    assert rc == 0, err
    assert f"checkpoint {rel / 'checkpoints'}" in stdout


def test_missing_checkpoint_exits_2_naming_it(study, inputs, tmp_path, capsys):
    broken = copy_study(study, tmp_path / "broken", lambda t: f"/nonexistent/ckpt_{t}")
    rc, _, err = run(capsys, "--study", broken, inputs["colour"], "--out", tmp_path / "out")
    assert rc == 2 and "/nonexistent/ckpt_local_" in err and "does not exist" in err


def test_checkpoint_file_uri(study, inputs, tmp_path, capsys):
    uri = copy_study(study, tmp_path / "uri", lambda t: f"file://{study}/checkpoints/{t}", checkpoints=False)
    rc, stdout, err = run(capsys, "--study", uri, inputs["colour"], "--out", tmp_path / "out")
    assert rc == 0, err
    assert f"checkpoint {study / 'checkpoints'}" in stdout


def test_checkpoint_on_s3(study, inputs, tmp_path, capsys, monkeypatch):
    server = pytest.importorskip("moto.server").ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        import pyarrow.fs as pafs
        host, port = server.get_host_and_port()
        for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                     "AWS_ENDPOINT_URL": f"http://{host}:{port}"}.items():
            monkeypatch.setenv(k, v)
        s3 = pafs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http", region="us-east-1",
                               allow_bucket_creation=True)
        s3.create_dir("bucket")
        pafs.copy_files(str(study / "checkpoints"), "bucket/s1/checkpoints", destination_filesystem=s3)
        remote = copy_study(study, tmp_path / "s3", lambda t: f"s3://bucket/s1/checkpoints/{t}", checkpoints=False)
        rc, stdout, err = run(capsys, "--study", remote, inputs["colour"], "--out", tmp_path / "out")
        assert rc == 0, err
        assert "checkpoint s3://bucket/s1/checkpoints/local_" in stdout
    finally:
        server.stop()


class Boom:
    """Unpickling this runs code: it touches a file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (touch, (self.marker,))


def touch(path: str) -> str:
    Path(path).touch()
    return path


def test_checkpoint_with_pickled_code_is_refused(study, inputs, tmp_path, capsys):
    marker = tmp_path / "code_ran"
    state = torch.load(study / "checkpoints" / "local_00000" / CHECKPOINT_FILE, weights_only=True)
    evil = tmp_path / "evil"
    evil.mkdir()
    torch.save({**state, "payload": Boom(marker)}, evil / CHECKPOINT_FILE)
    # The payload is live: an unsafe load would run it.
    torch.load(evil / CHECKPOINT_FILE, weights_only=False)
    assert marker.exists()
    marker.unlink()
    fake = copy_study(study, tmp_path / "fake", lambda t: str(evil))
    rc, _, err = run(capsys, "--study", fake, inputs["colour"], "--out", tmp_path / "out")
    assert rc == 2 and "refusing" in err and str(evil) in err
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"\x00garbage" * 200, b"not a checkpoint\n"])
def test_a_garbage_checkpoint_is_said_to_be_no_checkpoint(study, inputs, tmp_path, capsys, content):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / CHECKPOINT_FILE).write_bytes(content)
    fake = copy_study(study, tmp_path / "fake", lambda t: str(bad))
    rc, _, err = run(capsys, "--study", fake, inputs["colour"], "--out", tmp_path / "out")
    assert rc == 2 and "is not a checkpoint" in err and "pickled code" not in err, err
    assert "Traceback" not in err


# ---------------------------------------------------------------- the core, with stand-in models


class Constant(torch.nn.Module):
    """Predicts the same colour everywhere; records the input it saw."""

    def __init__(self, values):
        super().__init__()
        self.values = torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1)
        self.seen = None

    def forward(self, y):
        self.seen = y.shape
        return self.values.expand(y.shape[0], -1, *y.shape[-2:])


@pytest.mark.parametrize("output,values", [("uv", (0.1, 0.1)), ("rgb", (0.8, 0.45, 0.2))])
def test_colorize_image_uses_predicted_chroma_and_input_luminance(output, values):
    image = np.asarray(Image.fromarray(skdata.astronaut()).resize((61, 45)))
    cfg = TrialConfig(output=output)
    model = Constant(values)
    result = colorize_image(model, cfg, image, "cpu")
    assert result.shape == image.shape and result.dtype == np.uint8
    assert model.seen == (1, 1, cfg.image_size, cfg.image_size)
    assert np.abs(luma(result) - luma(image)).max() <= 1 / 255
    want = (torch.tensor(values).view(1, 2, 1, 1) if output == "uv"
            else rgb_to_yuv(torch.tensor(values).view(1, 3, 1, 1))[:, 1:]).flatten().numpy()
    uv = rgb_to_yuv(torch.from_numpy(result / 255.0).permute(2, 0, 1)[None])[0, 1:].numpy()
    # Where that chroma fits the gamut (mid-gray luminance), the output has exactly it.
    mid = (luma(image) > 0.35) & (luma(image) < 0.65)
    assert mid.sum() > 100
    assert np.abs(uv[:, mid] - want[:, None]).max() < 0.01


def test_grayscale_array_input():
    gray = np.asarray(Image.fromarray(skdata.camera()).resize((40, 70)))
    result = colorize_image(Constant((0.05, -0.05)), TrialConfig(output="uv"), gray, "cpu")
    assert result.shape == (70, 40, 3)
    assert np.abs(luma(result) - gray / 255).max() <= 1 / 255


def test_output_names_do_not_collide(tmp_path):
    for rel in ("dir/a.png", "dir/a.jpg", "dir/sub/a.png", "top/a.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    args = [str(tmp_path / "dir"), str(tmp_path / "top" / "a.png"), str(tmp_path / "dir" / "a.png"),
            str(tmp_path / "missing.png")]
    jobs, errors = collect_inputs(args, True)
    assert len(jobs) == 4  # dir/a.png given twice is done once
    # Each output keeps its input's format: a.jpg and a.png no longer clash, two a.png do.
    assert {str(j.output(Path("o"))) for j in jobs} == {"o/a.png", "o/a.jpg", "o/sub/a.png", "o/a_png.png"}
    assert errors == [f"{tmp_path / 'missing.png'}: no such file or folder"]
    # One format for all: dir/a.jpg and dir/a.png would both be a.png, so the second gets its extension.
    jobs, _ = collect_inputs(args, True, "png")
    assert {str(j.output(Path("o"))) for j in jobs} == {"o/a.png", "o/a_png.png", "o/sub/a.png", "o/a_png_2.png"}


def test_flip_average_is_mirror_equivariant_and_changes_a_real_models_colours(study, inputs, tmp_path, capsys):
    # The UV trial: after one tiny epoch the gray_start trial has barely left gray, so mirroring changes little.
    table = trials(study)
    uv = table[table["output"] == "uv"]["trial_id"].item()
    loaded = load_model(str(study), None, uv, torch.device("cpu"))
    s = loaded.cfg.image_size
    y = torch.rand(1, 1, s, s, generator=torch.Generator().manual_seed(0))
    plain = predict_uv(loaded.model, loaded.cfg, y, torch.device("cpu"))
    averaged = predict_uv(loaded.model, loaded.cfg, y, torch.device("cpu"), flip_average=True)
    mirrored = predict_uv(loaded.model, loaded.cfg, y.flip(-1), torch.device("cpu"), flip_average=True)
    assert torch.allclose(mirrored, averaged.flip(-1), atol=1e-6)      # what a mirror-symmetric colorizer does
    assert not torch.allclose(plain, averaged, atol=1e-4)              # a trained UNet on its own is not one
    symmetric = torch.cat([y[..., : s // 2], y[..., : s // 2].flip(-1)], -1)
    out = predict_uv(loaded.model, loaded.cfg, symmetric, torch.device("cpu"), flip_average=True)
    assert torch.allclose(out, out.flip(-1), atol=1e-6)
    rc, stdout, err = run(capsys, "--study", study, "--trial", uv, inputs["colour"], "--flip-average", "--out",
                          tmp_path / "f")
    assert rc == 0 and "averaged with mirror images" in stdout, err
    rc, stdout, _ = run(capsys, "--study", study, "--trial", uv, inputs["colour"], "--out", tmp_path / "p")
    assert not loaded.cfg.tta_flip and "averaged with mirror images" not in stdout   # default: as evaluated
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "f/astronaut.png")),
                              np.asarray(Image.open(tmp_path / "p/astronaut.png")))


def test_a_gray_start_rgb_trial_colorizes(study, inputs, tmp_path, capsys):
    table = trials(study)
    trial = table[table["gray_start"].astype(bool)]["trial_id"].item()
    rc, stdout, err = run(capsys, "--study", study, "--trial", trial, inputs["colour"], "--out", tmp_path / "gs")
    assert rc == 0 and f"trial {trial} " in stdout, err
    out = np.asarray(Image.open(tmp_path / "gs" / "astronaut.png").convert("RGB")).astype(int)
    assert out.shape[:2] == Image.open(inputs["colour"]).size[::-1]
    # One tiny epoch from its grayscale start: a little colour, no more (the plain RGB trial is far off gray).
    spread = (out.max(axis=2) - out.min(axis=2)).mean()
    assert 0 < spread < 20


# ---------------------------------------------------------------- which trial, and whether to trust it


def edited_study(study: Path, target: Path, edit) -> Path:
    """A copy of the study (checkpoints included) whose trials table is ``edit(table)``."""
    shutil.copytree(study, target)
    write_trials(target, edit(trials(target)))
    return target


def test_only_done_trials_unless_named(study, inputs, tmp_path, capsys):
    table = trials(study)
    ranked = table.sort_values("best_val_psnr", ascending=False)["trial_id"].tolist()
    best, second = ranked[0], ranked[1]

    def best_pruned(t):
        return t.assign(status=np.where(t["trial_id"] == best, "PRUNED", "DONE"))
    mixed = edited_study(study, tmp_path / "mixed", best_pruned)
    rc, stdout, err = run(capsys, "--study", mixed, inputs["colour"], "--out", tmp_path / "o1")
    assert rc == 0 and f"trial {second} (DONE" in stdout, err   # the better PRUNED trial is passed over
    rc, stdout, err = run(capsys, "--study", mixed, "--trial", best, inputs["colour"], "--out", tmp_path / "o2")
    assert rc == 0 and f"trial {best} (PRUNED" in stdout, err    # named: used whatever its status

    def none_done(t):
        return t.assign(status=np.where(t["trial_id"] == best, "PRUNED", "RUNNING"))
    unfinished = edited_study(study, tmp_path / "unfinished", none_done)
    rc, stdout, err = run(capsys, "--study", unfinished, inputs["colour"], "--out", tmp_path / "o3")
    assert rc == 2 and "wrote" not in stdout and not (tmp_path / "o3").exists()
    assert "has finished (DONE)" in err and "1 PRUNED, 2 RUNNING" in err and f"--trial {best}" in err, err
    # The real command line: one error line, status 2, no traceback.
    p = subprocess.run([PYTHON, "-m", "study.colorize", "--study", str(unfinished), str(inputs["colour"]), "--out",
                        str(tmp_path / "o4")], capture_output=True, text=True, env=python_env(), timeout=300)
    assert p.returncode == 2 and p.stderr.startswith("error: no trial of study") and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_warns_when_the_trial_does_not_beat_grayscale(study, inputs, tmp_path, capsys):
    from study.results.contract import gain
    table = trials(study)
    # The real one-epoch trials, as recorded: a warning exactly for those whose gain is not positive.
    for _, row in table.iterrows():
        _, _, err = run(capsys, "--study", study, "--trial", row["trial_id"], inputs["colour"], "--out",
                        tmp_path / row["trial_id"])
        assert ("does not beat its grayscale input" in err) == (gain(row) <= 0), (row["trial_id"], gain(row), err)
    uv = table[table["output"] == "uv"]["trial_id"].item()
    for shift, warned in ((+1.0, False), (0.0, True), (-0.5, True)):
        def edit(t, shift=shift):
            return t.assign(best_val_psnr=t["val_gray_psnr"] + shift)
        folder = edited_study(study, tmp_path / f"shift{shift}", edit)
        rc, stdout, err = run(capsys, "--study", folder, "--trial", uv, inputs["colour"], "--out", tmp_path / "o")
        assert rc == 0 and "wrote" in stdout
        assert ("warning: trial" in err and f"{shift:+.2f} dB from the grayscale" in err) == warned, err


def test_warns_about_photos_far_from_the_training_size(study, inputs, tmp_path, capsys):
    big, tiny = tmp_path / "big.png", tmp_path / "tiny.png"
    Image.fromarray(skdata.astronaut()).resize((300, 200)).save(big)   # 200 px > 4 x 32 px
    Image.fromarray(skdata.astronaut()).resize((7, 6)).save(tiny)      # 7 px < 32 / 4 px
    rc, _, err = run(capsys, "--study", study, big, tiny, inputs["colour"], "--out", tmp_path / "o")
    assert rc == 0
    lines = [line for line in err.splitlines() if "x32 px samples images" in line]
    assert len(lines) == 2 and "1 of 3 inputs are over 4x larger" in lines[0] and "big.png 300x200" in lines[0]
    assert "1 of 3 inputs are over 4x smaller" in lines[1] and "tiny.png 7x6" in lines[1]
    assert "astronaut.png" not in err   # 50x37 is near 32x32
    rc, _, err = run(capsys, "--study", study, inputs["colour"], "--out", tmp_path / "o2")
    assert rc == 0 and "x32 px" not in err


# ---------------------------------------------------------------- format and metadata


@functools.cache
def srgb_profile() -> bytes:
    """One sRGB profile (each one made records its creation time)."""
    from PIL import ImageCms
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def camera_exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x010F] = "TestMaker"          # Make
    exif[0x0110] = "TestCam 1"          # Model
    exif[0x0112] = orientation          # Orientation
    return exif


def test_output_keeps_format_exif_and_icc(study, tmp_path, capsys):
    from PIL import JpegImagePlugin
    photos = tmp_path / "photos"
    photos.mkdir()
    pixels = Image.fromarray(skdata.astronaut()).resize((60, 40))
    # A phone photo stored sideways: orientation 6 (turn 90 degrees clockwise to view).
    pixels.save(photos / "phone.jpg", quality=90, exif=camera_exif(6), icc_profile=srgb_profile())
    pixels.convert("L").save(photos / "scan.png", exif=camera_exif(1), icc_profile=srgb_profile())
    rc, stdout, err = run(capsys, "--study", study, photos, "--out", tmp_path / "out", "--side-by-side")
    assert rc == 0, err
    jpg, png = Image.open(tmp_path / "out/phone.jpg"), Image.open(tmp_path / "out/scan.png")
    assert jpg.format == "JPEG" and png.format == "PNG"
    assert jpg.size == (40, 60)   # stored upright ...
    assert 0x0112 not in jpg.getexif()   # ... so no orientation that would turn it again
    for out in (jpg, png):
        exif = out.getexif()
        assert (exif[0x010F], exif[0x0110]) == ("TestMaker", "TestCam 1")
        assert out.info["icc_profile"] == srgb_profile()
    # High quality: 4:4:4 chroma (the model's whole contribution) and fine quantisation (quality 95's luminance
    # steps are 1-12; Pillow's default quality 75 goes up to 60).
    assert JpegImagePlugin.get_sampling(jpg) == 0 and max(jpg.quantization[0]) <= 12
    side = Image.open(tmp_path / "out/phone_side_by_side.jpg")
    assert side.format == "JPEG" and side.size == (80, 60) and side.info["icc_profile"] == srgb_profile()


def test_format_option_and_what_a_format_cannot_keep(study, inputs, tmp_path, capsys):
    from PIL import ImageCms
    photo = tmp_path / "photo.jpg"
    Image.fromarray(skdata.astronaut()).resize((50, 37)).save(photo, exif=camera_exif(1))
    rc, stdout, err = run(capsys, "--study", study, photo, inputs["rgba"], "--format", "jpeg", "--out", tmp_path / "j")
    assert rc == 0, err
    assert Image.open(tmp_path / "j/photo.jpg").format == "JPEG"
    converted = Image.open(tmp_path / "j/chelsea_alpha.jpg")
    assert converted.format == "JPEG" and converted.mode == "RGB"
    assert "chelsea_alpha.png: JPEG has no transparency" in err
    rc, _, err = run(capsys, "--study", study, photo, "--format", "png", "--out", tmp_path / "p")
    assert rc == 0 and Image.open(tmp_path / "p/photo.png").format == "PNG"
    assert Image.open(tmp_path / "p/photo.png").getexif()[0x010F] == "TestMaker"
    # A profile for another colour space cannot describe RGB pixels: left out, and said.
    lab = tmp_path / "lab.png"
    Image.fromarray(skdata.astronaut()).resize((50, 37)).save(
        lab, icc_profile=ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes())
    rc, _, err = run(capsys, "--study", study, lab, "--out", tmp_path / "l")
    assert rc == 0 and "icc_profile" not in Image.open(tmp_path / "l/lab.png").info
    assert "ICC profile is for Lab data" in err
    p = subprocess.run([PYTHON, "-m", "study.colorize", "--study", str(study), str(photo), "--format", "gif",
                        "--out", str(tmp_path / "g")], capture_output=True, text=True, env=python_env(), timeout=120)
    assert p.returncode == 2 and "invalid choice: 'gif'" in p.stderr and not (tmp_path / "g").exists()


def test_every_option_has_help_with_its_choices_and_default():
    from study.colorize import parser
    p = subprocess.run([PYTHON, "-m", "study.colorize", "--help"], capture_output=True, text=True,
                       env=python_env(), timeout=120)
    assert p.returncode == 0
    text = " ".join(p.stdout.split())
    for action in parser()._actions:
        if action.dest == "help":
            continue
        assert action.help, action.dest
        help_text = " ".join(action.help.split())
        assert help_text in text, action.dest
        if action.option_strings:
            assert "(default:" in help_text or "(required)" in help_text, action.dest
        for choice in action.choices or ():
            assert choice in help_text, (action.dest, choice)
