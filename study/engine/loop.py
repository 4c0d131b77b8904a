"""The one training loop: K members (a single trial is one) trained together, epoch by epoch.

No Ray or Optuna here: ``report(rows, folder)`` is how a caller receives each epoch's rows
(``{member index: row}``) and, on the epochs that write one, a checkpoint folder; it returns the
members to stop. study.engine.trial.run_trial and study.engine.pack.run_pack are this loop with their own
``report`` contracts and checkpoint layouts (study.engine.checkpoints).

The step keeps a GPU busy: no host synchronisation inside an epoch (colour constants are cached
per device, augmentation offsets stay on the device, losses and metric totals accumulate on the
device) and one sync per epoch that fetches every member's training loss and evaluations together.
"""
from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from study.config import ConfigError, TrialConfig
from study.engine.adversarial import Critic
from study.engine.checkpoints import (
    checkpoint_due,
    checkpoint_folder,
    member_folder,
    read_run,
    save_run,
    set_rng_states,
    sweep_stale_checkpoints,
)
from study.engine.chroma import used_bins
from study.engine.data import DeviceImages, Splits, load_splits
from study.engine.device import compile_mode, device_name, pick_device, resolve_precision
from study.engine.evaluation import EvalSplit, eval_batch_size
from study.engine.fused import (
    FusedUNet,
    PackTerms,
    evaluate_members,
    make_pack_loss,
    member_previews,
    train_batches,
    train_step,
)
from study.engine.losses import divergence
from study.engine.models import UNet, build_unet
from study.engine.optim import WeightAverage, make_optimizer, make_scheduler
from study.results import best_row

# report(rows, folder) -> the member indices to stop (None: none)
RunReport = Callable[[dict, "Path | None"], "set[int] | None"]


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


