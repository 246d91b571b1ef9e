r"""Offline RLHF: DPO from the SFT model on the comparisons the reward model is trained on.

The embedded default (no downloads): pretrains the tiny base model, runs SFT, collects the
hidden oracle's K-way rankings of SFT samples (the RM's data), trains DPO on them from the
SFT model and evaluates it against SFT like the PPO pipeline (oracle win rate, KL, tax):
  python launch/train.py --config=configs/dpo.py --workdir=runs/demo

Your own data, from your SFT workdir (or any HF causal LM dir):
  python launch/train.py --config=configs/dpo.py --workdir=runs/dpo --config.task= \
    --config.model.init_from=runs/sft \
    --config.data.train.path=data/comparisons.jsonl \
    --config.data.eval.path=data/comparisons_eval.jsonl --config.dpo.beta=0.1

Rows are {"prompt", "chosen", "rejected"} or {"prompt", "responses": [...], "ranks": [...]}
(ties allowed). K-way rows: --config.dpo.rankings=plackett_luce (default: one
Plackett-Luce likelihood per ranking) or all_pairs (every pair of different ranks; needed for
--config.dpo.loss=ipo and --config.dpo.label_smoothing). Smoke test: --config=configs/dpo.py:tiny
"""

from rlhf_jax import config as config_lib
from rlhf_jax.pipeline import settings


def get_config(arg=None):
  c = config_lib.apply_variant(config_lib.dpo_config(), arg)
  c.pipeline = settings.task_settings(arg)   # the built-in task's sizes (config.task='default')
  return c
