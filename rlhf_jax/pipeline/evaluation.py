"""The paper's evaluation on the built-in task (InstructGPT §4, in miniature).

On held-out prompts: the oracle's win rate of PPO-ptx (and plain PPO) over SFT, ties counting
half (the paper's Fig. 1 is this against the 175B SFT model); the RM's pairwise accuracy on
held-out rankings; the mean KL(π || π_SFT) of each RL policy on its own samples; the
pretraining-corpus loss of every model (the "alignment tax", §4.2 / Fig. 28-29); and the
unsafe-token rate per model. Writes `<workdir>/eval.json`, `report.md` and PNG plots.

Multi-process runs: every process evaluates alike (each on its own first device, with no
collective: sampling keys, prompts and models are the same everywhere), process 0 alone
writes the files, and all leave together (`distributed.barrier`), so that the command's end
means the report is on disk.

    python -m rlhf_jax.pipeline.evaluation --workdir=runs/demo     # re-run on its own
"""

from __future__ import annotations

import json
import logging
import os

import jax
import numpy as np

from rlhf_jax import data, distributed, generation, models, tasks
from rlhf_jax import workdir as workdir_lib
from rlhf_jax.pipeline import report
from rlhf_jax.pipeline.settings import MAX_LEN, MAX_NEW_TOKENS, MAX_PROMPT_LEN

log = logging.getLogger("rlhf_jax")


def _rm_accuracy(k: int, seed: int, workdir: str, task_dir: str, tokenizer) -> float:
  """Pairwise accuracy of the normalised RM against the oracle's noiseless ordering."""
  rm_dir = workdir_lib.resolve_model_dir(os.path.join(workdir, "rm"), "scalar")
  cfg, params = models.load_hf(rm_dir)
  spec = data.DataSpec(path=os.path.join(task_dir, "comparisons_eval.jsonl"))
  rows = data.load_comparisons(spec, tokenizer, MAX_PROMPT_LEN, MAX_LEN, k)
  a = rows.arrays
  n, k, t = a["input_ids"].shape
  fn = jax.jit(lambda p, i, m, l: models.scores(cfg, p, i, m, l))
  r = np.asarray(fn(params, a["input_ids"].reshape(n * k, t),
                    a["attention_mask"].reshape(n * k, t),
                    a["last_index"].reshape(n * k))).reshape(n, k)
  # Oracle truth: the noiseless score of each (prompt, response) text.
  oracle = tasks.Oracle(seed=seed)
  raw_rows = [json.loads(line) for line in open(spec.path)]
  correct = total = 0
  for i, row_idx in enumerate(rows.row_ids):
    row = raw_rows[row_idx]
    truth = [oracle.score(row["prompt"], resp, fin)
             for resp, fin in zip(row["responses"], row["finished"])]
    for x in range(len(truth)):
      for y in range(len(truth)):
        if a["valid"][i, x] and a["valid"][i, y] and truth[x] > truth[y]:
          total += 1
          correct += int(r[i, x] > r[i, y])
  return correct / max(total, 1)



def win_rate_ceiling(sft_scores) -> float:
  """The highest win rate over these SFT samples any policy can reach: a perfect response
  (score 1, the oracle's maximum) beats every imperfect SFT sample and ties a perfect one,
  which counts 0.5 (`Oracle.prefers`). So the ceiling is 1 - P(SFT sample perfect) / 2."""
  perfect = np.isclose(np.asarray(sft_scores, dtype=np.float64), 1.0, rtol=0.0, atol=1e-9)
  return float(np.mean(np.where(perfect, 0.5, 1.0)))


