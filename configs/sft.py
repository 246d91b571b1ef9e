r"""Step 1: supervised fine-tuning on demonstrations.

The embedded default (no downloads; pretrains the base model first if needed):
  python launch/train.py --config=configs/sft.py --workdir=runs/demo

Your own model and data (prompt/completion jsonl, or chat `messages`):
  python launch/train.py --config=configs/sft.py --workdir=runs/sft --config.task= \
    --config.model.init_from=/models/Qwen2-0.5B \
    --config.data.train.path=data/sft_train.jsonl --config.data.eval.path=data/sft_eval.jsonl \
    --config.data.max_prompt_len=256 --config.data.max_len=512 --config.optim.lr=1e-5

Smoke test: --config=configs/sft.py:tiny
"""

from rlhf_jax import config as config_lib
from rlhf_jax.pipeline import settings


def get_config(arg=None):
  c = config_lib.apply_variant(config_lib.sft_config("sft"), arg)
  c.pipeline = settings.task_settings(arg)   # the built-in task's sizes (config.task='default')
  return c
