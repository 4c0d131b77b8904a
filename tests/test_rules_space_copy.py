"""A study carries its space: the file as it started and as each resume that changed it found it, in the
study folder (local or on an object store), and every resume command names the shipped space while it is
unchanged, else the study's copy, never a path that may be gone (a Ray job's working directory)."""
from __future__ import annotations

import hashlib
import json
import shlex
import shutil
import subprocess
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import yaml
from conftest import PYTHON, python_env
from test_cluster import BUCKET, s3  # noqa: F401 - the moto S3 fixture

from study.cli import UsageError
from study.driver.stopping import resume_command
from study.info import current_space_sha, local_space_file, space_argument, space_copy
from study.run import Study, record_start, space_hash
from study.space import SPACES_DIR
from study.space.parse import load_space


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def study(root: str, space_path: Path, meta: dict | None) -> Study:
    space = load_space(str(space_path))
    changed = meta is not None and meta.get("space_sha256") != space_hash(space.path)
    return Study(args=None, space=space, name=space.name, root=root, meta=meta, space_changed=changed, clock=None,
                 budget={}, data_root=None, cache_dir="", address=None, resources={})


def start(root: str, space_path: Path, meta: dict | None = None) -> dict:
    """record_start as study.run calls it (a new study: the study.json study.run makes); study.json after."""
    from study.results import read_json

    s = study(root, space_path, meta)
    record_start(s, dict(meta) if meta else {"name": s.name, "space": s.space.name, "space_sha256": sha(space_path),
                                             "space_file": str(space_path), "num_samples": 6})
    return read_json(root, "study.json")


def test_each_file_a_study_ran_is_kept_and_resume_names_the_last(tmp_path):
    own = tmp_path / "work" / "tiny.yaml"   # a space of one's own, as a Ray job's temporary copy would be
    own.parent.mkdir()
    own.write_text((SPACES_DIR / "smoke.yaml").read_text())
    root = str(tmp_path / "studies" / "tiny")
    steps = [  # (what the file holds at this run, the hashes recorded in space_changes after it)
        ("as started", []),
        ("edited", ["edited"]),
        ("edited", ["edited"]),                 # the same edit again: no new entry
        ("as started", ["edited", "as started"]),   # put back: the study now draws from the first file again
    ]
    original = own.read_text()
    texts = {"as started": original, "edited": original.replace("num_samples: 6", "num_samples: 7")}
    meta = None
    for text, changes in steps:
        own.write_text(texts[text])
        meta = start(root, own, meta)
        assert [c["sha256"] for c in meta.get("space_changes", [])] == [sha_of(t, texts) for t in changes]
        assert current_space_sha(meta) == sha(own)
        copy = Path(space_copy(root, sha(own), "tiny"))
        assert copy.read_text() == texts[text] and copy.name == "tiny.yaml"   # the name a resume checks
        # The file given is gone (a job's working directory): the resume command names the study's copy.
        shutil.move(own, own.with_suffix(".away"))
        cmd = shlex.split(resume_command(root, str(tmp_path / "studies"), "tiny", space_argument(root, meta), None))
        assert cmd[cmd.index("--space") + 1] == str(copy)
        assert load_space(cmd[cmd.index("--space") + 1]).name == meta["space"]
        shutil.move(own.with_suffix(".away"), own)
    assert len(list(Path(root, "spaces").iterdir())) == 2   # one copy per distinct file


def sha_of(label: str, texts: dict) -> str:
    return hashlib.sha256(texts[label].encode()).hexdigest()


