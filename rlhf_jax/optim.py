"""Optimiser and learning-rate schedules from `config.optim` (optax)."""

from __future__ import annotations

import optax


def schedule(optim_cfg, total_steps: int) -> optax.Schedule:
  """Linear warmup, then cosine / linear decay to `final_lr_frac * lr`, or constant.

  InstructGPT (Ouyang et al. 2022, App. C) decays SFT and RM learning rates with a cosine
  schedule to 10 % of the peak; that is the default here.
  """
  lr = float(optim_cfg.lr)
  warmup = int(min(optim_cfg.warmup_steps, max(total_steps - 1, 0)))
  decay_steps = max(total_steps - warmup, 1)
  end = lr * float(optim_cfg.final_lr_frac)
  if optim_cfg.schedule == "cosine":
    decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=optim_cfg.final_lr_frac)
  elif optim_cfg.schedule == "linear":
    decay = optax.linear_schedule(lr, end, decay_steps)
  else:
    decay = optax.constant_schedule(lr)
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def make_optimizer(optim_cfg, total_steps: int, lr_scale: float = 1.0
                   ) -> optax.GradientTransformation:
  """AdamW with global-norm clipping; `lr_scale` scales the whole schedule (e.g. value lr)."""
  sched = schedule(optim_cfg, total_steps)
  if lr_scale != 1.0:
    base = sched
    sched = lambda step: base(step) * lr_scale  # noqa: E731
  parts = []
  if optim_cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(optim_cfg.grad_clip))
  parts.append(optax.adamw(sched, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                           weight_decay=optim_cfg.weight_decay))
  return optax.chain(*parts)
