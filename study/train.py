"""One colorization trial: build everything from a TrialConfig, train, evaluate each epoch.

No Ray or Optuna here: ``report(row, checkpoint_dir)`` is how a caller (the CLI,
or the study's Ray trainable) receives each epoch's metrics and, on the epochs
that write one, a checkpoint folder.

The step is built to keep a GPU busy: no host synchronisation inside an epoch
(colour constants are cached per device, augmentation offsets stay on the
device, losses and metric totals accumulate on the device) and one sync per
epoch that fetches the training loss and both evaluations' totals together.
"""
from __future__ import annotations

import copy
import functools
import io
import itertools
import math
import os
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from study.color import prediction_to_rgb, rgb_to_y, target_for
from study.config import TrialConfig
from study.contract import best_row
from study.data import DeviceImages, Splits, load_splits, preview_indices
from study.metrics import colourfulness, psnr, ssim
from study.models import ConfigError, build_unet

CHECKPOINT_FILE = "checkpoint.pt"
# A checkpoint (weights + Adam state) is written only when it matters: at the best epoch so far
# (what a study keeps), at the last epoch, and for resume at least every CHECKPOINT_EVERY epochs or
# CHECKPOINT_SECONDS of training, whichever comes first. Writing one every epoch cost up to ~6 GB per
# epoch for the widest Flowers models; this bounds what a crash re-runs to 5 epochs or 5 minutes.
CHECKPOINT_EVERY = 5
CHECKPOINT_SECONDS = 300.0
# precision "auto" on a GPU: bf16 autocast from this many pixels per batch (batch * H * W). Measured on
# an H100: at CIFAR batch 64 (65k px) bf16 gained nothing over fp32 (its cast kernels cost what the
# matmuls save), at batch 512 (524k px) bf16 + channels_last was the fastest; Flowers batches are far above.
BF16_MIN_PIXELS = 1 << 18
# torch.compile for the forward+loss (and its backward): off by default until measured on a GPU.
# COLORIZE_COMPILE=1 (inductor), =reduce-overhead (CUDA graphs as well) or =max-autotune.
COMPILE_ENV = "COLORIZE_COMPILE"
_COMPILE_MODES = {"1": "default", "on": "default", "true": "default", "default": "default",
                  "reduce-overhead": "reduce-overhead", "max-autotune": "max-autotune",
                  "max-autotune-no-cudagraphs": "max-autotune-no-cudagraphs"}
DEVICE_HELP = ("use --device cpu, --device cuda (or cuda:N) on a machine with an NVIDIA GPU, "
               "or leave --device out to use a GPU when there is one")

Report = Callable[[dict, "Path | None"], None]


class NonFiniteLossError(RuntimeError):
    """Training diverged; the trial ends as ERROR with this message."""


# ---------------------------------------------------------------- device and precision


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """The device to train on; ConfigError (naming the option and the fix) for one that cannot work."""
    if device is None or str(device).strip() == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device) if isinstance(device, torch.device) else torch.device(str(device).strip())
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {device!r} is not a device PyTorch knows; {DEVICE_HELP}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device!r}: CUDA is not available on this machine "
                              f"(PyTorch {torch.__version__} sees no NVIDIA GPU); {DEVICE_HELP}")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {device!r}: this machine has {torch.cuda.device_count()} CUDA "
                              f"device(s), numbered from 0; {DEVICE_HELP}")
    elif dev.type != "cpu":
        raise ConfigError(f"--device {device!r}: only cpu and cuda are supported; {DEVICE_HELP}")
    return dev


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def resolve_precision(cfg: TrialConfig, device: torch.device) -> str:
    """What a trial computes in, recorded in every epoch row: ``bf16``, ``tf32`` (fp32 with TF32
    convolutions and matmuls, on a GPU) or ``fp32``."""
    want = cfg.precision
    if want == "auto":
        if device.type != "cuda":
            return "fp32"  # bf16 autocast is slower than fp32 on most CPUs
        want = "bf16" if cfg.batch_size * cfg.image_size ** 2 >= BF16_MIN_PIXELS else "fp32"
    return "tf32" if want == "fp32" and device.type == "cuda" else want