@pytest.mark.parametrize("shipped, sha_is, copy, recorded, expect", [
    # A shipped space unchanged: its name, runnable anywhere the project is.
    ("smoke", "shipped", False, "/tmp/_ray_pkg_1/search_spaces/smoke.yaml", "name"),
    ("smoke", "shipped", True, None, "name"),
    # The study ran another file than the shipped one: its copy.
    ("smoke", "other", True, "/tmp/_ray_pkg_1/search_spaces/smoke.yaml", "copy"),
    ("tiny", "other", True, None, "copy"),
    # A study from before copies were kept: the file it recorded while it is there, never a job's temporary one.
    ("tiny", "other", False, "EXISTING", "recorded"),
    ("tiny", "other", False, "/tmp/_ray_pkg_1/search_spaces/tiny.yaml", "name"),
    ("smoke", "other", False, "/nowhere/smoke.yaml", "name"),
])
def test_the_space_a_resume_command_names(tmp_path, shipped, sha_is, copy, recorded, expect):
    root = str(tmp_path / "st" / "x")
    text = (SPACES_DIR / "smoke.yaml").read_text()
    if sha_is == "other":
        text += "\n# edited\n"
    digest = hashlib.sha256(text.encode()).hexdigest()
    if copy:
        Path(space_copy(root, digest, shipped)).parent.mkdir(parents=True)
        Path(space_copy(root, digest, shipped)).write_text(text)
    if recorded == "EXISTING":
        recorded = str(tmp_path / f"{shipped}.yaml")
        Path(recorded).write_text(text)
    meta = {"space": shipped, "space_sha256": digest, "space_file": recorded}
    got = space_argument(root, meta)
    assert got == {"name": shipped, "copy": space_copy(root, digest, shipped), "recorded": recorded}[expect]


def test_a_finished_studys_resume_command_asks_for_more_trials(tmp_path):
    root = tmp_path / "st" / "smoke"
    meta = {"name": "smoke", "space": "smoke", "space_sha256": sha(SPACES_DIR / "smoke.yaml"), "num_samples": 2,
            "optuna_storage": "sqlite:///optuna.db", "optuna_study_name": "smoke", "grayscale": "kept"}
    root.mkdir(parents=True)
    (root / "study.json").write_text(json.dumps(meta))
    # An older run's status.json, from before --resume --num-samples raised the total to 2.
    (root / "status.json").write_text(json.dumps({"state": "finished", "total": 1, "counts": {"DONE": 1}}))
    p = subprocess.run([PYTHON, "-m", "study.info", str(root), "--json"], env=python_env(), capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    f = json.loads(p.stdout)
    assert f["total"] == 2   # study.json's total, not an older status.json's
    cmd = shlex.split(f["commands"]["resume"])
    assert cmd[cmd.index("--space") + 1] == "smoke" and cmd[cmd.index("--num-samples") + 1] == "4"
    assert "runs more only with a larger --num-samples" in f["resume_note"]


def test_a_study_on_an_object_store_keeps_its_copy_there_and_resumes_from_it(s3, tmp_path):  # noqa: F811
    root = f"s3://{BUCKET}/studies/tiny?{s3['query']}"
    own = tmp_path / "tiny.yaml"
    own.write_text((SPACES_DIR / "smoke.yaml").read_text() + "\n# mine\n")
    meta = start(root, own)
    url = space_argument(root, meta)
    assert url == space_copy(root, sha(own), "tiny") and url.startswith(f"s3://{BUCKET}/studies/tiny/spaces/")
    own.unlink()
    fetched = local_space_file(url)   # what study.run --space <url> loads
    assert Path(fetched).name == "tiny.yaml" and load_space(fetched).name == "tiny"
    assert hashlib.sha256(Path(fetched).read_bytes()).hexdigest() == meta["space_sha256"]
    fs = pafs.S3FileSystem(endpoint_override=s3["endpoint"].split("//")[1], scheme="http", region="us-east-1")
    assert fs.get_file_info(f"{BUCKET}/studies/tiny/study.json").type == pafs.FileType.File
    with pytest.raises(UsageError, match=r"--space s3://.*: cannot be read"):
        local_space_file(f"s3://{BUCKET}/studies/tiny/spaces/none/tiny.yaml?{s3['query']}")


def test_a_space_on_an_object_store_is_checked_by_submit_too(s3, tmp_path):  # noqa: F811
    from study.submit import run_args_checked
    s3["client"].put_object(Bucket=BUCKET, Key="spaces/tiny.yaml", Body=yaml.safe_dump(
        yaml.safe_load((SPACES_DIR / "smoke.yaml").read_text())).encode())
    args = run_args_checked(["--", "--space", f"s3://{BUCKET}/spaces/tiny.yaml?{s3['query']}",
                             "--storage", f"s3://{BUCKET}/studies?{s3['query']}"])
    assert args.space.startswith("s3://")


SPACE_LINE_CASES = {  # id: (space name, what the space file holds, a kept copy?, the recorded space_file, expect)
    "shipped, recorded in a vanished job copy": ("smoke", "shipped", False, "/tmp/_ray_pkg_9f/search_spaces/smoke.yaml",
                                                 "name"),
    "shipped, nothing recorded": ("smoke", "shipped", False, None, "name"),
    "own file that exists": ("tiny", "other", False, "EXISTING", "recorded"),
    "own file, given with ~": ("tiny", "other", False, "HOME", "recorded"),
    "own file edited since, no copy": ("tiny", "other", False, "EDITED", "gone"),
    "vanished job copy, copy kept": ("tiny", "other", True, "/tmp/_ray_pkg_9f/tiny.yaml", "copy"),
    "vanished job copy, no copy": ("tiny", "other", False, "/tmp/_ray_pkg_9f/tiny.yaml", "gone"),
    "job copy still there, no copy": ("tiny", "other", False, "RAY_PKG", "gone"),
    "relative path, there from here": ("tiny", "other", False, "RELATIVE", "recorded"),
    "relative path, not here": ("tiny", "other", False, "elsewhere/tiny.yaml", "gone"),
    "moved shipped space, copy kept": ("smoke", "other", True, "/gone/smoke.yaml", "copy"),
    "empty path": ("tiny", "other", False, "", "gone"),
    "a folder": ("tiny", "other", False, "FOLDER", "gone"),
    "not a string": ("tiny", "other", False, 42, "gone"),
}


@pytest.mark.parametrize("case", list(SPACE_LINE_CASES))
def test_info_shows_the_space_as_it_can_be_given_again(tmp_path, monkeypatch, case):
    """study.info's "space:" line names the shipped space, or a file that is there with the contents the study
    ran (its kept copy, or the file it recorded), never a path that is gone; with neither it says so."""
    from study import info

    name, holds, copy, recorded, expect = SPACE_LINE_CASES[case]
    root = tmp_path / "st" / "x"
    root.mkdir(parents=True)
    text = (SPACES_DIR / "smoke.yaml").read_text().replace("name: smoke", f"name: {name}")
    text += "" if holds == "shipped" else "\n# edited\n"
    digest = hashlib.sha256(text.encode()).hexdigest()
    if copy:
        Path(space_copy(str(root), digest, name)).parent.mkdir(parents=True)
        Path(space_copy(str(root), digest, name)).write_text(text)
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    if recorded in ("EXISTING", "EDITED", "RELATIVE", "HOME", "RAY_PKG", "FOLDER"):
        path = {"EXISTING": tmp_path / "mine" / f"{name}.yaml", "EDITED": tmp_path / "mine" / f"{name}.yaml",
                "RELATIVE": here / f"{name}.yaml", "HOME": tmp_path / "home" / f"{name}.yaml",
                "RAY_PKG": tmp_path / "ray" / "_ray_pkg_ab12" / f"{name}.yaml", "FOLDER": tmp_path / "mine"}[recorded]
        path.parent.mkdir(parents=True, exist_ok=True)
        if recorded == "FOLDER":
            path.mkdir(exist_ok=True)
        else:
            path.write_text(text + ("# and edited again\n" if recorded == "EDITED" else ""))
        recorded = {"RELATIVE": f"{name}.yaml", "HOME": f"~/{name}.yaml"}.get(recorded, str(path))
    meta = {"name": "x", "space": name, "space_sha256": digest, "space_file": recorded, "num_samples": 2,
            "optuna_storage": "sqlite:///optuna.db", "optuna_study_name": "x"}
    (root / "study.json").write_text(json.dumps(meta))

    f = info.facts(str(root))
    line = next(ln for ln in info.text(f).splitlines() if ln.startswith("  space: "))
    given = f["space_given"]
    if expect == "name":
        assert given == name and line.startswith(f"  space: {name} (shipped)"), line
    elif expect == "copy":
        assert given == space_copy(str(root), digest, name) and f" from {given} " in line, line
    elif expect == "recorded":
        assert Path(given).is_absolute() and Path(given).read_text() == text and f" from {given} " in line, line
    else:
        assert given is None and " from " not in line and "is gone" in line, line
    assert space_argument(str(root), meta) == (given or name)   # the resume command's --space
    # Whatever it names gives the study's space again: study.run --space loads it from any folder.
    if given is not None:
        monkeypatch.chdir(tmp_path)
        assert load_space(local_space_file(given)).name == name
