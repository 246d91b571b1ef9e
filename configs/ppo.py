r"""Step 3: PPO-ptx against the reward model — and, by default, the whole pipeline.

On a fresh machine (no downloads) this pretrains a tiny base model on the built-in task's
corpus, runs SFT, collects K-way rankings from the hidden oracle labeler, trains the RM,
runs PPO-ptx (and plain PPO for comparison) and evaluates, reusing finished stages:
  python launch/train.py --config=configs/ppo.py --workdir=runs/demo

Your own models and data:
  python launch/train.py --config=configs/ppo.py --workdir=runs/ppo --config.task= \
    --config.model.init_from=runs/sft --config.ppo.reward_from=runs/rm \
    --config.data.train.path=data/prompts.jsonl --config.data.ptx.path=data/pretrain.jsonl \
    --config.ppo.ptx_coef=27.8 --config.ppo.kl_coef=0.02

Smoke test: --config=configs/ppo.py:tiny
"""

from rlhf_jax import config as config_lib
from rlhf_jax.pipeline import settings


def get_config(arg=None):
  c = config_lib.apply_variant(config_lib.ppo_config(), arg)
  c.pipeline = settings.task_settings(arg)   # the built-in task's sizes (config.task='default')
  return c
