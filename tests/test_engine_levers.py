"""The training levers of the engine (weight decay, weight averaging, augmentation, loss, warm-up, flip
averaging, chroma weighting): each does what it says, and the defaults change nothing."""
import numpy as np
import pytest
import torch

from study.config import UNetConfig
from study.config.trial import TrialConfig
from study.engine.checkpoints import load_checkpoint
from study.engine.color import prediction_to_rgb, rgb_to_y, target_for
from study.engine.data import DeviceImages, augment_batch
from study.engine.evaluation import evaluate
from study.engine.models import build_unet
from study.engine.optim import WeightAverage, make_optimizer, make_scheduler
from study.engine.terms import HUBER_DELTA, elementwise_loss
from study.engine.trial import run_trial

TINY = TrialConfig(dataset="samples", resolution=16, depth=2, base_filters=4, batch_size=16, eval_limit=32,
                   train_limit=64, epochs=2, preview_count=1)


def test_weight_decay_shrinks_weights_and_zero_keeps_adam():
    p = torch.nn.Parameter(torch.ones(4))
    assert type(make_optimizer([p], 1e-3, torch.device("cpu"))) is torch.optim.Adam
    opt = make_optimizer([p], 0.1, torch.device("cpu"), weight_decay=0.5)
    assert isinstance(opt, torch.optim.AdamW)
    p.grad = torch.zeros(4)  # no gradient: only the decoupled decay moves the weights
    opt.step()
    assert torch.allclose(p.detach(), torch.full((4,), 1 - 0.1 * 0.5))


