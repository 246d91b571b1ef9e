r"""Evaluates a policy against a baseline on your prompts, as InstructGPT §4 does.

  python launch/evaluate.py --policy=runs/ppo --baseline=runs/sft \
    --prompts=data/prompts_eval.jsonl --reward_model=runs/rm
  python launch/evaluate.py --policy=runs/ppo --baseline=runs/sft \
    --prompts=data/prompts_eval.jsonl --reward_fn=my_rewards.py:score --out_dir=runs/eval

Each policy answers every prompt once; the reward model (normalised with its
reward_normalization.json) and/or the reward function fn(prompts, responses) -> scores judge
each pair. Writes to --out_dir (default: the policy's workdir): eval.json (win rate of the
policy over the baseline per judge, ties counting half, with a 95% Wilson interval; mean
scores; KL(policy || baseline) per response; mean response lengths; n prompts),
eval_samples.jsonl (every prompt, both responses, their scores), report.md, score_hist.png and
score_diff.png.

Intentionally short: the logic lives in `rlhf_jax.compare`, where it is tested.
"""

import logging
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import sampling_flags as sf  # noqa: E402  (beside this script: the shared sampling flags)

_POLICY = flags.DEFINE_string("policy", None, "Policy A: a workdir, its export/policy, or an "
                              "HF causal-LM dir.")
_BASELINE = flags.DEFINE_string("baseline", None, "Policy B, the baseline (same tokenizer).")
_PROMPTS = flags.DEFINE_string("prompts", None, "Prompts file (.jsonl/.json/.parquet/.csv).")
_RM = flags.DEFINE_string("reward_model", "", "Judge: an RM workdir, its export/reward_model "
                          "or an HF sequence-classification dir.")
_RFN = flags.DEFINE_string("reward_fn", "", "Judge: path/to/file.py:function or "
                           "module:function, fn(prompts, responses) -> list of floats.")
_OUT = flags.DEFINE_string("out_dir", "", "Where to write (default: the policy's workdir).")
_TEMP = flags.DEFINE_float("temperature", 1.0, "Sampling temperature (also of the KL).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed (the same for both policies).")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Prompts per generate / scoring call.")
_SAMPLES = flags.DEFINE_integer("report_samples", 8, "Sample rows shown in report.md.")
flags.mark_flags_as_required(["policy", "baseline", "prompts"])


def main(argv):
  del argv
  from rlhf_jax import compare
  from rlhf_jax.errors import UserError
  try:
    sf.start()
    settings = sf.settings(1, _TEMP.value, _SEED.value, _BATCH.value)
    request = compare.Request(
        policy=_POLICY.value, baseline=_BASELINE.value, prompts=_PROMPTS.value,
        reward_model=_RM.value, reward_fn=_RFN.value, out_dir=_OUT.value, settings=settings,
        prompt_column=sf.COLUMN.value, max_prompt_len=sf.MAX_PROMPT.value, on_bad_row=sf.BAD.value,
        mesh=sf.MESH.value, dtype=sf.DTYPE.value, report_samples=_SAMPLES.value)
    result = compare.evaluate(request)
  except UserError as e:
    sf.user_error(str(e))
  log = logging.getLogger("rlhf_jax")
  for judge in result["judges"]:
    lo, hi = result["win_rate_ci95"][judge]
    log.info("win rate (%s): %.3f [%.3f, %.3f] over %d prompts", judge,
             result["win_rate"][judge], lo, hi, result["n_prompts"])


if __name__ == "__main__":
  app.run(main, flags_parser=sf.parse_flags)