def autocast_for(device: torch.device, precision: str | None = None):
    """Autocast for ``precision``; without one, bf16 on a GPU and fp32 on the CPU (inference callers)."""
    if precision is None:
        precision = "bf16" if device.type == "cuda" else "fp32"
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def compile_mode() -> str | None:
    """The torch.compile mode asked for through $COLORIZE_COMPILE (None: the plain eager step)."""
    value = os.environ.get(COMPILE_ENV, "").strip().lower()
    if value in ("", "0", "off", "false", "no"):
        return None
    if value not in _COMPILE_MODES:
        raise ConfigError(f"{COMPILE_ENV}={value!r} is not understood; use 0, 1, reduce-overhead or max-autotune")
    return _COMPILE_MODES[value]


def make_optimizer(params, lr: float, device: torch.device, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """Adam, or AdamW with decoupled ``weight_decay`` when it is > 0."""
    # Fused on a GPU: one kernel for all parameters and its step counts stay on the device
    # (the foreach path reads them back, a sync per step). foreach on the CPU.
    impl = {"fused": True} if device.type == "cuda" else {"foreach": True}
    if weight_decay > 0:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **impl)
    return torch.optim.Adam(params, lr=lr, **impl)


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrialConfig, total_steps: int, steps_per_epoch: int = 0):
    """The per-step learning-rate schedule; ``cfg.warmup_epochs`` of linear warm-up come first."""
    total = max(total_steps, 1)
    warm = min(cfg.warmup_epochs * steps_per_epoch, total - 1)
    lrs = torch.optim.lr_scheduler
    if cfg.schedule == "onecycle":  # its own warm-up phase takes the warm-up's length
        pct = warm / total if warm > 0 else 0.3
        return lrs.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=pct)
    if warm <= 0:
        return lrs.CosineAnnealingLR(opt, T_max=total) if cfg.schedule == "cosine" else None
    warmup = lrs.LinearLR(opt, start_factor=1 / (warm + 1), end_factor=1.0, total_iters=warm)
    if cfg.schedule == "cosine":
        return lrs.SequentialLR(opt, [warmup, lrs.CosineAnnealingLR(opt, T_max=max(total - warm, 1))],
                                milestones=[warm])
    return warmup


# Huber's quadratic zone: colour errors in [0, 1] RGB or UV are mostly below 0.1, so delta 1 would be
# MSE; at 0.1 large errors (ambiguous colours) weigh linearly, as in L1, small ones quadratically.
HUBER_DELTA = 0.1


def loss_fn(name: str):
    if name == "huber":
        return functools.partial(F.huber_loss, delta=HUBER_DELTA)
    return F.l1_loss if name == "l1" else F.mse_loss


def chroma_weights(uv: torch.Tensor, strength: float | torch.Tensor, channel_dim: int = 1,
                   member_dim: int | None = None) -> torch.Tensor:
    """Per-pixel loss weights for target chroma ``uv``: ``(1 + strength * c / mean(c)) / (1 + strength)``,
    with ``c`` each pixel's |UV|, so they average 1 over the batch (over each member's, with ``member_dim``).

    A per-pixel regression colorizer paints the mean of the plausible colours, which is washed out; weighting
    saturated pixels more (a regression analogue of Zhang et al. 2016's class rebalancing) trades PSNR for
    colour. For a pack ``strength`` is a tensor that broadcasts along ``member_dim``.
    """
    c = uv.square().sum(channel_dim, keepdim=True).sqrt()
    dims = [d for d in range(c.dim()) if d != member_dim]
    return (1 + strength * c / c.mean(dim=dims, keepdim=True).clamp_min(1e-6)) / (1 + strength)


