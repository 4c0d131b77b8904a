"""One trial in the training loop: its model, optimizer, schedule, generator, weight average,
discriminator and history, and its checkpoint state (study.engine.checkpoints)."""
from __future__ import annotations

import torch

from study.config import ConfigError, TrialConfig
from study.engine.adversarial import Critic
from study.engine.models import UNet, build_unet
from study.engine.optim import WeightAverage, make_optimizer, make_scheduler


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