def evaluate(settings, seed: int, temperature: float, workdir: str, task_dir: str,
             method: str = "ppo") -> dict:
  """The evaluation of a finished pipeline in `workdir` (see the module docstring).

  Args:
    settings: the `pipeline` block (`settings.task_settings`): `k`, `compare_no_ptx`.
    seed: the run's seed (the oracle's and the samples').
    temperature: the sampling temperature of PPO's rollouts, used here too.
    method: the stage whose policy is compared with SFT ("ppo", or "dpo" trained on the
      RM's rankings); plain PPO joins "ppo" when `compare_no_ptx`. The RM's accuracy is
      measured when `<workdir>/rm` holds one (None otherwise).
  """
  log.info("[eval] oracle win rates, RM accuracy, KL and alignment tax on held-out prompts")
  tokenizer = workdir_lib.read_tokenizer(os.path.join(task_dir, "tokenizer"))
  oracle = tasks.Oracle(seed=seed)
  prompts = data.load_prompts(data.DataSpec(path=os.path.join(task_dir, "prompts_eval.jsonl")),
                              tokenizer, MAX_PROMPT_LEN)
  ids, mask, texts = prompts.arrays["input_ids"], prompts.arrays["attention_mask"], prompts.texts
  corpus = data.load_text(data.DataSpec(path=os.path.join(task_dir, "pretrain_eval.jsonl")),
                          tokenizer, MAX_LEN, pack=True)
  names = ["sft", method] + (["ppo_noptx"] if method == "ppo" and settings.compare_no_ptx
                             else [])
  policies = {}
  for name in names:
    policies[name] = generation.load_policy(
        workdir_lib.resolve_model_dir(os.path.join(workdir, name), "causal"))
  key = jax.random.PRNGKey(seed + 12345)
  samples, scores, unsafe, pretrain_loss = {}, {}, {}, {}
  for name, (cfg, params) in policies.items():
    samples[name] = generation.generate_responses(
        cfg, params, tokenizer, ids, mask, key, max_new_tokens=MAX_NEW_TOKENS,
        batch_size=64, temperature=temperature)
    scores[name] = [oracle.score(p, r, bool(f)) for p, r, f in
                    zip(texts, samples[name].texts, samples[name].has_eos)]
    unsafe[name] = float(np.mean([tasks.UNSAFE in r.split() for r in samples[name].texts]))
    # Batches of at most the corpus's rows: a short held-out corpus (the :tiny task packs
    # into fewer than 64 rows) would otherwise give no full batch and a loss of 0.
    pretrain_loss[name] = generation.lm_loss(
        cfg, params, corpus.arrays, batch_size=min(64, len(corpus.arrays["input_ids"])),
        max_batches=16)
  sft_cfg, sft_params = policies["sft"]
  win_rate, kl = {}, {}
  for name in names[1:]:
    ours, base = samples[name], samples["sft"]
    wins = [oracle.prefers(p, a, b, bool(fa), bool(fb)) for p, a, b, fa, fb in
            zip(texts, ours.texts, base.texts, ours.has_eos, base.has_eos)]
    win_rate[name] = float(np.mean(wins))
    cfg, params = policies[name]
    s = samples[name]
    lp = generation.sequence_logprob_sums(cfg, params, ids, mask, s.tokens, s.mask,
                                          temperature=temperature)
    lp_sft = generation.sequence_logprob_sums(sft_cfg, sft_params, ids, mask, s.tokens, s.mask,
                                              temperature=temperature)
    kl[name] = float(np.mean(lp - lp_sft))
  result = dict(
      method=method, oracle_win_rate=win_rate[method],
      oracle_win_rate_ceiling=win_rate_ceiling(scores["sft"]),
      oracle_win_rate_no_ptx=win_rate.get("ppo_noptx"),
      rm_accuracy=_rm_accuracy(settings.k, seed, workdir, task_dir, tokenizer)
      if os.path.isdir(os.path.join(workdir, "rm", "export")) else None,
      kl_to_sft=kl[method], kl_to_sft_no_ptx=kl.get("ppo_noptx"),
      pretrain_loss=pretrain_loss,
      alignment_tax={n: pretrain_loss[n] - pretrain_loss["sft"] for n in names[1:]},
      unsafe_rate=unsafe,
      oracle_score={n: float(np.mean(v)) for n, v in scores.items()},
      eos_rate={n: float(np.mean(samples[n].has_eos)) for n in names},
      n_prompts=len(texts), temperature=temperature, seed=seed)
  if distributed.is_main_process():
    with open(os.path.join(workdir, "eval.json"), "w") as f:
      json.dump(result, f, indent=2)
    report.write(workdir, result, texts, samples, scores)
  distributed.barrier("pipeline: evaluation written")
  log.info("[eval] %s", json.dumps({k: result[k] for k in (
      "oracle_win_rate", "rm_accuracy", "kl_to_sft", "alignment_tax", "unsafe_rate")}))
  return result


def main(argv=None):
  import argparse
  from rlhf_jax import config as config_lib
  from rlhf_jax.pipeline import settings
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  evaluate(settings.task_settings(), args.seed, config_lib.ppo_config().ppo.temperature,
           args.workdir, os.path.join(args.workdir, "task_data"))


if __name__ == "__main__":
  main()
