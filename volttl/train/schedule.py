"""The learning-rate schedules of ``train.schedule``, each named: a factor of the
optimiser step per parameter group, for ``torch.optim.lr_scheduler.LambdaLR``.

- ``cosine``: linear warm-up over ``train.warmup_epochs``, then cosine annealing to 0 at
  the last epoch (the TTL paper's "cosine annealing").
- ``penet``: PENet's released ``cosine_warmup`` schedule, counted in training examples:
  warm-up over ``warmup_examples``, pretrained weights held at 0 for
  ``pretrained_delay_examples``, cosine to 0 at ``cosine_examples``.
"""

from __future__ import annotations

import math

from volttl.config import Config


def penet_factor(warmup: int, delay: int, total: int):
    """LR factor at a number of training examples seen, PENet's way: 0 until ``delay``,
    linear warm-up over ``warmup`` examples, then cosine down to 0 at ``total`` examples
    (and 0 after)."""

    def factor(examples: float) -> float:
        e = examples - delay
        if e < 0:
            return 0.0
        if warmup and e < warmup:
            return e / warmup
        progress = (e - warmup) / max(1.0, total - delay - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def cosine_schedule(cfg: Config, group_names: list[str], steps_per_epoch: int,
                    examples_per_step: int) -> list:
    """``train.schedule: cosine``: every group warms up over ``warmup_epochs``, then
    follows a cosine to 0 at the last epoch."""
    tc = cfg.train
    rule = warmup_cosine(steps_per_epoch * tc.epochs, steps_per_epoch * tc.warmup_epochs)
    return [rule for _ in group_names]


def penet_schedule(cfg: Config, group_names: list[str], steps_per_epoch: int,
                   examples_per_step: int) -> list:
    """``train.schedule: penet``: PENet's released schedule, counted in training examples;
    the pretrained group starts only after ``pretrained_delay_examples``."""
    tc = cfg.train
    out = []
    for name in group_names:
        delay = tc.pretrained_delay_examples if name == "pretrained" else 0
        rule = penet_factor(tc.warmup_examples, delay, tc.cosine_examples)
        out.append(lambda step, rule=rule: rule(step * examples_per_step))
    return out


SCHEDULES = {"cosine": cosine_schedule, "penet": penet_schedule}


def lr_factors(cfg: Config, group_names: list[str], steps_per_epoch: int, examples_per_step: int) -> list:
    """One LR factor function of the optimiser step per parameter group, by ``train.schedule``."""
    return SCHEDULES[cfg.train.schedule](cfg, group_names, steps_per_epoch, examples_per_step)


def warmup_cosine(total_steps: int, warmup_steps: int):
    """LR factor per optimiser step: linear warm-up, then cosine down to zero."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor
