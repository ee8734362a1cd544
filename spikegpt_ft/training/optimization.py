"""The optimiser and learning-rate schedule of a training run: AdamW with warm-up and decay."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

SCHEDULES = ("linear", "cosine", "constant")


@dataclass(frozen=True)
class Optimization:
    """AdamW and its schedule.

    Args:
        lr: peak learning rate.
        weight_decay: AdamW's decoupled weight decay.
        decay_vectors: also decay the 1-D parameters (LayerNorms, biases, decays, mixes), as torch's AdamW does
            when given every parameter; the default decays matrices only.
        betas: AdamW's (beta1, beta2).
        eps: AdamW's epsilon.
        warmup_ratio: share of the steps over which the learning rate rises linearly from lr / (steps + 1).
        schedule: after the warm-up: linear decay to 0, cosine decay to 0, or constant.
    """

    lr: float = 1e-4
    weight_decay: float = 0.01
    decay_vectors: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_ratio: float = 0.06
    schedule: str = "linear"

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if not self.eps > 0:
            raise ValueError(f"eps must be positive, got {self.eps}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")

    def build(self, model: nn.Module, total_steps: int) -> dict:
        """The optimiser over ``model``'s trainable parameters and its per-step scheduler (Lightning's format)."""
        decay, no_decay = [], []
        for p in model.parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 or self.decay_vectors else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(
            [g for g in groups if g["params"]], lr=self.lr, betas=tuple(self.betas), eps=self.eps
        )
        total = max(1, int(total_steps))
        warm = min(total - 1, max(1, round(self.warmup_ratio * total))) if self.warmup_ratio > 0 else 0
        sched = torch.optim.lr_scheduler
        if self.schedule == "cosine":
            after = sched.CosineAnnealingLR(optimizer, T_max=max(1, total - warm), eta_min=0.0)
        elif self.schedule == "linear":
            after = sched.LinearLR(optimizer, 1.0, 0.0, total_iters=max(1, total - warm))
        else:
            after = sched.ConstantLR(optimizer, 1.0, total_iters=0)
        if warm > 0:
            warmup = sched.LinearLR(optimizer, start_factor=1.0 / (warm + 1), end_factor=1.0, total_iters=warm)
            scheduler = sched.SequentialLR(optimizer, [warmup, after], milestones=[warm])
        else:
            scheduler = after
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