def test_weight_average_follows_the_weights_on_the_device():
    torch.manual_seed(0)
    model = build_unet(UNetConfig(depth=1, base_filters=2), 16)
    avg = WeightAverage(model, decay=0.5)
    before = [p.detach().clone() for p in avg.model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    avg.update()  # decay warm-up: min(0.5, 2 / 11)
    d = 2 / 11
    for b, a, p in zip(before, avg.model.parameters(), model.parameters()):
        assert torch.allclose(a, d * b + (1 - d) * p.detach(), atol=1e-6)
        assert not a.requires_grad


def test_ema_weights_are_the_ones_evaluated_and_kept(cache_dir, tmp_path):
    cfg = TINY.replace(ema=0.9, lr=3e-3)
    kept = {}
    rows = run_trial(cfg, cache_dir=cache_dir, device="cpu", work_dir=tmp_path, log=lambda s: None,
                     report=lambda row, folder: kept.update(ckpt=load_checkpoint(folder)) if folder else None)
    state = kept["ckpt"]
    assert state["epoch"] == 2 and set(state) >= {"model", "raw_model"}
    assert any(not torch.equal(state["model"][k], state["raw_model"][k]) for k in state["model"])
    from study.engine.data import load_splits
    val = DeviceImages(load_splits("samples", 16, cache_dir=cache_dir, train_limit=64, eval_limit=32).val, "cpu")
    averaged, raw = build_unet(cfg.model, 16), build_unet(cfg.model, 16)
    averaged.load_state_dict(state["model"])
    raw.load_state_dict(state["raw_model"])
    assert evaluate(averaged, val, cfg, 256)["psnr"] == pytest.approx(rows[-1]["val_psnr"], rel=1e-6)
    assert evaluate(raw, val, cfg, 256)["psnr"] != pytest.approx(rows[-1]["val_psnr"], rel=1e-6)


def test_augmentation_shifts_and_flips_whole_images_and_zooms_above_one():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 16, 16)
    out = augment_batch(x, g, 1.0)
    pad = 2
    padded = torch.nn.functional.pad(x, (pad,) * 4, mode="reflect")
    for i in range(len(x)):  # every output is one flip + one shift of its own input
        matches = [(f, dy, dx) for f in (False, True) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                   if torch.equal(out[i], (padded[i].flip(2) if f else padded[i])[:, dy:dy + 16, dx:dx + 16])]
        matches += [(True, dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                    if torch.equal(out[i], torch.nn.functional.pad(x[i:i + 1].flip(3), (pad,) * 4,
                                                                   mode="reflect")[0, :, dy:dy + 16, dx:dx + 16])]
        assert matches, i
    zoomed = augment_batch(x, torch.Generator().manual_seed(0), 3.0)
    assert zoomed.shape == x.shape and 0 <= zoomed.min() and zoomed.max() <= 1
    assert not torch.allclose(zoomed, augment_batch(x, torch.Generator().manual_seed(0), 1.0))
    # Input and target are both made from the augmented RGB batch: they stay aligned.
    assert torch.allclose(prediction_to_rgb(target_for(zoomed, "uv"), rgb_to_y(zoomed), "uv"), zoomed, atol=1e-5)
    imgs = DeviceImages(np.zeros((8, 16, 16, 3), np.uint8), "cpu")
    assert len(list(imgs.train_batches(4, g, 0.0))) == 2


def test_huber_is_quadratic_near_zero_and_linear_far_away():
    small, large = torch.tensor([0.05]), torch.tensor([0.5])
    zero = torch.zeros(1)
    assert elementwise_loss(small, zero, "huber").item() == pytest.approx(0.5 * 0.05 ** 2)
    assert elementwise_loss(large, zero, "huber").item() == pytest.approx(HUBER_DELTA * (0.5 - 0.5 * HUBER_DELTA))


def test_members_with_different_losses_each_get_their_own():
    from study.engine.terms import PackTerms, member_loss
    diff = torch.linspace(-0.6, 0.6, 49)
    pred = torch.stack([diff] * 4, dim=1)                      # (N, K): member k's predictions in column k
    names = ["mse", "l1", "huber", "l1"]
    cfgs = [TrialConfig(loss=n) for n in names]
    got = member_loss(pred, torch.zeros_like(pred), PackTerms.of(cfgs, None, torch.device("cpu")), member_dim=1)
    for k, name in enumerate(names):
        ref = {"mse": diff.square(), "l1": diff.abs(),
               "huber": torch.where(diff.abs() < HUBER_DELTA, 0.5 * diff.square(),
                                    HUBER_DELTA * (diff.abs() - 0.5 * HUBER_DELTA))}[name]
        assert torch.allclose(got[:, k], ref, atol=1e-7), name
    # Members sharing a loss: its formula as for one model.
    shared = PackTerms.of(cfgs[1:2] * 2, None, torch.device("cpu"))
    assert shared.loss == "l1" and shared.l1 is None
    assert torch.equal(member_loss(pred[:, :2], torch.zeros_like(pred[:, :2]), shared, 1), pred[:, :2].abs())


def test_warmup_then_schedule():
    def lrs(cfg, total=20, per_epoch=5):
        opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
        sched = make_scheduler(opt, cfg, total, per_epoch)
        out = []
        for _ in range(total):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    cfg = TrialConfig(lr=1.0, schedule="cosine", warmup_epochs=1, epochs=4)
    got = lrs(cfg)
    assert got[0] == pytest.approx(1 / 6) and got[:6] == sorted(got[:6]) and got[5] == pytest.approx(1.0)
    assert got[6:] == sorted(got[6:], reverse=True) and got[-1] < 0.05
    flat = lrs(cfg.replace(schedule="none"))
    assert flat[0] == pytest.approx(1 / 6) and flat[5:] == [pytest.approx(1.0)] * 15
    one = lrs(cfg.replace(schedule="onecycle"))
    assert int(np.argmax(one)) == 4  # one-cycle's rise takes the warm-up's 5 steps (peak at the 5th)
    # Defaults: the schedules as they were.
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    assert type(make_scheduler(opt, cfg.replace(warmup_epochs=0), 20, 5)) is torch.optim.lr_scheduler.CosineAnnealingLR
    assert make_scheduler(opt, TrialConfig(), 20, 5) is None


def test_flip_averaging_is_exact_for_a_mirror_equivariant_model_and_evaluated():
    from study.engine.evaluation import predict
    y = torch.rand(2, 1, 16, 16)
    conv = torch.nn.Conv2d(1, 2, 3, padding=1)
    with torch.no_grad():  # a kernel symmetric left-right: conv(mirror(y)) == mirror(conv(y))
        conv.weight.copy_((conv.weight + conv.weight.flip(3)) / 2)
    assert torch.allclose(predict(conv, y, flip=True), conv(y), atol=1e-6)
    torch.manual_seed(0)
    model = build_unet(UNetConfig(depth=2, base_filters=4), 16).eval()
    plain, flipped = predict(model, y), predict(model, y, flip=True)
    assert not torch.allclose(plain, flipped)
    assert torch.allclose(flipped, (plain + model(y.flip(3)).flip(3)) / 2, atol=1e-6)
    val = DeviceImages((np.random.default_rng(0).random((8, 16, 16, 3)) * 255).astype(np.uint8), "cpu")
    with torch.no_grad():
        a, b = evaluate(model, val, TINY, 8), evaluate(model, val, TINY.replace(tta_flip=True), 8)
    assert a["gray_psnr"] == b["gray_psnr"] and a["psnr"] != b["psnr"]


def test_chroma_weights_average_one_and_favour_saturated_pixels():
    from study.engine.fused import FusedUNet
    from study.engine.losses import chroma_weights, member_losses
    from study.engine.terms import PackTerms
    g = torch.Generator().manual_seed(0)
    gray = torch.rand(4, 1, 8, 8, generator=g).expand(-1, 3, -1, -1).clone()
    x = gray.clone()
    x[:, 0, :4] = 1.0   # saturated red in the top half of each image
    x[:, 1:, :4] = 0.0
    w = chroma_weights(target_for(x, "uv"), 3.0)
    assert w.shape == (4, 1, 8, 8) and w.mean().item() == pytest.approx(1.0, abs=1e-5)
    assert (w[:, :, :4] > 1).all() and (w[:, :, 4:] < 1).all()
    assert torch.equal(chroma_weights(target_for(x, "uv"), 0.0), torch.ones_like(w))
    # Per member in a pack: each member's weights average 1 on its own batch.
    uv = torch.stack([target_for(x, "uv"), target_for(gray * 0.5 + x * 0.5, "uv")], dim=1)   # (B, K, 2, H, W)
    wk = chroma_weights(uv, torch.tensor([3.0, 1.0]).view(1, 2, 1, 1, 1), channel_dim=2, member_dim=1)
    assert wk.mean(dim=(0, 2, 3, 4)).tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    # In the training loss: an error on the saturated half costs more than the same error on the gray half.
    model = build_unet(UNetConfig(depth=1, base_filters=4, gray_start=True), 8)   # predicts U = V = 0

    def loss(cfg):
        return member_losses(FusedUNet([model]), PackTerms.of([cfg], None, torch.device("cpu")), "fp32", x[None])[0]

    plain, vivid = loss(TrialConfig(chroma_weight=0.0)), loss(TrialConfig(chroma_weight=3.0))
    assert vivid.item() > 1.5 * plain.item()
