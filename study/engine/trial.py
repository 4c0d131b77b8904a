"""Training trials: the one training loop, K members (a single trial is one) trained together epoch by
epoch, and its two entry points, ``run_trial`` and ``run_pack`` (study.engine.pack says what a pack's
members share).

A single trial is a pack of one: the same loop, loss, evaluation, checkpoint format and epoch rows serve
both; only the ``report`` contract and the checkpoint layout differ (study.engine.checkpoints.Layout: a
trial's checkpoint at the folder's root, a pack's per member). No Ray or Optuna here: ``report`` is how a
caller (the CLI, or the study's Ray trainable) receives each epoch's rows and, on the epochs that write
one, a checkpoint folder.

One host sync per epoch fetches every member's training loss and evaluations together; the steps
between make none: the members still training are one step (``PackStep``: their fused model, terms and
loss, their batches, one optimizer step of all of them, and the model an epoch's evaluation scores), which
keeps a GPU busy (colour constants are cached per device, augmentation offsets and losses stay on the
device).
"""
from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import torch

from study.config import TrialConfig
from study.engine.checkpoints import (
    PACK,
    TRIAL,
    Layout,
    Report,
    checkpoint_due,
    checkpoint_folder,
    read_run,
    set_rng_states,
    sweep_stale_checkpoints,
)
from study.engine.chroma import used_bins
from study.engine.data import DeviceImages, Splits, augment_batch, load_splits
from study.engine.device import compile_mode, device_name, pick_device, resolve_precision
from study.engine.evaluation import EvalSplit, eval_batch_size, evaluate_members, member_previews
from study.engine.fused import FusedUNet
from study.engine.losses import NonFiniteLossError, PackLoss, divergence
from study.engine.member import Member
from study.engine.pack import check_structure
from study.engine.terms import PackTerms
from study.results import best_row

# report(rows, folder) -> the member indices to stop (None: none)
RunReport = Callable[[dict, "Path | None"], "set[int] | None"]


@dataclass(frozen=True)
class RunOptions:
    """Where a run finds its data and device and keeps its checkpoints, and what it says along the way."""
    data_root: str | None = None
    cache_dir: str | Path | None = None
    device: str | torch.device | None = None
    resume_from: Path | str | None = None    # a checkpoint folder (either layout) to continue from
    splits: Splits | None = None             # the decoded splits, when the caller has them already
    work_dir: Path | str | None = None       # where temporary checkpoint folders go (default: the current one)
    log: Callable[[str], None] = print
    # Asked after each epoch; True writes a checkpoint whatever else is due (a study's time budget is spent).
    checkpoint_now: Callable[[], bool] | None = None


@dataclass
class TrialSetup:
    """What every run builds before training; everything in it is a pack's shared structure."""
    device: torch.device
    compile_mode: str | None
    precision: str
    work_dir: Path
    train: DeviceImages
    val: EvalSplit
    test: EvalSplit
    eval_batch: int
    steps_per_epoch: int
    bins: tuple[torch.Tensor, torch.Tensor] | None = None   # a classification head's (study.engine.chroma.used_bins)


def trial_splits(cfg: TrialConfig, data_root: str | None, cache_dir: str | Path | None) -> Splits:
    """The decoded splits ``cfg`` trains and is evaluated on (prepare_trial's, and a reused Ray actor's)."""
    return load_splits(cfg.dataset, cfg.image_size, data_root, cache_dir, cfg.train_limit, cfg.eval_limit)


