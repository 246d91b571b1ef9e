r"""Samples K responses per prompt from a policy: the rows a labeler ranks for the RM stage.

  python launch/sample.py --model=runs/sft --prompts=data/prompts.jsonl \
    --out=data/samples.jsonl --num_samples=4 --max_new_tokens=128 --temperature=1.0

--model is a run's workdir (its export/policy), an exported policy dir or any HF causal-LM
directory with its tokenizer. --prompts rows hold a "prompt" text (or --prompt_column) or
chat "messages". Each output line is {"prompt" (or "messages"), "responses": [K texts],
"finished": [K bools]}; add "ranks" (lower = better) and train the reward model on it:

  python launch/train.py --config=configs/rm.py --workdir=runs/rm --config.task= \
    --config.model.init_from=runs/sft --config.data.train.path=data/ranked.jsonl

Intentionally short: the logic lives in `rlhf_jax.sample_responses`, where it is tested.
Sampling is split over the mesh's ('data', 'fsdp') axes (--mesh, default data=-1: every
device); clusters start as for launch/train.py (--coordinator_address/--num_processes/
--process_id, or SLURM / TPU pods automatically).
"""

import logging
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import sampling_flags as sf  # noqa: E402  (beside this script: the shared sampling flags)

_MODEL = flags.DEFINE_string("model", None, "Policy: a workdir, its export/policy, or an HF "
                             "causal-LM dir (with its tokenizer).")
_PROMPTS = flags.DEFINE_string("prompts", None, "Prompts file (.jsonl/.json/.parquet/.csv).")
_OUT = flags.DEFINE_string("out", None, "Output .jsonl (written atomically by process 0).")
_NUM = flags.DEFINE_integer("num_samples", 4, "Responses per prompt (K).")
_TEMP = flags.DEFINE_float("temperature", 1.0, "Sampling temperature.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Prompts per generate call (x num_samples "
                              "rows).")
flags.mark_flags_as_required(["model", "prompts", "out"])


def main(argv):
  del argv
  from rlhf_jax import sample_responses
  from rlhf_jax.errors import UserError
  try:
    sf.start()
    settings = sf.settings(_NUM.value, _TEMP.value, _SEED.value, _BATCH.value)
    summary = sample_responses.run(_MODEL.value, _PROMPTS.value, _OUT.value, settings,
                                   sf.MESH.value, sf.COLUMN.value, sf.MAX_PROMPT.value,
                                   sf.BAD.value, sf.DTYPE.value)
  except UserError as e:
    sf.user_error(str(e))
  logging.getLogger("rlhf_jax").info(
      "wrote %d prompts x %d responses (%.0f%% finished) to %s", summary["prompts"],
      summary["num_samples"], 100 * summary["finished"], summary["out"])


if __name__ == "__main__":
  app.run(main, flags_parser=sf.parse_flags)
