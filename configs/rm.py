r"""Step 2: the reward model on K-way rankings (or chosen/rejected pairs).

The embedded default (runs the earlier stages first if needed):
  python launch/train.py --config=configs/rm.py --workdir=runs/demo

Your own data, starting from your SFT workdir (or any HF causal LM dir):
  python launch/train.py --config=configs/rm.py --workdir=runs/rm --config.task= \
    --config.model.init_from=runs/sft \
    --config.data.train.path=data/comparisons.jsonl \
    --config.data.eval.path=data/comparisons_eval.jsonl \
    --config.data.norm.path=data/sft_train.jsonl --config.optim.lr=9e-6

Rows are {"prompt", "chosen", "rejected"} or {"prompt", "responses": [...], "ranks": [...]}.
Smoke test: --config=configs/rm.py:tiny
"""

from rlhf_jax import config as config_lib
from rlhf_jax.pipeline import settings


def get_config(arg=None):
  c = config_lib.apply_variant(config_lib.rm_config(), arg)
  c.pipeline = settings.task_settings(arg)   # the built-in task's sizes (config.task='default')
  return c