def prepare_trial(cfg: TrialConfig, options: RunOptions) -> TrialSetup:
    """Device, precision and compile mode for ``cfg``, its data on the device, the evaluation splits'
    constants, and the work folder swept of killed runs' checkpoints."""
    dev = pick_device(options.device)
    mode = compile_mode()
    precision = resolve_precision(cfg, dev)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        # TF32 for fp32 convolutions and matmuls (PyTorch leaves matmuls at full fp32 by default).
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    work_dir = Path(options.work_dir) if options.work_dir is not None else Path.cwd()
    work_dir.mkdir(parents=True, exist_ok=True)  # e.g. study.trial's --out, made before its first checkpoint
    sweep_stale_checkpoints(work_dir)
    splits = options.splits or trial_splits(cfg, options.data_root, options.cache_dir)
    train, val, test = (DeviceImages(splits[s], dev) for s in ("train", "val", "test"))
    eval_batch = eval_batch_size(cfg)
    # The training split's UV bins: a strided sample of pixels, cheap enough to find at every start.
    bins = used_bins(train.images) if cfg.output == "uv-classes" else None
    return TrialSetup(dev, mode, precision, work_dir, train, EvalSplit.prepare(val, eval_batch),
                      EvalSplit.prepare(test, eval_batch), eval_batch, max(len(train) // cfg.batch_size, 1), bins)


def epoch_row(m: Member, epoch: int, fetched: list[float], setup: TrialSetup, seconds: float) -> dict:
    """Member ``m``'s row of ``epoch`` from its fetched (train loss, n val totals, n test totals: n = 4, or
    with a classification head's temperature curve more), added to its history with the best epoch so far;
    the curve is recorded for val and test (contract.CURVE_METRICS). A loss that is not finite ends the
    member: its row holds the ``"error"``."""
    n = (len(fetched) - 1) // 2
    v = setup.val.metrics(fetched[1:1 + n], curve=True)
    t = setup.test.metrics(fetched[1 + n:1 + 2 * n], curve=True)
    row = {"epoch": epoch, "train_loss": fetched[0], "lr": m.opt.param_groups[0]["lr"],
           **{f"val_{k}": x for k, x in v.items()}, **{f"test_{k}": x for k, x in t.items()},
           "seconds": seconds, "precision": setup.precision}
    m.history.append(row)
    best = best_row(m.history)
    row.update(best_val_psnr=best["val_psnr"], best_epoch=best["epoch"])
    if not math.isfinite(fetched[0]):
        # Its slice cannot touch the others (disjoint weights, per-channel BatchNorm): only it ends.
        row["error"] = str(divergence(fetched[0], epoch, m.cfg))
        m.status = "error"
    elif epoch >= m.cfg.epochs:
        m.status = "done"
    return dict(row)


def run_members(cfgs: list[TrialConfig], report: RunReport | None, options: RunOptions, layout: Layout) -> list[Member]:
    """Train ``cfgs`` (sharing study.engine.pack.STRUCTURE) together until each has run its epochs, diverged
    (its last row holds ``"error"``) or been stopped by ``report``; returns the members, with their histories.
    ``layout``: where a checkpoint folder's files go."""
    for c in cfgs:
        c.validate()
    run = _Run(cfgs, report, options, layout)
    active, step = [m for m in run.members if m.status == "active"], None
    while active:
        # Built again only when members leave: a pruned, finished or diverged member's slice costs nothing after.
        step = step or PackStep(active, run.setup.device, run.setup.precision, run.setup.compile_mode)
        rows, evaluated = run.train_epoch(step)
        stop = run.hand_over(step, evaluated, rows)
        for m in active:
            if m.index in stop and m.status == "active":
                m.status = "pruned"
        if any(m.status != "active" for m in active):
            active, step = [m for m in active if m.status == "active"], None
    return run.members


def run_trial(cfg: TrialConfig, report: Report | None = None, options: RunOptions | None = None,
              **fields) -> list[dict]:
    """Train ``cfg`` for ``cfg.epochs`` epochs (continuing from ``options.resume_from``); returns the epoch rows.

    ``fields``: RunOptions' fields as keywords, instead of or over ``options``. ``report(row, folder)`` is
    called once per epoch; ``folder`` is a temporary checkpoint folder under the work folder (default: the
    current one) on epochs that write one (see CHECKPOINT_EVERY), else None. The folder is removed once
    ``report`` returns, also on error. A trial whose training loss stops being finite raises
    NonFiniteLossError (``report`` does not see that epoch).
    """
    options = replace(options or RunOptions(), **fields)

    def each(rows: dict[int, dict], folder: Path | None) -> None:
        row = rows[0]
        if "error" in row:
            raise NonFiniteLossError(row["error"])
        if report is not None:
            report(row, folder)

    (member,) = run_members([cfg], each, options, TRIAL)
    return member.history


def run_pack(cfgs: list[TrialConfig], report: RunReport | None = None, options: RunOptions | None = None,
             **fields) -> list[list[dict]]:
    """Train the members of ``cfgs`` as one fused model; returns each member's epoch rows.

    ``fields``: RunOptions' fields as keywords, instead of or over ``options``. ``report(rows, folder)`` is
    called once per epoch with ``{member index: epoch row}`` for every member still in the pack and a
    temporary checkpoint folder under the work folder (or None on epochs that write none, see
    study.engine.checkpoints.checkpoint_due); it returns the member indices to stop (pruned). A member
    also leaves after its own ``epochs``, or with ``"error"`` in its row when its loss stops being finite.
    """
    for c in cfgs:
        c.validate()
    check_structure(cfgs)
    members = run_members(cfgs, report, replace(options or RunOptions(), **fields), PACK)
    return [m.history for m in members]


def summarize(history: list[dict]) -> dict:
    best = best_row(history)
    return {"best_epoch": best["epoch"], "best_val_psnr": best["val_psnr"], "best_test_psnr": best["test_psnr"],
            "gray_val_psnr": best["val_gray_psnr"], "epochs": len(history)}


class _Run:
    """A run's state between epochs: its setup, members, epoch and last checkpoint."""

    def __init__(self, cfgs: list[TrialConfig], report: RunReport | None, options: RunOptions, layout: Layout):
        self.report, self.options, self.layout = report, options, layout
        self.setup = setup = prepare_trial(cfgs[0], options)
        self.members = [Member(i, c, setup.device, setup.steps_per_epoch, setup.bins) for i, c in enumerate(cfgs)]
        self.epoch = 0
        what = "" if len(cfgs) == 1 else "pack "
        if options.resume_from:
            self.epoch, rng, states = read_run(options.resume_from, [c.to_dict() for c in cfgs], setup.device)
            for m, s in zip(self.members, states):
                m.load(s, self.epoch)
            set_rng_states(rng, setup.device)
            options.log(f"{what}resumed from {options.resume_from} after epoch {self.epoch}")
        else:
            on = "device" if len(cfgs) == 1 else f"pack of {len(cfgs)} on"
            options.log(f"{on} {device_name(setup.device)}, precision {setup.precision}, "
                        f"step {'compiled: ' + setup.compile_mode if setup.compile_mode else 'eager'}")
        self.saved_epoch, self.saved_at = self.epoch, time.monotonic()

    def train_epoch(self, step: PackStep) -> tuple[dict[int, dict], FusedUNet]:
        """One epoch of ``step``'s members: their rows and the model that was evaluated."""
        self.epoch += 1
        setup, t0 = self.setup, time.perf_counter()
        loss_sum = torch.zeros(len(step.members), device=setup.device, dtype=torch.float64)
        steps = 0
        for x in step.batches(setup.train, step.members[0].cfg.batch_size):
            loss_sum += step(x)
            steps += 1
        evaluated = step.evaluated()
        # Evaluation batches hold K predictions per image: keep their size near one trial's.
        per_eval = max(setup.eval_batch // len(step.members), 16)
        v_sums = evaluate_members(evaluated, step.terms, setup.val, per_eval, setup.precision)
        t_sums = evaluate_members(evaluated, step.terms, setup.test, per_eval, setup.precision)
        # The one sync of the epoch: every member's training loss and evaluation totals together.
        fetched = torch.cat([(loss_sum / max(steps, 1))[:, None], v_sums, t_sums], dim=1).tolist()
        seconds = time.perf_counter() - t0
        rows = {m.index: epoch_row(m, self.epoch, f, setup, seconds) for m, f in zip(step.members, fetched)}
        self.options.log(epoch_line(self.epoch, self.members, rows, setup.val, seconds))
        return rows, evaluated

    def hand_over(self, step: PackStep, evaluated: FusedUNet, rows: dict[int, dict]) -> set[int]:
        """Write a checkpoint folder when one is due (or a member left), give it and ``rows`` to ``report``,
        and remove it; returns the members ``report`` stops."""
        active = step.members
        due = (any(checkpoint_due(self.epoch, m.cfg.epochs, rows[m.index]["best_epoch"] == self.epoch,
                                  self.saved_epoch, self.saved_at) for m in active)
               or (self.options.checkpoint_now is not None and self.options.checkpoint_now()))
        folder = None
        try:
            if due or any(m.status != "active" for m in active):
                folder = checkpoint_folder(self.setup.work_dir, self.epoch)
                previews = member_previews(evaluated, step.terms, self.setup.test.images,
                                           active[0].cfg.preview_count, self.setup.precision)
                self.layout.save(folder, {m.index: (m.state(), p) for m, p in zip(active, previews)},
                                 [m.roster() for m in self.members], self.epoch, self.setup.device)
                self.saved_epoch, self.saved_at = self.epoch, time.monotonic()
            return (self.report(rows, folder) if self.report is not None else None) or set()
        finally:
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)


def epoch_line(epoch: int, members: list[Member], rows: dict[int, dict], val: EvalSplit, seconds: float) -> str:
    """The log line of an epoch of a run of ``members``: a lone member's figures in full, or each member's
    (still training) validation PSNR."""
    if len(members) == 1:
        r, cfg = next(iter(rows.values())), members[0].cfg
        return (f"epoch {epoch}/{cfg.epochs}  train {r['train_loss']:.4f}  val {r['val_loss']:.4f}  "
                f"test {r['test_loss']:.4f}  val PSNR {r['val_psnr']:.2f} dB (gray {r['val_gray_psnr']:.2f})  "
                f"SSIM {r['val_ssim']:.3f}  colour {r['val_colourfulness']:.2f}  {seconds:.1f}s")
    return (f"pack epoch {epoch}: " + "  ".join(
        f"[{i}] val PSNR {r['val_psnr']:.2f} dB" + (" ERROR" if "error" in r else "") for i, r in rows.items())
        + f"  (gray {val.gray_psnr:.2f})  {seconds:.1f}s")


# ---------------------------------------------------------------- the step


def train_batches(train: DeviceImages, members: list[Member], batch_size: int) -> Iterator[torch.Tensor]:
    """Per step, each member's batch stacked as (K, B, 3, H, W).

    Draws from each member's generator in the order DeviceImages.train_batches does (a permutation per
    epoch, then the augmentation's draws per batch), so a member sees exactly the batches its trial
    would see alone; one gather serves all.
    """
    n = len(train)
    perms = torch.stack([torch.randperm(n, device=train.device, generator=m.gen) for m in members])
    stop = max(n - batch_size + 1, 1) if n >= batch_size else 1
    for start in range(0, stop, batch_size):
        x = train.to_float(train.images[perms[:, start:start + batch_size]].flatten(0, 1))
        x = x.unflatten(0, (len(members), -1))
        if any(m.augment > 0 for m in members):
            x = torch.stack([augment_batch(x[k], m.gen, m.augment) if m.augment > 0 else x[k]
                             for k, m in enumerate(members)])
        yield x


class PackStep:
    """``members`` fused (study.engine.fused), their terms (study.engine.terms) and loss (study.engine.losses);
    built again when the membership changes (a compiled step recompiles then)."""

    def __init__(self, members: list[Member], device: torch.device, precision: str, mode: str | None = None):
        self.members = members
        self.fused = FusedUNet([m.model for m in members]).train()
        self.terms = PackTerms.of([m.cfg for m in members], self.fused.classes, device)
        self.loss = PackLoss(self.fused, self.terms, [m.critic for m in members], precision, mode)
        self._ones = torch.ones(len(members), device=device)   # d(sum of losses)/d(each member's loss)
        for k, m in enumerate(members):
            if m.average:   # it averages the statistics training updates, in the fused model's buffers
                m.average.follow(self.fused.live_buffers(k))

    def batches(self, train: DeviceImages, batch_size: int) -> Iterator[torch.Tensor]:
        return train_batches(train, self.members, batch_size)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """One optimizer step of every member on its own batch ``x[k]``; the (K,) losses, unsynced."""
        per_member = self.loss(x)
        for m in self.members:
            m.opt.zero_grad(set_to_none=True)
        # Members' parameters are disjoint: the gradient of their losses' sum is each one's own loss gradient.
        per_member.backward(self._ones)
        for m in self.members:
            m.opt.step()
            if m.sched is not None:
                m.sched.step()
            if m.average is not None:
                m.average.update()
        self.loss.after_step()
        self.fused.steps += 1
        return per_member.detach()

    def evaluated(self) -> FusedUNet:
        """At an epoch's end: the members' BatchNorm statistics handed back to them, and the model to
        evaluate (with ema, the members' averaged weights)."""
        self.fused.sync_members()
        averages = [m.average for m in self.members if m.average]
        for average in averages:
            average.sync_counts()
        return FusedUNet([m.evaluated for m in self.members]) if averages else self.fused