def prepare_trial(cfg: TrialConfig, device: str | torch.device | None, data_root: str | None,
                  cache_dir: str | Path | None, splits: Splits | None,
                  work_dir: str | Path | None) -> TrialSetup:
    """Device, precision and compile mode for ``cfg``, its data on the device, the evaluation splits'
    constants, and ``work_dir`` (default: the current directory) swept of killed runs' checkpoints."""
    dev = pick_device(device)
    mode = compile_mode()
    precision = resolve_precision(cfg, dev)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        # TF32 for fp32 convolutions and matmuls (PyTorch leaves matmuls at full fp32 by default).
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    work_dir = Path(work_dir) if work_dir is not None else Path.cwd()
    work_dir.mkdir(parents=True, exist_ok=True)  # e.g. study.trial's --out, made before its first checkpoint
    sweep_stale_checkpoints(work_dir)
    splits = splits or trial_splits(cfg, data_root, cache_dir)
    train, val, test = (DeviceImages(splits[s], dev) for s in ("train", "val", "test"))
    eval_batch = eval_batch_size(cfg)
    # The training split's UV bins: measured at about 20 ms for CIFAR-10's 40,000 images on a CPU (a
    # strided sample of SAMPLE_PIXELS pixels), so found at every start rather than cached.
    bins = used_bins(train.images) if cfg.output == "uv-classes" else None
    return TrialSetup(dev, mode, precision, work_dir, train, EvalSplit.prepare(val, eval_batch),
                      EvalSplit.prepare(test, eval_batch), eval_batch, max(len(train) // cfg.batch_size, 1), bins)


class Member:
    """One trial in the loop: its own model, optimizer (AdamW with its weight decay), scheduler (with its
    warm-up), generator, augmentation strength, weight average and history."""

    def __init__(self, index: int, cfg: TrialConfig, dev: torch.device, steps_per_epoch: int,
                 bins: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.index, self.cfg, self.steps_per_epoch = index, cfg, steps_per_epoch
        # The model (and discriminator) are built right after seeding with the trial's seed: the same
        # initial weights alone or in any pack.
        torch.manual_seed(cfg.seed)
        self.model = build_unet(cfg.model, cfg.image_size, bins).to(dev, memory_format=torch.channels_last)
        self.critic = Critic(cfg, dev) if cfg.adversarial > 0 else None
        self.opt = make_optimizer(self.model.parameters(), cfg.lr, dev, cfg.weight_decay)
        self.sched = make_scheduler(self.opt, cfg, cfg.epochs * steps_per_epoch, steps_per_epoch)
        self.gen = torch.Generator(device=dev).manual_seed(cfg.seed)
        self.average = WeightAverage(self.model, cfg.ema) if cfg.ema > 0 else None
        self.augment = cfg.augment_strength if cfg.augment else 0.0
        self.history: list[dict] = []
        self.status = "active"   # active | done | pruned | error

    @property
    def evaluated(self) -> UNet:
        """What is evaluated, previewed and exported as "model": the average when ema is on."""
        return self.average.model if self.average else self.model

    def roster(self) -> dict:
        return {"config": self.cfg.to_dict(), "history": self.history, "status": self.status}

    def state(self) -> dict:
        """The member's checkpoint (study.engine.checkpoints), less the run's epoch and random generators."""
        return {"model": self.evaluated.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict() if self.sched is not None else None,
                "generator": self.gen.get_state(), **self.roster(),
                **({"raw_model": self.model.state_dict(), "updates": self.average.updates} if self.average else {}),
                **({"critic": self.critic.state_dict()} if self.critic else {})}

    def load(self, state: dict, epoch: int) -> None:
        self.history, self.status = list(state["history"]), state.get("status", "active")
        if self.status != "active":
            return  # it left the pack: its history is all a resumed run needs
        if "average" in state:   # a pack.pt from before the shared format: "model" was the trained weights
            raw, averaged = state["model"], state["average"]
        else:                    # "model" is what was evaluated; "raw_model" the trained weights, with ema
            raw, averaged = state.get("raw_model") or state["model"], state["model"]
        self.model.load_state_dict(raw)
        if self.average:
            self.average.model.load_state_dict(averaged)
            self.average.updates = state.get("updates", epoch * self.steps_per_epoch)
        self.opt.load_state_dict(state["optimizer"])
        if self.sched is not None and state.get("scheduler"):
            self.sched.load_state_dict(state["scheduler"])
        self.gen.set_state(state["generator"].cpu())  # generator states live on the CPU
        if self.critic is not None:
            if "critic" not in state:
                raise ConfigError("the checkpoint has no discriminator state (it was trained with adversarial=0); "
                                  "resume it with the adversarial weight it was started with")
            self.critic.load_state_dict(state["critic"])


def epoch_row(m: Member, epoch: int, fetched: list[float], val: EvalSplit, test: EvalSplit, seconds: float,
              precision: str) -> dict:
    """Member ``m``'s row of ``epoch`` from its fetched (train loss, n val totals, n test totals: n = 4, or
    with a classification head's temperature curve more), added to its history with the best epoch so far;
    the curve is recorded for val and test (contract.CURVE_METRICS)."""
    n = (len(fetched) - 1) // 2
    v, t = val.metrics(fetched[1:1 + n], curve=True), test.metrics(fetched[1 + n:1 + 2 * n], curve=True)
    row = {"epoch": epoch, "train_loss": fetched[0], "lr": m.opt.param_groups[0]["lr"],
           **{f"val_{k}": x for k, x in v.items()}, **{f"test_{k}": x for k, x in t.items()},
           "seconds": seconds, "precision": precision}
    m.history.append(row)
    best = best_row(m.history)
    row.update(best_val_psnr=best["val_psnr"], best_epoch=best["epoch"])
    return row


def run_members(cfgs: list[TrialConfig], *, single: bool, data_root: str | None = None,
                cache_dir: str | Path | None = None, device: str | None = None, report: RunReport | None = None,
                resume_from: Path | str | None = None, splits: Splits | None = None,
                log: Callable[[str], None] = print, work_dir: Path | str | None = None,
                checkpoint_now: Callable[[], bool] | None = None) -> list[Member]:
    """Train ``cfgs`` (sharing study.engine.pack.STRUCTURE) together until each has run its epochs, diverged
    or been stopped by ``report``; returns the members, with their histories.

    ``single``: one trial's layout and rules: its checkpoint at the folder's root, and divergence raises
    NonFiniteLossError (a pack member instead leaves with ``"error"`` in its row).
    ``checkpoint_now()``: asked after each epoch; True writes a checkpoint whatever else is due (a study's
    time budget is spent, and the run stops at this epoch's end).
    """
    for c in cfgs:
        c.validate()
    # Everything prepare_trial uses is structure: one setup serves every member.
    setup = prepare_trial(cfgs[0], device, data_root, cache_dir, splits, work_dir)
    dev, mode, precision, work_dir = setup.device, setup.compile_mode, setup.precision, setup.work_dir
    val, test = setup.val, setup.test
    members = [Member(i, c, dev, setup.steps_per_epoch, setup.bins) for i, c in enumerate(cfgs)]
    epoch = 0
    if resume_from:
        epoch, rng, states = read_run(resume_from, [c.to_dict() for c in cfgs], single, dev)
        for m, s in zip(members, states):
            m.load(s, epoch)
        set_rng_states(rng, dev)
        log(f"{'' if single else 'pack '}resumed from {resume_from} after epoch {epoch}")
    else:
        log(f"{'device' if single else f'pack of {len(cfgs)} on'} {device_name(dev)}, precision {precision}, "
            f"step {'compiled: ' + mode if mode else 'eager'}")
    last_saved, last_saved_at = epoch, time.monotonic()

    active = [m for m in members if m.status == "active"]
    fused = None
    while active:
        epoch += 1
        t0 = time.perf_counter()
        if fused is None:
            # Rebuilt only when members leave (a compiled step recompiles then): a pruned or finished
            # member's slice costs nothing afterwards.
            fused = FusedUNet([m.model for m in active]).train()
            terms = PackTerms(active, dev)
            loss = make_pack_loss(fused, terms, dev, precision, mode)
            for k, m in enumerate(active):
                if m.average:
                    m.average.follow(fused.live_buffers(k))
        loss_sum = torch.zeros(len(active), device=dev, dtype=torch.float64)
        steps = 0
        for x in train_batches(setup.train, active, cfgs[0].batch_size):
            loss_sum += train_step(fused, active, loss, x)
            steps += 1
        fused.sync_members()
        averaged = any(m.average for m in active)
        for m in active:
            if m.average:
                m.average.sync_counts()
        # With ema, members' averaged weights (and their statistics, current now) are what is evaluated.
        evaluated = FusedUNet([m.evaluated for m in active]) if averaged else fused
        # Evaluation batches hold K predictions per image: keep their size near one trial's.
        per_eval = max(setup.eval_batch // len(active), 16)
        v_sums = evaluate_members(evaluated, terms, val, per_eval, precision)
        t_sums = evaluate_members(evaluated, terms, test, per_eval, precision)
        # The one sync of the epoch: every member's training loss and evaluation totals together.
        fetched = torch.cat([(loss_sum / max(steps, 1))[:, None], v_sums, t_sums], dim=1).tolist()
        seconds = time.perf_counter() - t0
        rows: dict[int, dict] = {}
        due = False
        for m, f in zip(active, fetched):
            row = epoch_row(m, epoch, f, val, test, seconds, precision)
            if not math.isfinite(f[0]):
                if single:
                    raise divergence(f[0], epoch, m.cfg)
                # This member diverged; its slice cannot touch the others (disjoint weights, per-channel
                # BatchNorm), so only it ends, as ERROR.
                row["error"] = str(divergence(f[0], epoch, m.cfg))
                m.status = "error"
            elif epoch >= m.cfg.epochs:
                m.status = "done"
            due = (due or checkpoint_due(epoch, m.cfg.epochs, row["best_epoch"] == epoch, last_saved, last_saved_at)
                   or (checkpoint_now is not None and checkpoint_now()))
            rows[m.index] = dict(row)
        _log_epoch(log, single, epoch, active, rows, val, seconds)

        folder = None
        try:
            if due or any(m.status != "active" for m in active):
                folder = checkpoint_folder(work_dir, epoch)
                save_run(folder, {m.index: m.state() for m in active},
                         None if single else [m.roster() for m in members], epoch, dev)
                for m, files in zip(active, member_previews(evaluated, terms, test.images,
                                                            cfgs[0].preview_count, precision)):
                    sub = member_folder(folder, m.index, single)
                    for name, data in files.items():
                        (sub / name).write_bytes(data)
                last_saved, last_saved_at = epoch, time.monotonic()
            stop = (report(rows, folder) if report is not None else None) or set()
        finally:
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
        for m in active:
            if m.index in stop and m.status == "active":
                m.status = "pruned"
        if any(m.status != "active" for m in active):
            active, fused = [m for m in active if m.status == "active"], None
    return members


def _log_epoch(log, single: bool, epoch: int, active: list[Member], rows: dict[int, dict], val: EvalSplit,
               seconds: float) -> None:
    if single:
        r, cfg = next(iter(rows.values())), active[0].cfg
        log(f"epoch {epoch}/{cfg.epochs}  train {r['train_loss']:.4f}  val {r['val_loss']:.4f}  "
            f"test {r['test_loss']:.4f}  val PSNR {r['val_psnr']:.2f} dB (gray {r['val_gray_psnr']:.2f})  "
            f"SSIM {r['val_ssim']:.3f}  colour {r['val_colourfulness']:.2f}  {seconds:.1f}s")
        return
    log(f"pack epoch {epoch}: " + "  ".join(
        f"[{i}] val PSNR {r['val_psnr']:.2f} dB" + (" ERROR" if "error" in r else "") for i, r in rows.items())
        + f"  (gray {val.gray_psnr:.2f})  {seconds:.1f}s")