class WeightAverage:
    """An exponential moving average of a model's weights and BatchNorm statistics, in its own copy of
    the model (``.model``), updated on the device without a sync (torch's ``AveragedModel`` reads its
    update count back on every update)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.source = model
        self.model = copy.deepcopy(model).requires_grad_(False)
        self.updates = 0
        self._avg, self._src = self._floats(self.model), self._floats(model)
        self._avg_int, self._src_int = self._ints(self.model), self._ints(model)

    def follow(self, live: dict[int, torch.Tensor]) -> None:
        """Average from ``live`` tensors in place of the source model's own (keyed by their id): a fused
        pack (study.pack) updates its members' BatchNorm statistics in its own buffers during an epoch."""
        self._src = [live.get(id(t), t) for t in self._floats(self.source)]

    @torch.no_grad()
    def sync_counts(self) -> None:
        """Copy the integer buffers (BatchNorm batch counts) again, after a pack has synced them."""
        for a, s in zip(self._avg_int, self._src_int):
            a.copy_(s)

    @staticmethod
    def _floats(m):
        return [t for t in itertools.chain(m.parameters(), m.buffers()) if t.is_floating_point()]

    @staticmethod
    def _ints(m):
        return [t for t in m.buffers() if not t.is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        # Warm-up of the decay (as in TensorFlow's and timm's EMA): early averages do not drag in
        # the random initial weights for thousands of steps.
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self._avg, self._src, 1 - decay)
        for a, s in zip(self._avg_int, self._src_int):
            a.copy_(s)


def make_loss_step(model: torch.nn.Module, cfg: TrialConfig, device: torch.device, precision: str,
                   mode: str | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x (RGB batch) -> scalar training loss``: colour conversion, forward and loss; compiled if asked."""
    lossf = loss_fn(cfg.loss)

    def forward_loss(x: torch.Tensor) -> torch.Tensor:
        y = rgb_to_y(x)
        with autocast_for(device, precision):
            pred = model(y)
        if cfg.chroma_weight > 0:
            return (lossf(pred.float(), target_for(x, cfg.output), reduction="none")
                    * chroma_weights(target_for(x, "uv"), cfg.chroma_weight)).mean()
        return lossf(pred.float(), target_for(x, cfg.output))

    return compiled(forward_loss, mode)


def compiled(fn: Callable[[torch.Tensor], torch.Tensor], mode: str | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn`` (a batch -> loss step) through torch.compile in ``mode`` (see compile_mode); None: ``fn``."""
    if mode is None:
        return fn
    # dynamic=False: training batches all have one shape (the last partial batch is dropped).
    step = torch.compile(fn, mode=mode, dynamic=False)
    if mode in ("reduce-overhead", "max-autotune"):
        def graphed(x: torch.Tensor) -> torch.Tensor:
            torch.compiler.cudagraph_mark_step_begin()  # last step's graph outputs are no longer needed
            return step(x)
        return graphed
    return step


# ---------------------------------------------------------------- evaluation


@dataclass
class EvalSplit:
    """A split ready for evaluation, with its constants computed once (not every epoch): the
    grayscale input's PSNR (the baseline) and the originals' mean colourfulness."""
    images: DeviceImages
    batch_size: int
    gray_psnr: float
    colourfulness: float

    @classmethod
    @torch.no_grad()
    def prepare(cls, images: DeviceImages, batch_size: int) -> "EvalSplit":
        sums = torch.zeros(2, device=images.device, dtype=torch.float64)
        for x in images.eval_batches(batch_size):
            gray = rgb_to_y(x).clamp(0, 1).expand(-1, 3, -1, -1)
            sums += torch.stack([psnr(gray, x).sum(), colourfulness(x).sum()]).double()
        gray_psnr, colour = (sums / len(images)).tolist()  # one sync per split, once per trial
        return cls(images, batch_size, gray_psnr, colour)

    def __len__(self) -> int:
        return len(self.images)

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(RGB, Y) batches; several models' predictions can be scored on the same ones."""
        for x in self.images.eval_batches(self.batch_size):
            yield x, rgb_to_y(x)

    def metrics(self, sums: Sequence[float]) -> dict:
        """Metrics from fetched ``batch_sums`` totals (loss, PSNR, SSIM, colourfulness) over the split."""
        loss, p, s, c = (float(v) / len(self) for v in sums)
        return {"loss": loss, "psnr": p, "ssim": s, "colourfulness": c / max(self.colourfulness, 1e-9),
                "gray_psnr": self.gray_psnr}


def eval_batch_size(cfg: TrialConfig) -> int:
    return max(cfg.batch_size, 256 if cfg.image_size <= 64 else 32)


def batch_sums(pred: torch.Tensor, x: torch.Tensor, y: torch.Tensor, output: str, lossf) -> torch.Tensor:
    """One model's batch totals on the device, float64 (4,): loss in its own space; PSNR, SSIM and
    colourfulness in RGB. No sync: add them up over a split and fetch once."""
    pred = pred.float()
    loss = lossf(pred, target_for(x, output), reduction="none").flatten(1).mean(1)
    rgb = prediction_to_rgb(pred, y, output)
    return torch.stack([loss.sum(), psnr(rgb, x).sum(), ssim(rgb, x).sum(), colourfulness(rgb).sum()]).double()


def predict(model: torch.nn.Module, y: torch.Tensor, precision: str | None = None, flip: bool = False) -> torch.Tensor:
    """The model's output (float) for luma ``y``; ``flip``: averaged with the un-mirrored output for the
    mirrored input (test-time flip averaging: colours the model is unsure of by side get averaged)."""
    with autocast_for(y.device, precision):
        pred = model(y).float()
        if flip:
            pred = (pred + model(y.flip(3)).float().flip(3)) / 2
    return pred


@torch.no_grad()
def evaluate_sums(model: torch.nn.Module, split: EvalSplit, cfg: TrialConfig,
                  precision: str | None = None) -> torch.Tensor:
    """``batch_sums`` over a whole split, left on the device (no sync)."""
    was_training = model.training
    model.eval()
    lossf = loss_fn(cfg.loss)
    sums = torch.zeros(4, device=split.images.device, dtype=torch.float64)
    for x, y in split.batches():
        sums += batch_sums(predict(model, y, precision, cfg.tta_flip), x, y, cfg.output, lossf)
    model.train(was_training)
    return sums


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: DeviceImages | EvalSplit, cfg: TrialConfig, batch_size: int = 256,
             precision: str | None = None) -> dict:
    """Loss in the model's own space; PSNR, SSIM, colourfulness in RGB; the grayscale baseline."""
    split = images if isinstance(images, EvalSplit) else EvalSplit.prepare(images, batch_size)
    return split.metrics(evaluate_sums(model, split, cfg, precision).tolist())


