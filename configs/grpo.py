r"""Critic-free online RL — GRPO, Dr. GRPO, RLOO, REINFORCE++ — and, by default, the pipeline.

On a fresh machine (no downloads) this trains the built-in task's pretrain -> SFT -> RM
stages (reusing finished ones), then GRPO against the RM, and evaluates the GRPO policy
against SFT as the PPO pipeline does (oracle win rate, KL, alignment tax, unsafe rate):
  python launch/train.py --config=configs/grpo.py --workdir=runs/grpo

Your own models and data (a reward model, a reward function, or both, as in PPO):
  python launch/train.py --config=configs/grpo.py --workdir=runs/grpo --config.task= \
    --config.model.init_from=runs/sft --config.ppo.reward_fn=data/my_rewards.py:score \
    --config.data.train.path=data/prompts.jsonl --config.grpo.estimator=rloo \
    --config.grpo.group_size=4

`grpo.estimator` picks the advantage: grpo | dr_grpo | rloo | reinforce_pp. The fields PPO
already has (reward sources, rollout, epochs / minibatches, clip ε, β) stay in `ppo.*`.

Smoke test: --config=configs/grpo.py:tiny
"""

from rlhf_jax import config as config_lib
from rlhf_jax.pipeline import settings


def get_config(arg=None):
  c = config_lib.apply_variant(config_lib.grpo_config(), arg)
  if "tiny" in config_lib.variants(arg):
    c.train.batch_size = 8      # prompts: 8 x grpo.group_size = 32 responses per rollout
  c.pipeline = settings.task_settings(arg)   # the built-in task's sizes (config.task='default')
  return c
