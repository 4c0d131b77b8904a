"""The one checkpoint format of trials and packs, when one is written, and where its folders live.

A member's state is one ``checkpoint.pt`` (study.engine.member.Member.state): ``"model"`` (the weights to use
for inference: the average when ema is on), ``"raw_model"`` (the trained weights, with ema), ``"config"``,
``"epoch"``, ``"history"``, ``"status"``, and what a resume continues from (``"optimizer"``,
``"scheduler"``, ``"generator"``, ``"rng"``, ``"updates"``, and with ``adversarial > 0`` ``"critic"``: the
discriminator's weights and Adam state, study.engine.adversarial). A classification head's bins are buffers of
``"model"`` (``classes.centers``, ``classes.prior``), so the weights rebuild alone. A single trial's checkpoint folder holds it
at its root (``TRIAL``); a pack's (``PACK``) holds ``member-<k>/checkpoint.pt`` for every member still training and ``pack.pt``,
the roster (each member's configuration, history and status, the epoch, the random generators).
Previews (``prediction_<index>.png``) sit beside each ``checkpoint.pt``.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from study.config import ConfigError

CHECKPOINT_FILE = "checkpoint.pt"
PACK_FILE = "pack.pt"
# A checkpoint (weights + Adam state) is written only when it matters: at the best epoch so far
# (what a study keeps), at the last epoch, and for resume at least every CHECKPOINT_EVERY epochs or
# CHECKPOINT_SECONDS of training, whichever comes first. Writing one every epoch cost up to ~6 GB per
# epoch for the widest Flowers models; this bounds what a crash re-runs to 5 epochs or 5 minutes.
CHECKPOINT_EVERY = 5
CHECKPOINT_SECONDS = 300.0

Report = Callable[[dict, "Path | None"], None]


def load_checkpoint(folder: Path | str, map_location="cpu") -> dict:
    # weights_only: a checkpoint never runs pickled code when loaded.
    return torch.load(Path(folder) / CHECKPOINT_FILE, map_location=map_location, weights_only=True)


@dataclass(frozen=True)
class Layout:
    """Where a run's files go in its checkpoint folder: a trial's (``TRIAL``: its checkpoint.pt and
    previews at the folder's root) or a pack's (``PACK``: ``member-<k>/`` for each member still training,
    and pack.pt with every member's roster entry)."""
    members_apart: bool

    def member_folder(self, folder: Path, index: int) -> Path:
        """Where member ``index``'s checkpoint and previews go."""
        if not self.members_apart:
            return folder
        sub = folder / f"member-{index}"
        sub.mkdir(exist_ok=True)
        return sub

    def save(self, folder: Path, files: dict[int, tuple[dict, dict[str, bytes]]], roster: list[dict], epoch: int,
             device: torch.device) -> None:
        """Write ``files`` (member index -> (Member.state(), its preview PNGs)) into ``folder``, and a pack's
        ``roster`` (every member's Member.roster()) to pack.pt."""
        rng = rng_states(device)
        for index, (state, previews) in files.items():
            sub = self.member_folder(folder, index)
            torch.save({**state, "epoch": epoch, "rng": rng}, sub / CHECKPOINT_FILE)
            for name, data in previews.items():
                (sub / name).write_bytes(data)
        if self.members_apart:
            torch.save({"members": roster, "epoch": epoch, "rng": rng}, folder / PACK_FILE)


TRIAL, PACK = Layout(members_apart=False), Layout(members_apart=True)


def read_run(folder: Path | str, configs: list[dict], device: torch.device) -> tuple[int, dict | None, list[dict]]:
    """(epoch, random generator states, each member's state) from a checkpoint folder of either layout.

    Members that had left the pack have only their roster entry; a trial checkpoint written before packs
    shared its format loads as it is (it lacks only ``"status"`` and ``"updates"``), and so does a pack.pt
    that held every member's whole state."""
    folder = Path(folder)
    if not (folder / PACK_FILE).exists():
        if len(configs) != 1:
            raise ConfigError(f"{folder} holds one trial's checkpoint, not a pack's ({PACK_FILE}); resume it "
                              f"as the trial it is")
        state = load_checkpoint(folder, device)
        return state["epoch"], state.get("rng"), [state]
    pack = torch.load(folder / PACK_FILE, map_location=device, weights_only=True)
    if [m["config"] for m in pack["members"]] != configs:
        raise ConfigError(f"{folder / PACK_FILE} holds a different pack; resume it with "
                          f"the configurations it was started with")
    states = []
    for k, entry in enumerate(pack["members"]):
        if entry["status"] == "active" and "optimizer" not in entry:
            entry = load_checkpoint(folder / f"member-{k}", device)
        states.append(entry)
    return pack["epoch"], pack["rng"], states


def checkpoint_due(epoch: int, epochs: int, is_best: bool, last_epoch: int, last_time: float) -> bool:
    """Whether ``epoch`` writes a checkpoint (see CHECKPOINT_EVERY)."""
    return (is_best or epoch >= epochs or epoch - last_epoch >= CHECKPOINT_EVERY
            or time.monotonic() - last_time >= CHECKPOINT_SECONDS)


def rng_states(device: torch.device) -> dict:
    # Dropout draws from the global generators: saved so a resumed run repeats them.
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states: dict | None, device: torch.device) -> None:
    if not states:
        return
    torch.set_rng_state(states["cpu"].cpu())
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"].cpu(), device)


# ---------------------------------------------------------------- temporary folders


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process, or a platform without signal 0: leave its folder alone
    return True


def sweep_stale_checkpoints(work_dir: Path) -> None:
    """Remove temporary checkpoint folders (``.ckpt-<epoch>-<pid>-*``) whose process is gone: a killed
    trial cannot run its ``finally``, so the next run in the same folder (a restarted trial) cleans up."""
    for folder in work_dir.glob(".ckpt-*-*-*"):
        try:
            pid = int(folder.name.split("-")[2])
        except ValueError:
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(folder, ignore_errors=True)


def checkpoint_folder(work_dir: Path, epoch: int) -> Path:
    """A new temporary checkpoint folder; its name carries the pid for sweep_stale_checkpoints."""
    return Path(tempfile.mkdtemp(prefix=f".ckpt-{epoch:03d}-{os.getpid()}-", dir=work_dir))


def keep_checkpoint(target: Path) -> Report:
    """A ``report`` for runs without Ray: the latest checkpoint folder is copied to ``target``."""
    def report(row: dict, folder: Path | None) -> None:
        if folder is None:
            return
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(folder, tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    return report