# ---------------------------------------------------------------- previews and checkpoints


def png_bytes(rgb_chw: torch.Tensor) -> bytes:
    arr = (rgb_chw.float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    buf = io.BytesIO()
    Image.fromarray(arr.squeeze(-1) if arr.shape[-1] == 1 else arr).save(buf, format="PNG")
    return buf.getvalue()


def original_previews(test_images: np.ndarray, count: int) -> dict[str, bytes]:
    """The originals and grayscale inputs of the preview images, written once per (dataset, resolution)
    by whoever writes results (never by trials): ``{"original_00012.png": png, "grayscale_00012.png": ...}``."""
    idx = preview_indices(len(test_images), count)
    if not idx:
        return {}
    x = torch.from_numpy(np.ascontiguousarray(test_images[idx])).permute(0, 3, 1, 2).float().div(255)
    y = rgb_to_y(x).clamp(0, 1)
    files = {}
    for k, i in enumerate(idx):
        files[f"original_{i:05d}.png"] = png_bytes(x[k])
        files[f"grayscale_{i:05d}.png"] = png_bytes(y[k])
    return files


def prediction_pngs(rgb: torch.Tensor, idx: Sequence[int]) -> dict[str, bytes]:
    """``prediction_<index>.png`` for a batch of RGB predictions of the test images ``idx``."""
    rgb = rgb.detach().float().cpu()  # one copy for the whole batch
    return {f"prediction_{i:05d}.png": png_bytes(rgb[k]) for k, i in enumerate(idx)}


@torch.no_grad()
def write_previews(model, test: DeviceImages, cfg: TrialConfig, folder: Path, precision: str | None = None) -> None:
    idx = preview_indices(len(test), cfg.preview_count)
    if not idx:
        return
    x = test.take(torch.tensor(idx, device=test.device))
    y = rgb_to_y(x)
    was_training = model.training
    model.eval()
    rgb = prediction_to_rgb(predict(model, y, precision, cfg.tta_flip), y, cfg.output)
    model.train(was_training)
    for name, data in prediction_pngs(rgb, idx).items():
        (folder / name).write_bytes(data)


def load_checkpoint(folder: Path | str, map_location="cpu") -> dict:
    # weights_only: a checkpoint never runs pickled code when loaded.
    return torch.load(Path(folder) / CHECKPOINT_FILE, map_location=map_location, weights_only=True)


def checkpoint_due(epoch: int, epochs: int, is_best: bool, last_epoch: int, last_time: float) -> bool:
    """Whether ``epoch`` writes a checkpoint (see CHECKPOINT_EVERY)."""
    return (is_best or epoch >= epochs or epoch - last_epoch >= CHECKPOINT_EVERY
            or time.monotonic() - last_time >= CHECKPOINT_SECONDS)


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


def checkpoint_folder(work_dir: Path, epoch: int) -> Path:
    """A new temporary checkpoint folder; its name carries the pid for sweep_stale_checkpoints."""
    return Path(tempfile.mkdtemp(prefix=f".ckpt-{epoch:03d}-{os.getpid()}-", dir=work_dir))


# ---------------------------------------------------------------- the trial


@dataclass
class TrialSetup:
    """What a trial and a fused pack (study.pack) both build before training."""
    device: torch.device
    compile_mode: str | None
    precision: str
    work_dir: Path
    train: DeviceImages
    val: EvalSplit
    test: EvalSplit
    eval_batch: int
    steps_per_epoch: int


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
    return TrialSetup(dev, mode, precision, work_dir, train, EvalSplit.prepare(val, eval_batch),
                      EvalSplit.prepare(test, eval_batch), eval_batch, max(len(train) // cfg.batch_size, 1))


def run_trial(cfg: TrialConfig, *, data_root: str | None = None, cache_dir: str | Path | None = None,
              device: str | None = None, report: Report | None = None, resume_from: Path | str | None = None,
              splits: Splits | None = None, log: Callable[[str], None] = print,
              work_dir: str | Path | None = None) -> list[dict]:
    """Train ``cfg`` for ``cfg.epochs`` epochs (continuing from ``resume_from``); returns the epoch rows.

    ``report(row, folder)`` is called once per epoch; ``folder`` is a temporary checkpoint folder under
    ``work_dir`` (default: the current directory) on epochs that write one (see CHECKPOINT_EVERY), else
    None. The folder is removed once ``report`` returns, also on error.
    """
    cfg.validate()
    setup = prepare_trial(cfg, device, data_root, cache_dir, splits, work_dir)
    dev, mode, precision, work_dir = setup.device, setup.compile_mode, setup.precision, setup.work_dir
    train, val_split, test_split, steps_per_epoch = setup.train, setup.val, setup.test, setup.steps_per_epoch
    test = test_split.images
    torch.manual_seed(cfg.seed)
    model = build_unet(cfg.model, cfg.image_size).to(dev, memory_format=torch.channels_last)
    opt = make_optimizer(model.parameters(), cfg.lr, dev, cfg.weight_decay)
    sched = make_scheduler(opt, cfg, cfg.epochs * steps_per_epoch, steps_per_epoch)
    gen = torch.Generator(device=dev).manual_seed(cfg.seed)
    step_loss = make_loss_step(model, cfg, dev, precision, mode)
    average = WeightAverage(model, cfg.ema) if cfg.ema > 0 else None
    evaluated = average.model if average else model  # what is evaluated, previewed and kept as "model"
    augment = cfg.augment_strength if cfg.augment else 0.0
    history: list[dict] = []
    start_epoch = 0
    if resume_from:
        state = load_checkpoint(resume_from, map_location=dev)
        model.load_state_dict(state.get("raw_model") or state["model"])
        if average:
            average.model.load_state_dict(state["model"])
            average.updates = state["epoch"] * steps_per_epoch
        opt.load_state_dict(state["optimizer"])
        if sched is not None and state.get("scheduler"):
            sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"].cpu())  # generator states live on the CPU
        set_rng_states(state.get("rng"), dev)
        start_epoch, history = state["epoch"], list(state["history"])
        log(f"resumed from {resume_from} after epoch {start_epoch}")
    last_saved, last_saved_at = start_epoch, time.monotonic()
    if start_epoch == 0:
        log(f"device {device_name(dev)}, precision {precision}, step {'compiled: ' + mode if mode else 'eager'}")

    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        loss_sum = torch.zeros((), device=dev, dtype=torch.float64)
        steps = 0
        for x in train.train_batches(cfg.batch_size, gen, augment):
            loss = step_loss(x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            if average is not None:
                average.update()
            loss_sum += loss.detach()
            steps += 1
        v_sums = evaluate_sums(evaluated, val_split, cfg, precision)
        t_sums = evaluate_sums(evaluated, test_split, cfg, precision)
        # The one sync of the epoch: the training loss and both splits' totals together.
        fetched = torch.cat([(loss_sum / max(steps, 1)).view(1), v_sums, t_sums]).tolist()
        train_loss = fetched[0]
        if not math.isfinite(train_loss):
            raise NonFiniteLossError(f"training loss became {train_loss} in epoch {epoch} "
                                     f"(lr={cfg.lr}, loss={cfg.loss}); lower the learning rate")
        v, t = val_split.metrics(fetched[1:5]), test_split.metrics(fetched[5:9])
        row = {"epoch": epoch, "train_loss": train_loss, "lr": opt.param_groups[0]["lr"],
               **{f"val_{k}": val_ for k, val_ in v.items()}, **{f"test_{k}": val_ for k, val_ in t.items()}}
        row["seconds"] = time.perf_counter() - t0
        row["precision"] = precision
        history.append(row)
        best = best_row(history)
        row.update(best_val_psnr=best["val_psnr"], best_epoch=best["epoch"])
        log(f"epoch {epoch}/{cfg.epochs}  train {train_loss:.4f}  val {v['loss']:.4f}  test {t['loss']:.4f}  "
            f"val PSNR {v['psnr']:.2f} dB (gray {v['gray_psnr']:.2f})  SSIM {v['ssim']:.3f}  "
            f"colour {v['colourfulness']:.2f}  {row['seconds']:.1f}s")

        if not checkpoint_due(epoch, cfg.epochs, best["epoch"] == epoch, last_saved, last_saved_at):
            if report is not None:
                report(dict(row), None)
            continue
        folder = checkpoint_folder(work_dir, epoch)
        try:
            # "model": the weights to use for inference (the average when ema is on); "raw_model": the
            # trained weights a resume continues from.
            torch.save({"model": evaluated.state_dict(), "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict() if sched is not None else None,
                        "generator": gen.get_state(), "rng": rng_states(dev), "epoch": epoch,
                        "history": history, "config": cfg.to_dict(),
                        **({"raw_model": model.state_dict()} if average else {})}, folder / CHECKPOINT_FILE)
            write_previews(evaluated, test, cfg, folder, precision)
            last_saved, last_saved_at = epoch, time.monotonic()
            if report is not None:
                report(dict(row), folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return history


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


def summarize(history: list[dict]) -> dict:
    best = best_row(history)
    return {"best_epoch": best["epoch"], "best_val_psnr": best["val_psnr"], "best_test_psnr": best["test_psnr"],
            "gray_val_psnr": best["val_gray_psnr"], "epochs": len(history)}
