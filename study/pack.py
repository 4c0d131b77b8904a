"""Fused trial packs: K trials that share their structure train as one grouped-convolution model.

Members share ``STRUCTURE`` (dataset, resolution, depth, sampling, output, width,
batch size, data limits, precision, preview count: what the one fused forward and the
one data pipeline fix) and differ in anything else: lr, schedule and warm-up, loss (mse,
l1, huber), weight decay, weight averaging (ema), dropout, augmentation and its
strength, test-time flip averaging, seed, epochs. One process, one device-resident copy of the data,
one kernel per layer for all members: member k's activations are channel group k
of one tensor, so every convolution runs with ``groups=K`` and BatchNorm over the
fused channels is per member by construction.

Why grouped convolutions rather than ``torch.func.stack_module_state`` + ``vmap``:
BatchNorm's running statistics are in-place buffer updates that vmap does not
batch, the grouped form needs nothing but plain kernels (CPU, CUDA graphs and
``torch.compile`` all take it), and it was measured fast on an H100 (8 fused
UNets 185k model-images/s, 32 fused 222k, one model 76k).

Each member keeps its own parameter tensors (they ARE a plain ``study.models.UNet``)
with its own Adam(W), scheduler and weight average (a member with ema is evaluated,
previewed and exported through a second fused model of its averaged weights, as
run_trial does); the fused forward concatenates them per layer.
That keeps per-member learning rates and schedules exact, makes export a plain
``state_dict()``, and lets a pruned or finished member leave by rebuilding the fused
model from the others (its slice then costs nothing), instead of masking it.
Measured on a 2-core CPU: K Adam steps cost what one Adam over all members'
parameters costs (about 2% of a step); a rebuild takes 3-5 ms, once per departure.

A pack reproduces its members' separate trials (same seeds: same initial weights,
data order and augmentation) up to floating-point rounding. Dropout is the exception:
one mask tensor serves all members, so with dropout > 0 the draws differ from a
separate trial's (the same distribution, not the same numbers).
"""
from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from study.color import prediction_to_rgb, rgb_to_y, target_for
from study.config import TrialConfig
from study.contract import best_row
from study.data import DeviceImages, Splits, augment_batch, preview_indices
from study.metrics import colourfulness, psnr, ssim
from study.models import OUTPUTS, ConfigError, UNet, build_unet
from study.train import (CHECKPOINT_FILE, HUBER_DELTA, EvalSplit, NonFiniteLossError, WeightAverage, autocast_for,
                         checkpoint_due, checkpoint_folder, chroma_weights, compiled, device_name, make_optimizer,
                         make_scheduler, prediction_pngs, prepare_trial, rng_states, set_rng_states)

STRUCTURE = ("dataset", "resolution", "depth", "sampling", "output", "base_filters", "max_filters",
             "batch_size", "train_limit", "eval_limit", "precision", "preview_count")
PACK_FILE = "pack.pt"
PackReport = Callable[[dict, "Path | None"], "set[int] | None"]


def check_structure(cfgs: list[TrialConfig]) -> None:
    """Raise ConfigError naming the first field where the members' structure differs."""
    if not cfgs:
        raise ConfigError("a pack needs at least one trial configuration")
    for name in STRUCTURE:
        values = [getattr(c, name, None) for c in cfgs]
        if len(set(values)) > 1:
            raise ConfigError(f"pack members must share {name} (got {values}); "
                              f"put trials that differ in {name} into different packs")


def _dropout_of(seq: nn.Sequential) -> float:
    return next((m.p for m in seq if isinstance(m, nn.Dropout2d)), 0.0)


