"""The learning-rate schedules of ``train.schedule``, each named: a factor of the
optimiser step per parameter group, for ``torch.optim.lr_scheduler.LambdaLR``.

- ``cosine``: linear warm-up over ``train.warmup_epochs``, then cosine annealing to 0 at
  the last epoch (the TTL paper's "cosine annealing").
- ``penet``: PENet's released ``cosine_warmup`` schedule, counted in training examples:
  warm-up over ``warmup_examples``, pretrained weights held at 0 for
  ``pretrained_delay_examples``, cosine to 0 at ``cosine_examples`` (counted from each
  group's start); 0 after it, so epochs past its end train nothing (said at start).
"""

from __future__ import annotations

import math

from volttl.config import Config


def penet_factor(warmup: int, delay: int, total: int):
    """LR factor at a number of training examples seen, as PENet's ``linear_warmup_then_cosine``
    (``util/optim_util.py``) computes it: 0 until ``delay``; then, counting from the delay, a
    linear warm-up over ``warmup`` examples and ``(1 + cos(pi * (e - warmup) / total)) / 2``
    until ``total`` examples, 0 after. A delayed group so ends ``delay`` examples later."""

    def factor(examples: float) -> float:
        e = examples - delay
        if e < 0:
            return 0.0
        if warmup and e < warmup:
            return e / warmup
        if e < total:
            return 0.5 * (1 + math.cos(math.pi * (e - warmup) / total))
        return 0.0

    return factor


def schedule_end_epoch(cfg: Config, group_names: list[str], steps_per_epoch: int,
                       examples_per_step: int) -> int | None:
    """The first epoch (1-based) after which every group's learning rate is 0 under
    ``train.schedule: penet``; None for ``cosine``, which ends with the last epoch."""
    tc = cfg.train
    if tc.schedule != "penet":
        return None
    delay = tc.pretrained_delay_examples if "pretrained" in group_names else 0
    return math.ceil((delay + tc.cosine_examples) / (steps_per_epoch * examples_per_step))


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
