"""One screen about a study, running or not: ``python -m study.info <study folder or s3:// URL> [--json]``.

Its space and the space file's hash, the rule on grayscale photos, trials by status, the best
trials with their gain over the grayscale input, time spent and budget left, the driver that holds
it, and ready-to-paste commands with absolute paths (``--resume``, ``optuna-dashboard``,
``tensorboard``, ``analysis``, ``colorize``). The time and budget come from ``status.json``, which
a running driver keeps current; an older study without one is timed from its trials table. Reads
only: nothing is written, nothing is locked. ``--json`` prints the same facts for scripts.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import shlex
import sys
import time
from pathlib import Path

from study import cli
from study.cli import UsageError

STATUS_FILE = "status.json"
BEST_SHOWN = 5
# <study>/spaces/<sha256[:12]>/<space>.yaml: the space file as the study started, and as each resume that
# changed it found it; named as the space, since a resume checks the file's name against the study's space.
SPACE_COPIES = "spaces"


def under(root: str, sub: str) -> str:
    """``root/sub`` for a folder or a URI whose query string must stay at the end."""
    base, q, query = root.partition("?")
    return f"{base.rstrip('/')}/{sub}" + (f"?{query}" if q else "")


def space_copy(root: str, sha256: str, name: str) -> str:
    """Where the study at ``root`` keeps its space file ``name`` whose contents hash to ``sha256``."""
    return under(root, f"{SPACE_COPIES}/{sha256[:12]}/{name}.yaml")


def keep_space_copy(root: str, path: Path, sha256: str, name: str) -> None:
    """Copy the space file at ``path`` into the study (a local folder or an object store): a resume command
    can name it after the file it was given is gone (a Ray job's working directory, an edited file)."""
    from study.results import resolve

    fs, where = resolve(space_copy(root, sha256, name))
    fs.create_dir(where.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(where) as out:
        out.write(Path(path).read_bytes())


def local_space_file(space: str) -> str:
    """``--space`` as study.space.load_space takes it: a study's copy on an object store (s3://..., from its
    resume command) fetched into a temporary folder under its own name; a name or a local file as given."""
    if "://" not in space:
        return space
    import atexit
    import shutil
    import tempfile

    from study.driver import masked
    from study.results import resolve

    try:
        fs, where = resolve(space)
        with fs.open_input_stream(where) as f:
            data = f.read()
    except (OSError, ValueError) as e:
        raise UsageError(f"--space {masked(space)}: cannot be read ({_first_line(e)}); give a shipped space's "
                         f"name, a .yaml file or a study's copy of its space that exists") from None
    folder = tempfile.mkdtemp(prefix="space-")
    atexit.register(shutil.rmtree, folder, True)
    path = Path(folder) / where.rsplit("/", 1)[-1]
    path.write_bytes(data)
    return str(path)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def current_space_sha(meta: dict) -> str | None:
    """The hash of the space file the study's last run drew from."""
    changes = meta.get("space_changes") or []
    return changes[-1].get("sha256") if changes else meta.get("space_sha256")


def space_argument(root: str, meta: dict) -> str:
    """The ``--space`` that resumes the study as it last ran (``given_space``), else its space's name."""
    return given_space(root, meta) or meta.get("space")


def given_space(root: str, meta: dict) -> str | None:
    """The study's space as a user can give it again, as it last ran: the shipped space's name while
    search_spaces/<space>.yaml is the file it ran, else the study's own copy while it is there, else (a study
    from before copies were kept) the file it recorded while it is there, unchanged and not temporary.
    None: none of those (never a path that no longer exists)."""
    import pyarrow.fs as pafs

    from study.results import resolve
    from study.space import SPACES_DIR

    name, sha = meta.get("space"), current_space_sha(meta)
    shipped = SPACES_DIR / f"{name}.yaml" if isinstance(name, str) and name else None
    if sha and shipped is not None and shipped.is_file() and _sha256(shipped) == sha:
        return name
    if sha and shipped is not None:
        copy = space_copy(root, sha, name)
        try:
            fs, where = resolve(copy)
            if fs.get_file_info(where).type == pafs.FileType.File:
                return copy
        except (OSError, ValueError):   # the storage cannot say: the copy is not known to be there
            pass
    return _lasting_file(meta.get("space_file"), sha)


# The folder Ray unpacks a job's working directory into: a file there is gone once the job ends.
RAY_JOB_COPY = "_ray_pkg_"


def _lasting_file(recorded, sha: str | None) -> str | None:
    """A recorded space file's absolute path while it is there with the contents the study ran (any, for a
    study that recorded no hash), and not in a Ray job's temporary working directory; else None."""
    if not isinstance(recorded, str) or not recorded.strip():
        return None
    path = Path(recorded).expanduser().resolve()   # a relative one: from the folder the command runs in
    if any(part.startswith(RAY_JOB_COPY) for part in path.parts):
        return None
    try:
        if not path.is_file() or (sha and _sha256(path) != sha):
            return None
    except OSError:
        return None
    return str(path)


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _read_json(root: str, name: str, required: bool) -> dict | None:
    from study.results import read_json

    try:
        data = read_json(root, name)
    except (ValueError, OSError) as e:   # not JSON, or the storage failed
        if not required:
            return None   # status.json is a convenience: a half-written one is no reason to fail
        raise UsageError(f"{root}/{name} cannot be read ({e}); restore it from a copy") from None
    if data is not None and not isinstance(data, dict):
        if not required:
            return None
        raise UsageError(f"{root}/{name} is not a JSON object; restore it from a copy")
    return data


def _root(study: str) -> str:
    """The study's location: a local folder, or a URL pyarrow opens (the storage rule of study.run, probed
    read-only with a timeout)."""
    from study.driver import check_storage, check_storage_url

    if check_storage_url(study, "study") != "local":
        root = study.rstrip("/")
        check_storage(root, root, write=False, option="study")
        return root
    path = Path(study).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise UsageError(f"{study}: is a file, not a folder; give a study folder (<storage>/<name>, e.g. "
                         f"studies/smoke) or an s3:// URL")
    if not path.is_dir():
        raise UsageError(f"{study}: no such folder; give a study folder (<storage>/<name>, e.g. studies/smoke) "
                         f"or an s3:// URL")
    return str(path)


def _not_a_study(root: str) -> UsageError:
    hint = ""
    if "://" not in root:
        inside = sorted(p.parent.name for p in Path(root).glob("*/study.json"))[:5]
        if inside:
            hint = f"; studies in it: {', '.join(inside)} (e.g. {Path(root) / inside[0]})"
    return UsageError(f"{root} is not a study: it has no study.json{hint}")


def _parent(root: str) -> str:
    """The storage a study lives in (``--storage`` of its --resume command)."""
    base, q, query = root.partition("?")
    return base.rstrip("/").rsplit("/", 1)[0] + (f"?{query}" if q else "")


def _num(d: dict, key: str) -> float | None:
    v = d.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def facts(study: str, now: float | None = None) -> dict:
    """Everything ``study.info`` shows, as plain JSON-ready values."""
    from study.driver import LOCK_FILE, describe, holder, stale_reason
    from study.results import STATUSES, best_trials, gain, read_table

    now = time.time() if now is None else now
    root = _root(study)
    meta = _read_json(root, "study.json", required=True)
    if meta is None:
        raise _not_a_study(root)
    status = _read_json(root, STATUS_FILE, required=False) or {}
    trials = read_table(root, "trials")   # ResultsReadError names the file
    out: dict = {"study": root, "name": meta.get("name"), "space": meta.get("space"),
                 "space_file": meta.get("space_file"), "space_given": given_space(root, meta),
                 "space_sha256": meta.get("space_sha256"),
                 "space_changes": meta.get("space_changes", []), "grayscale": meta.get("grayscale", "kept"),
                 "created": meta.get("created"), "pack": meta.get("pack", 1)}

    # Trials by status: the contract's statuses first, then whatever else the table holds.
    counts = {} if trials is None else trials["status"].fillna("?").value_counts().to_dict()
    out["counts"] = {s: int(counts.pop(s, 0)) for s in STATUSES} | {str(s): int(n) for s, n in counts.items()}
    # study.json's total: each run rewrites it as it starts (--resume --num-samples may raise it), while
    # status.json may be from a run before.
    total = meta.get("num_samples") if isinstance(meta.get("num_samples"), int) else status.get("total")
    out["total"], out["trials"] = total, 0 if trials is None else len(trials)

    best = best_trials(trials, by=["dataset", "output"]) if trials is not None else None
    out["best"] = []
    if best is not None and not best.empty:
        best = best.assign(gain_db=gain(best)).sort_values("gain_db", ascending=False, kind="stable")
        for _, r in best.head(BEST_SHOWN).iterrows():
            out["best"].append({k: _plain(r.get(k)) for k in ("trial_id", "dataset", "output", "status",
                                                              "best_val_psnr", "val_gray_psnr", "gain_db",
                                                              "best_epoch", "epochs_run")})

    out["time"] = _time(status, trials, now)
    out["driver"], out["stale_lock"] = None, None
    record = holder(root)
    if record is not None:
        out["driver"] = {"host": record.get("host"), "pid": record.get("pid"), "started_at": record.get("started_at"),
                         "heartbeat_age_s": round(now - float(record.get("heartbeat", now)), 1),
                         "text": describe(record, now)}
    else:
        stale = _read_json(root, LOCK_FILE, required=False)
        if stale:
            out["stale_lock"] = {"reason": stale_reason(stale), "text": describe(stale, now)}
    out["state"] = _state(out, status)
    out["commands"], out["resume_note"] = _commands(root, meta, out)
    return out


def _plain(v):
    if v is None:
        return None
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    try:
        import pandas as pd
        if pd.isna(v):
            return None
    except (TypeError, ValueError):
        pass
    return v


def _time(status: dict, trials, now: float) -> dict:
    if status:
        t = {k: _num(status, k) for k in ("elapsed_s", "budget_s", "budget_left_s", "projected_finish",
                                           "model_images_per_s", "updated")}
        t["source"] = STATUS_FILE
        return t
    t = {"source": "trials table", "elapsed_s": None, "budget_s": None, "budget_left_s": None,
         "projected_finish": None, "model_images_per_s": None, "updated": None}
    if trials is not None and not trials.empty:
        wall = trials["wall_time_s"].dropna()
        t["trial_time_s"] = float(wall.sum()) if len(wall) else None
        starts, ends = trials["started_at"].dropna(), trials["finished_at"].dropna()
        if len(starts):
            end = ends.max().timestamp() if len(ends) else now
            if (trials["status"] == "RUNNING").any():
                end = max(end, now)
            # From the first start to the last end: includes any time the study was down.
            t["span_s"] = max(end - starts.min().timestamp(), 0.0)
    return t


def _state(out: dict, status: dict) -> str:
    if out["driver"]:
        return "running"
    if out["stale_lock"]:
        return "stopped (its driver is gone)"
    recorded = status.get("state")
    if recorded in ("finished", "stopped", "budget"):
        return {"budget": "stopped by its time budget"}.get(recorded, recorded)
    c = out["counts"]
    done = c.get("DONE", 0) + c.get("PRUNED", 0) + c.get("ERROR", 0)
    if out["total"] and done >= out["total"]:
        return "finished"
    return "not running"


def _commands(root: str, meta: dict, out: dict) -> tuple[dict, str | None]:
    """The ready-to-paste commands, and what to know of the resume command (None: nothing)."""
    from study.driver import masked, resume_command, runtime_url

    q = shlex.quote
    more, note = None, None
    ended = sum(out["counts"].get(s, 0) for s in ("DONE", "PRUNED", "ERROR"))
    if out["state"] == "finished" or (out["total"] and ended >= out["total"]):
        # A finished study's --resume has nothing to run: only a larger total gives it more trials.
        have = max(out["total"] or 0, ended)
        more = 2 * max(have, 1)
        note = (f"the study has run all its {have} trials: --resume runs more only with a larger --num-samples "
                f"(the command asks for {more}; any number above {have} will do)")
    name = meta.get("name") or root.rstrip("/").rsplit("/", 1)[-1]
    cmds = {"resume": resume_command(root, _parent(root), name, space_argument(root, meta), None, more)}
    try:
        url = runtime_url(meta.get("optuna_storage", ""), root, None)
        cmds["optuna_dashboard"] = f"optuna-dashboard {q(masked(url))}"
    except UsageError:   # a relative SQLite path on an object store: no file to point at
        cmds["optuna_dashboard"] = None
    cmds["tensorboard"] = f"tensorboard --logdir {q(root)}"
    cmds["analysis"] = f"python -m analysis --study {q(root)} --out report/"
    cmds["colorize"] = f"python -m study.colorize --study {q(root)} photos/ --out colorized/"
    return cmds, note


# ---------------------------------------------------------------- text


def _dur(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = max(0, int(round(seconds)))
    d, h, m = s // 86400, s % 86400 // 3600, s % 3600 // 60
    return f"{d}d{h:02d}h" if d else f"{h}h{m:02d}m" if h else f"{m}m{s % 60:02d}s" if m else f"{s}s"


def _clock(t: float | None) -> str:
    return "?" if t is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def _space_text(f: dict) -> str:
    """The study's space as ``--space`` can give it again (study.json's ``space_file`` may be a path that is gone:
    a Ray job's temporary copy, a file since moved)."""
    given = f.get("space_given")
    if given is None:
        return (f"{f['space']}, whose file as the study ran it is gone (the study keeps no copy of it: a resume "
                f"needs that file back)")
    return f"{f['space']} (shipped)" if given == f["space"] else f"{f['space']} from {given}"


def text(f: dict) -> str:
    lines = [f"study {f['name']} at {f['study']}"]
    sha = (f["space_sha256"] or "?")[:12]
    changes = f" (edited {len(f['space_changes'])} time(s) since it started)" if f["space_changes"] else ""
    lines.append(f"  space: {_space_text(f)} (sha256 {sha}...){changes}")
    lines.append(f"  grayscale photos: {f['grayscale']} {'of every split' if f['grayscale'] != 'kept' else '(kept)'}")
    state = f["state"]
    if f["driver"]:
        state += f": {f['driver']['text']}"
    elif f["stale_lock"]:
        state += f": stale lock, {f['stale_lock']['reason']}; {f['stale_lock']['text']}"
    lines.append(f"  state: {state}")
    shown = ", ".join(f"{n} {s}" for s, n in f["counts"].items() if n)
    lines.append(f"  trials: {f['trials']} of {f['total'] if f['total'] is not None else '?'}"
                 + (f" ({shown})" if shown else ""))
    t = f["time"]
    if t["source"] == STATUS_FILE:
        spent = f"{_dur(t['elapsed_s'])} of running time"
        if t["budget_s"] is not None:
            spent += f"; budget {_dur(t['budget_s'])}, {_dur(t['budget_left_s'])} left"
        if t["projected_finish"] is not None:
            spent += f"; projected finish {_clock(t['projected_finish'])}"
        if t["model_images_per_s"] is not None:
            spent += f"; {t['model_images_per_s']:.0f} model-images/s"
        spent += f" (status.json of {_clock(t['updated'])})"
    elif t.get("span_s") is not None:
        spent = (f"{_dur(t['span_s'])} from the first trial's start to the last end (downtime included); "
                 f"{_dur(t.get('trial_time_s'))} in trials; no budget recorded")
    else:
        spent = "no trial has started"
    lines.append(f"  time: {spent}")
    if f["best"]:
        lines.append("  best trials (val PSNR, gain over the grayscale input):")
        for b in f["best"]:
            gain = "?" if b["gain_db"] is None else f"{b['gain_db']:+.2f} dB"
            psnr = "?" if b["best_val_psnr"] is None else f"{b['best_val_psnr']:.2f} dB"
            lines.append(f"    {b['trial_id']}  {b['dataset']} {b['output']}  {b['status']}  {psnr}  {gain}")
    else:
        lines.append("  best trials: none has finished an epoch")
    lines.append("commands:")
    for name, cmd in f["commands"].items():
        if cmd:
            lines.append(f"  {name.replace('_', '-') + ':':<18}{cmd}")
    if f.get("resume_note"):
        lines.append(f"note: {f['resume_note']}")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m study.info", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", help="a study folder (<storage>/<name>) or its URL (s3://bucket/prefix/name)")
    p.add_argument("--json", action="store_true", help="print the same facts as JSON")
    cli.add_debug(p)
    return p


def _main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    f = facts(args.study)
    print(json.dumps(f, indent=1, default=str) if args.json else text(f))
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