class FusedUNet(nn.Module):
    """K ``UNet`` members as one model: input (B, K, H, W) luma, output (B, K, C, H, W)."""

    def __init__(self, members: list[UNet]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.k = len(members)
        self.output = members[0].config.output
        self.depth = members[0].config.depth
        # Fused running statistics: F.batch_norm updates them in place, which a
        # per-forward concatenation of the members' buffers would lose.
        self._bn_index: dict[int, int] = {}
        first = [m for m in members[0].modules() if isinstance(m, nn.BatchNorm2d)]
        per_member = [[m for m in member.modules() if isinstance(m, nn.BatchNorm2d)] for member in members]
        for i, bn in enumerate(first):
            self._bn_index[id(bn)] = i
            layer = [bns[i] for bns in per_member]
            self.register_buffer(f"bn{i}_mean", torch.cat([b.running_mean for b in layer]).clone())
            self.register_buffer(f"bn{i}_var", torch.cat([b.running_var for b in layer]).clone())
        self.steps = 0  # training steps taken, for the members' BatchNorm num_batches_tracked
        self._keep: dict[tuple, torch.Tensor] = {}
        self.register_buffer("uv_scale", members[0].uv_scale.view(1, 1, 2, 1, 1).clone(), persistent=False)
        # Per member: RGB members with gray_start predict a correction to their input Y (see UNet.forward).
        starts = [m.config.gray_start for m in members]
        self.register_buffer("gray_start", torch.tensor(starts).view(1, self.k, 1, 1, 1), persistent=False)
        self.any_gray_start, self.all_gray_start = any(starts), all(starts)

    # ------------------------------------------------------------ layers

    def _cat_params(self, mods, name):
        t = getattr(mods[0], name)
        return None if t is None else torch.cat([getattr(m, name) for m in mods])

    def _apply(self, mods: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
        m0 = mods[0]
        if isinstance(m0, nn.Sequential):
            # Members may differ in dropout: a DoubleConv then has an extra layer in some of them.
            children = [[c for c in m if not isinstance(c, nn.Dropout2d)] for m in mods]
            for layer in zip(*children):
                x = self._apply(list(layer), x)
            p = [_dropout_of(m) for m in mods]
            return self._dropout(x, p) if any(p) else x
        if isinstance(m0, nn.ConvTranspose2d):
            return F.conv_transpose2d(x, self._cat_params(mods, "weight"), self._cat_params(mods, "bias"),
                                      m0.stride, m0.padding, m0.output_padding, self.k * m0.groups, m0.dilation)
        if isinstance(m0, nn.Conv2d):
            return F.conv2d(x, self._cat_params(mods, "weight"), self._cat_params(mods, "bias"),
                            m0.stride, m0.padding, m0.dilation, self.k * m0.groups)
        if isinstance(m0, nn.BatchNorm2d):
            i = self._bn_index[id(m0)]
            return F.batch_norm(x, getattr(self, f"bn{i}_mean"), getattr(self, f"bn{i}_var"),
                                self._cat_params(mods, "weight"), self._cat_params(mods, "bias"),
                                self.training, m0.momentum, m0.eps)
        # Parameter-free and per channel (pooling, resampling, activations, pixel (un)shuffle):
        # applying member 0's module to the fused tensor is applying each member's.
        return m0(x)

    def _dropout(self, x: torch.Tensor, p: list[float]) -> torch.Tensor:
        if not self.training:
            return x
        b, c, h, w = x.shape
        key = (tuple(p), x.device, x.dtype)
        if key not in self._keep:  # made once: a host-to-device copy per step would be a sync
            self._keep[key] = 1.0 - torch.tensor(p, device=x.device, dtype=x.dtype).view(1, self.k, 1, 1, 1)
        keep = self._keep[key]
        mask = (torch.rand(b, self.k, c // self.k, 1, 1, device=x.device) < keep).to(x.dtype) / keep
        return x * mask.flatten(1, 2)

    def _cat(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per-member ``cat([a_k, b_k])`` of two fused tensors; the result is channels_last."""
        k = self.k
        a5 = a.permute(0, 2, 3, 1).unflatten(3, (k, -1))
        b5 = b.permute(0, 2, 3, 1).unflatten(3, (k, -1))
        return torch.cat([a5, b5], dim=4).flatten(3).permute(0, 3, 1, 2)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        ms = list(self.members)
        x = self._apply([m.stem for m in ms], y)
        skips = []
        for i in range(self.depth):
            skips.append(x)
            x = self._apply([m.encoders[i] for m in ms], self._apply([m.downs[i] for m in ms], x))
        for i in range(self.depth):
            up = self._apply([m.ups[i] for m in ms], x)
            x = self._apply([m.decoders[i] for m in ms], self._cat(up, skips.pop()))
        out = self._apply([m.head for m in ms], x).float()
        out = out.unflatten(1, (self.k, OUTPUTS[self.output]))
        if self.output == "rgb":
            if not self.any_gray_start:
                return torch.sigmoid(out)
            corrected = y.float().unsqueeze(2) + torch.tanh(out)
            return corrected if self.all_gray_start else torch.where(self.gray_start, corrected, torch.sigmoid(out))
        return torch.tanh(out) * self.uv_scale

    def live_buffers(self, k: int) -> dict[int, torch.Tensor]:
        """Member ``k``'s BatchNorm running statistics as views of the fused buffers, where training
        updates them (keyed by the id of the member's own buffer, which is stale until sync_members)."""
        bns = [m for m in self.members[k].modules() if isinstance(m, nn.BatchNorm2d)]
        live = {}
        for i, bn in enumerate(bns):
            live[id(bn.running_mean)] = getattr(self, f"bn{i}_mean").chunk(self.k)[k]
            live[id(bn.running_var)] = getattr(self, f"bn{i}_var").chunk(self.k)[k]
        return live

    @torch.no_grad()
    def sync_members(self) -> None:
        """Copy the fused BatchNorm statistics back into the members (before export or rebuild)."""
        per_member = [[m for m in member.modules() if isinstance(m, nn.BatchNorm2d)] for member in self.members]
        for i in range(len(per_member[0])):
            for k, (mean, var) in enumerate(zip(getattr(self, f"bn{i}_mean").chunk(self.k),
                                                getattr(self, f"bn{i}_var").chunk(self.k))):
                bn = per_member[k][i]
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
                bn.num_batches_tracked += self.steps
        self.steps = 0


# ---------------------------------------------------------------- members


class Member:
    """One trial inside a pack: its own model, optimizer (AdamW with its weight decay), scheduler (with its
    warm-up), generator, augmentation strength, weight average and history."""

    def __init__(self, index: int, cfg: TrialConfig, dev: torch.device, steps_per_epoch: int):
        self.index, self.cfg = index, cfg
        # Exactly as run_trial: the model is built right after seeding with the trial's seed.
        torch.manual_seed(cfg.seed)
        self.model = build_unet(cfg.model, cfg.image_size).to(dev, memory_format=torch.channels_last)
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

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict() if self.sched is not None else None,
                "generator": self.gen.get_state(), "history": self.history, "status": self.status,
                "config": self.cfg.to_dict(),
                **({"average": self.average.model.state_dict(), "updates": self.average.updates}
                   if self.average else {})}

    def load(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        if self.average:
            # A pack.pt written before packs averaged weights has none: the average starts from the weights.
            self.average.model.load_state_dict(state.get("average") or state["model"])
            self.average.updates = state.get("updates", 0)
        self.opt.load_state_dict(state["optimizer"])
        if self.sched is not None and state.get("scheduler"):
            self.sched.load_state_dict(state["scheduler"])
        self.gen.set_state(state["generator"].cpu())  # generator states live on the CPU
        self.history, self.status = list(state["history"]), state["status"]

    def checkpoint(self) -> dict:
        """A run_trial-format checkpoint: loads into a plain UNet ("model": the averaged weights when
        ema is on, "raw_model": the trained ones)."""
        epoch = self.history[-1]["epoch"] if self.history else 0
        return {"model": self.evaluated.state_dict(), "config": self.cfg.to_dict(), "epoch": epoch,
                "history": self.history, **({"raw_model": self.model.state_dict()} if self.average else {})}


def train_batches(train: DeviceImages, members: list[Member], batch_size: int):
    """Per step, each member's batch stacked as (K, B, 3, H, W).

    Draws from each member's generator in the order DeviceImages.train_batches
    does (a permutation per epoch, then the augmentation's draws per batch), so a
    member sees exactly the batches its trial would see alone; one gather serves all.
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


class PackTerms:
    """What members may differ in beyond their weights, as (K,) device tensors made once per membership
    (a copy to the device per step would be a sync): each member's loss, chroma weighting and test-time flip
    averaging."""

    def __init__(self, members: list[Member], dev: torch.device):
        def mask(flags):
            return torch.tensor(flags, device=dev) if any(flags) else None
        self.l1 = mask([m.cfg.loss == "l1" for m in members])
        self.huber = mask([m.cfg.loss == "huber" for m in members])
        self.flip = mask([m.cfg.tta_flip for m in members])
        strengths = [m.cfg.chroma_weight for m in members]
        self.chroma = torch.tensor(strengths, device=dev).view(1, -1, 1, 1, 1) if any(strengths) else None

    def loss(self, diff: torch.Tensor, shape: tuple) -> torch.Tensor:
        """Elementwise loss of ``diff`` (prediction - target), each member's own (study.train.loss_fn);
        ``shape`` puts the (K,) masks on diff's member axis."""
        out = diff.square()
        if self.l1 is not None:
            out = torch.where(self.l1.view(shape), diff.abs(), out)
        if self.huber is not None:
            a = diff.abs()  # F.huber_loss's formula
            out = torch.where(self.huber.view(shape),
                              torch.where(a < HUBER_DELTA, 0.5 * diff.square(), HUBER_DELTA * (a - 0.5 * HUBER_DELTA)),
                              out)
        return out

    def predict(self, fused: FusedUNet, y: torch.Tensor, precision: str) -> torch.Tensor:
        """Every member's prediction (B, K, C, H, W), float, for luma ``y`` (B, 1, H, W); averaged with the
        mirrored input's for members with tta_flip, as study.train.predict does."""
        inp = y.expand(-1, fused.k, -1, -1).contiguous(memory_format=torch.channels_last)
        with autocast_for(y.device, precision):
            pred = fused(inp).float()
            if self.flip is not None:
                mirrored = fused(inp.flip(3)).float().flip(4)
                pred = torch.where(self.flip.view(1, -1, 1, 1, 1), (pred + mirrored) / 2, pred)
        return pred


@torch.no_grad()
def _evaluate_sums(fused: FusedUNet, terms: PackTerms, split: EvalSplit, batch_size: int,
                   precision: str) -> torch.Tensor:
    """study.train.batch_sums for every member at once: (K, 4) totals, left on the device (no sync)."""
    fused.eval()
    k = fused.k
    dev = split.images.device
    sums = torch.zeros(4, k, device=dev, dtype=torch.float64)
    for x in split.images.eval_batches(batch_size):
        b = x.shape[0]
        y = rgb_to_y(x)
        pred = terms.predict(fused, y, precision).transpose(0, 1).flatten(0, 1)   # (K*B, C, H, W), member-major
        xk = x.unsqueeze(0).expand(k, -1, -1, -1, -1).flatten(0, 1)
        diff = (pred - target_for(xk, fused.output)).reshape(k, b, -1)
        loss = terms.loss(diff, (k, 1, 1)).mean(2)
        rgb = prediction_to_rgb(pred, y.repeat(k, 1, 1, 1), fused.output)
        sums += torch.stack([loss.sum(1), psnr(rgb, xk).view(k, b).sum(1), ssim(rgb, xk).view(k, b).sum(1),
                             colourfulness(rgb).view(k, b).sum(1)]).double()
    fused.train()
    return sums.T


@torch.no_grad()
def _write_previews(fused: FusedUNet, terms: PackTerms, members: list[Member], test: DeviceImages, folder: Path,
                    precision: str) -> None:
    idx = preview_indices(len(test), members[0].cfg.preview_count)
    if not idx:
        return
    x = test.take(torch.tensor(idx, device=test.device))
    y = rgb_to_y(x)
    fused.eval()
    pred = terms.predict(fused, y, precision)
    fused.train()
    for j, m in enumerate(members):
        sub = folder / f"member-{m.index}"
        sub.mkdir(exist_ok=True)
        for name, data in prediction_pngs(prediction_to_rgb(pred[:, j], y, fused.output), idx).items():
            (sub / name).write_bytes(data)


def run_pack(cfgs: list[TrialConfig], *, data_root: str | None = None, cache_dir: str | Path | None = None,
             device: str | None = None, report: PackReport | None = None, resume_from: Path | str | None = None,
             splits: Splits | None = None, log: Callable[[str], None] = print,
             work_dir: Path | str | None = None) -> list[list[dict]]:
    """Train the members of ``cfgs`` as one fused model; returns each member's epoch rows.

    ``report(rows, folder)`` is called once per epoch with ``{member index: epoch row}`` for every member
    still in the pack and a temporary checkpoint folder under ``work_dir`` (or None on epochs that write
    none, see study.train.checkpoint_due); it returns the member indices to stop (pruned). A member also
    leaves after its own ``epochs``, or with ``"error"`` in its row when its loss stops being finite.
    """
    for c in cfgs:
        c.validate()
    check_structure(cfgs)
    cfg0 = cfgs[0]
    # Everything prepare_trial uses is structure: one setup serves every member.
    setup = prepare_trial(cfg0, device, data_root, cache_dir, splits, work_dir)
    dev, mode, precision, work_dir = setup.device, setup.compile_mode, setup.precision, setup.work_dir
    train, val_split, test_split, eval_batch = setup.train, setup.val, setup.test, setup.eval_batch
    test = test_split.images
    batch = cfg0.batch_size
    members = [Member(i, c, dev, setup.steps_per_epoch) for i, c in enumerate(cfgs)]
    epoch = 0
    if resume_from:
        state = torch.load(Path(resume_from) / PACK_FILE, map_location=dev, weights_only=True)
        if [m["config"] for m in state["members"]] != [c.to_dict() for c in cfgs]:
            raise ConfigError(f"{Path(resume_from) / PACK_FILE} holds a different pack; resume it with "
                              f"the configurations it was started with")
        for m, s in zip(members, state["members"]):
            m.load(s)
        epoch = state["epoch"]
        set_rng_states(state["rng"], dev)
        log(f"pack resumed from {resume_from} after epoch {epoch}")
    else:
        torch.manual_seed(cfg0.seed)  # dropout draws from the global generators
        log(f"pack of {len(cfgs)} on {device_name(dev)}, precision {precision}, "
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
        for x in train_batches(train, active, batch):
            loss_sum += train_step(fused, active, loss, x)
            steps += 1
        fused.sync_members()
        averaged = any(m.average for m in active)
        if averaged:
            for m in active:
                if m.average:
                    m.average.sync_counts()
        # With ema, members' averaged weights (and their statistics, current now) are what is evaluated.
        evaluated = FusedUNet([m.evaluated for m in active]) if averaged else fused
        # Evaluation batches hold K predictions per image: keep their size near one trial's.
        per_eval = max(eval_batch // len(active), 16)
        v_sums = _evaluate_sums(evaluated, terms, val_split, per_eval, precision)
        t_sums = _evaluate_sums(evaluated, terms, test_split, per_eval, precision)
        # The one sync of the epoch: every member's training loss and evaluation totals together.
        fetched = torch.cat([(loss_sum / max(steps, 1))[:, None], v_sums, t_sums], dim=1).tolist()
        seconds = time.perf_counter() - t0
        rows: dict[int, dict] = {}
        due = False
        for m, f in zip(active, fetched):
            v, t = val_split.metrics(f[1:5]), test_split.metrics(f[5:9])
            row = {"epoch": epoch, "train_loss": f[0], "lr": m.opt.param_groups[0]["lr"],
                   **{f"val_{k}": x for k, x in v.items()}, **{f"test_{k}": x for k, x in t.items()},
                   "seconds": seconds, "precision": precision}
            m.history.append(row)
            best = best_row(m.history)
            row.update(best_val_psnr=best["val_psnr"], best_epoch=best["epoch"])
            if not math.isfinite(f[0]):
                # This member diverged; its slice cannot touch the others (disjoint weights, per-channel
                # BatchNorm), so only it ends, as ERROR.
                row["error"] = str(NonFiniteLossError(
                    f"training loss became {f[0]} in epoch {epoch} (lr={m.cfg.lr}, loss={m.cfg.loss}); "
                    f"lower the learning rate"))
                m.status = "error"
            elif epoch >= m.cfg.epochs:
                m.status = "done"
            due = due or checkpoint_due(epoch, m.cfg.epochs, best["epoch"] == epoch, last_saved, last_saved_at)
            rows[m.index] = dict(row)
        log(f"pack epoch {epoch}: " + "  ".join(
            f"[{i}] val PSNR {r['val_psnr']:.2f} dB" + (" ERROR" if "error" in r else "") for i, r in rows.items())
            + f"  (gray {val_split.gray_psnr:.2f})  {seconds:.1f}s")

        folder = None
        try:
            if due or any(m.status != "active" for m in active):
                folder = checkpoint_folder(work_dir, epoch)
                _save(folder, members, active, epoch, dev)
                _write_previews(evaluated, terms, active, test, folder, precision)
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
    return [m.history for m in members]


def make_pack_loss(fused: FusedUNet, terms: PackTerms, dev: torch.device, precision: str,
                   mode: str | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x (K, B, 3, H, W) -> (K,)`` each member's training loss on its own batch; compiled if asked
    (study.train.compile_mode), like run_trial's step."""
    k = fused.k

    def pack_loss(x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(0, 1)                                                  # (K*B, 3, H, W)
        y = rgb_to_y(flat).unflatten(0, (k, -1)).squeeze(2).transpose(0, 1)    # (B, K, H, W)
        with autocast_for(dev, precision):
            pred = fused(y.contiguous(memory_format=torch.channels_last))     # (B, K, C, H, W)
        target = target_for(flat, fused.output).unflatten(0, (k, -1)).transpose(0, 1)
        loss = terms.loss(pred.float() - target, (1, k, 1, 1, 1))
        if terms.chroma is not None:   # members without it get weights of exactly 1
            uv = target_for(flat, "uv").unflatten(0, (k, -1)).transpose(0, 1)           # (B, K, 2, H, W)
            loss = loss * chroma_weights(uv, terms.chroma, channel_dim=2, member_dim=1)
        return loss.mean(dim=(0, 2, 3, 4))

    return compiled(pack_loss, mode)


def train_step(fused: FusedUNet, active: list[Member], loss: Callable, x: torch.Tensor) -> torch.Tensor:
    """One optimizer step of every member on its own batch ``x[k]``; the (K,) losses, unsynced."""
    per_member = loss(x)
    for m in active:
        m.opt.zero_grad(set_to_none=True)
    # Members' parameters are disjoint: the sum's gradient is each member's own loss gradient.
    per_member.sum().backward()
    for m in active:
        m.opt.step()
        if m.sched is not None:
            m.sched.step()
        if m.average is not None:
            m.average.update()
    fused.steps += 1
    return per_member.detach()


def _save(folder: Path, members: list[Member], active: list[Member], epoch: int, dev: torch.device) -> None:
    state = {"members": [m.state() for m in members], "epoch": epoch, "rng": rng_states(dev)}
    torch.save(state, folder / PACK_FILE)
    for m in active:
        sub = folder / f"member-{m.index}"
        sub.mkdir(exist_ok=True)
        torch.save(m.checkpoint(), sub / CHECKPOINT_FILE)


def member_state_dict(folder: Path | str, index: int) -> dict:
    """Member ``index``'s weights from a pack checkpoint folder, as a plain UNet state dict."""
    state = torch.load(Path(folder) / f"member-{index}" / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    return state["model"]
