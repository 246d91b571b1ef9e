"""`launch/evaluate.py`: a policy against a baseline on your prompts (InstructGPT §4).

Both policies answer every prompt once (the same seed, so a policy compared with itself
gives the same samples); a judge scores each response, a reward model (normalised with its
`reward_normalization.json`, `objectives.normalized_scores`) and/or a reward function
``fn(prompts, responses) -> scores``. Per judge:

  * win rate of the policy over the baseline: the mean over prompts of 1 (policy scored
    higher), 1/2 (equal scores) or 0, as the built-in task's evaluation counts ties;
  * its 95 % Wilson score interval (`wilson_interval`), with n = prompts and p̂ = that win
    rate. Ties make each outcome 0, 1/2 or 1; the variance of such an outcome is at most
    p̂(1 - p̂), the Bernoulli variance Wilson assumes, so with ties the interval is
    conservative (wider, never narrower, than the outcome's own variance calls for);
  * each policy's mean score.

Besides: KL(policy ‖ baseline) per response on the policy's own samples, Σ_t log π(y_t) −
log π_base(y_t) over the response's tokens (its stop token included) of softmax(logits /
temperature), averaged over prompts: an unbiased estimate of the KL of the tempered
distributions (with top-k / top-p on, the samples come from the filtered distribution while
the log-probs are of the unfiltered ones, so it is then only an approximation); the mean
response length in tokens (the stop token included) and the fraction that ended at a stop
id.

Written to `out_dir` (process 0): `eval.json`, `eval_samples.jsonl` (one row per prompt:
the prompt, both responses, their tokens and finished flags, the per-response KL and every
judge's scores), `report.md` and `score_hist.png` / `score_diff.png`. (Not `samples.jsonl`:
a PPO workdir, the default `out_dir`, keeps its training samples there.)

A reward model reads text, not the policy's token ids: each response is tokenized with the
reward model's tokenizer exactly as `data.load_comparisons` lays out its training rows
([bos] + prompt + response + end of turn when finished), so any reward model can judge any
pair of policies. A reward function gets each prompt as the policy saw it (chats: the
rendered template) and the response text.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from typing import Callable

import jax
import numpy as np

from rlhf_jax import data, generation, reporting, reward_fns
from rlhf_jax import sample_responses as sampling_lib
from rlhf_jax import workdir as workdir_lib
from rlhf_jax.data.validate import BadRow
from rlhf_jax.data.vocab import Encoder
from rlhf_jax.errors import ConfigError, UserError

log = logging.getLogger("rlhf_jax")

Z95 = 1.959963984540054      # the standard normal's 97.5 % quantile
CI_METHOD = ("Wilson score interval, 95% (z = 1.96), n = prompts, p = win rate with ties "
             "counting half")
NAMES = ("policy", "baseline")


def wilson_interval(p: float, n: int, z: float = Z95) -> tuple[float, float]:
  """The Wilson score interval of a proportion `p` observed over `n` trials.

      centre = (p + z²/2n) / (1 + z²/n)
      half   = z / (1 + z²/n) * sqrt(p(1 - p)/n + z²/4n²)

  It always contains `p` and stays within [0, 1] (the ends are clipped to `p` where
  rounding would leave it just outside, e.g. lo = 3e-17 at p = 0).
  """
  if n < 1:
    raise ValueError(f"wilson_interval: n={n}, expected >= 1")
  denom = 1.0 + z * z / n
  centre = (p + z * z / (2 * n)) / denom
  half = z / denom * math.sqrt(max(p * (1.0 - p), 0.0) / n + z * z / (4 * n * n))
  return max(0.0, min(centre - half, p)), min(1.0, max(centre + half, p))


def win_rate(policy_scores, baseline_scores) -> dict:
  """Win rate of the policy over the baseline, prompt by prompt, ties counting half.

  Returns:
    {"win_rate", "ci95": [lo, hi] (`wilson_interval`), "wins", "ties", "losses", "n"}.
  """
  a, b = np.asarray(policy_scores, float), np.asarray(baseline_scores, float)
  wins, ties = int(np.sum(a > b)), int(np.sum(a == b))
  n = len(a)
  rate = (wins + 0.5 * ties) / n
  return dict(win_rate=rate, ci95=list(wilson_interval(rate, n)), wins=wins, ties=ties,
              losses=n - wins - ties, n=n)


def load_reward_fn(spec: str) -> Callable:
  """The reward function `--reward_fn` names (`reward_fns.load`: `file.py:name` or
  `module:name`), as fn(prompts, responses) -> float64 [n], checked, with messages that
  name the flag."""
  try:
    fn = reward_fns.load(spec)
  except ConfigError as e:
    raise UserError(f"--reward_fn={spec}: expected {str(e).split(': expected ', 1)[-1]}"
                    ) from None

  def call(prompts: list, responses: list) -> np.ndarray:
    try:
      return fn(prompts, responses)
    except UserError as e:  # its messages name the PPO config field the loader serves
      raise UserError(str(e).replace(f"{reward_fns.FIELD}=", "--reward_fn=", 1)) from None
  return call


def reward_model_inputs(model: sampling_lib.LoadedModel, prompts: sampling_lib.Prompts,
                        texts: list, finished) -> dict:
  """Right-padded RM inputs of (prompt, response) pairs, laid out as `data.load_comparisons`.

  Returns:
    input_ids, attention_mask [n, T] (T = the longest sequence) and last_index [n].
  """
  enc = Encoder(model.tokenizer, None, model.model_dir)
  tail = enc.tail(prompts.is_chat, model.stop_ids)
  if prompts.is_chat:
    try:
      prompt_texts = [enc.render_chat(f["messages"], "messages") for f in prompts.fields]
    except BadRow as e:
      raise UserError(f"--reward_model: its chat template fails on a prompt: "
                      f"{e.describe()}") from None
  else:
    prompt_texts = list(prompts.texts)
  encoded = enc.encode(prompt_texts + list(texts))
  for ids in encoded:
    if isinstance(ids, BadRow):
      raise UserError(f"--reward_model: its tokenizer fails on a text: {ids.describe()}")
  n = len(prompt_texts)
  seqs = [enc.with_bos(encoded[i]) + encoded[n + i] + tail.response(bool(finished[i]))
          for i in range(n)]
  longest = max(len(s) for s in seqs)
  cfg = model.cfg
  if cfg.position_type == "learned" and longest > cfg.max_position_embeddings:
    raise UserError(f"--reward_model: a prompt + response has {longest} tokens, more than "
                    f"its {cfg.max_position_embeddings} positions")
  ids = np.full((n, longest), enc.pad_id, np.int32)
  mask = np.zeros((n, longest), np.int32)
  for i, s in enumerate(seqs):
    ids[i, :len(s)], mask[i, :len(s)] = s, 1
  return dict(input_ids=ids, attention_mask=mask,
              last_index=np.asarray([len(s) - 1 for s in seqs], np.int32))


def reward_model_scores(model: sampling_lib.LoadedModel, normalization: dict,
                        prompts: sampling_lib.Prompts, texts: list, finished, mesh,
                        batch_size: int) -> np.ndarray:
  """The reward model's normalised score of each (prompt, response): [n]."""
  x = reward_model_inputs(model, prompts, texts, finished)
  return generation.reward_scores(model.cfg, model.params, x["input_ids"],
                                  x["attention_mask"], x["last_index"], normalization,
                                  batch_size=batch_size, mesh=mesh)


def default_out_dir(policy: str) -> str:
  """The policy's workdir: `policy` itself, or the run above an `export/policy` dir."""
  path = os.path.normpath(os.path.expanduser(policy))
  if os.path.isfile(os.path.join(path, "export", "policy", "config.json")):
    return path
  head, leaf = os.path.split(path)
  if leaf == "policy" and os.path.basename(head) == "export":
    return os.path.dirname(head)
  raise UserError(f"--policy={policy} is a model directory, not a run's workdir; say where "
                  "to write the evaluation with --out_dir")


@dataclasses.dataclass
class Request:
  """What `launch/evaluate.py` asks for (its flags of the same names)."""
  policy: str
  baseline: str
  prompts: str
  reward_model: str = ""
  reward_fn: str = ""
  out_dir: str = ""
  settings: sampling_lib.Settings = dataclasses.field(
      default_factory=lambda: sampling_lib.Settings(num_samples=1))
  prompt_column: str = ""
  max_prompt_len: int = 256
  on_bad_row: str = "error"
  mesh: str = "data=-1"
  dtype: str = "auto"
  report_samples: int = 8


def evaluate(req: Request) -> dict:
  """Samples, judges and writes the comparison (module docstring); returns `eval.json`."""
  if not (req.reward_model or req.reward_fn):
    raise UserError("no judge: give --reward_model=<RM workdir or dir> and/or "
                    "--reward_fn=<file.py:function>")
  settings = dataclasses.replace(req.settings, num_samples=1)
  settings.check()
  out_dir = req.out_dir or default_out_dir(req.policy)
  reward_fn = load_reward_fn(req.reward_fn) if req.reward_fn else None
  mesh = sampling_lib.make_mesh(req.mesh)
  models = {name: sampling_lib.load_model(path, "causal", mesh, f"--{name}", req.dtype)
            for name, path in zip(NAMES, (req.policy, req.baseline))}
  try:
    data.check_same_tokenizer(models["policy"].tokenizer, models["baseline"].tokenizer,
                              names=NAMES)
  except data.DataError as e:
    raise UserError(f"{str(e).split('. ')[0]}: KL(policy ‖ baseline) reads the policy's "
                    "token ids under the baseline, so both need one tokenizer") from None
  rm = None
  if req.reward_model:
    rm = sampling_lib.load_model(req.reward_model, "scalar", mesh, "--reward_model", req.dtype)
  prompts = sampling_lib.load_prompts(req.prompts, models["policy"].tokenizer,
                                      req.max_prompt_len, req.prompt_column, req.on_bad_row)
  log.info("[evaluate] %d prompts: %s vs %s", len(prompts), models["policy"].model_dir,
           models["baseline"].model_dir)
  samples = {name: sampling_lib.sample(m, prompts, settings, mesh, f"--{name}")
             for name, m in models.items()}
  own = samples["policy"]
  logp = {name: generation.sequence_logprob_sums(
      m.cfg, m.params, prompts.ids, prompts.mask, own.tokens, own.mask,
      batch_size=settings.batch_size, temperature=settings.temperature, mesh=mesh)
      for name, m in models.items()}
  kl = logp["policy"] - logp["baseline"]
  scores: dict = {}
  if rm is not None:
    norm = workdir_lib.read_rm_normalization(rm.model_dir)
    scores["reward_model"] = {name: reward_model_scores(
        rm, norm, prompts, s.texts, s.has_eos, mesh, settings.batch_size)
        for name, s in samples.items()}
  if reward_fn is not None:
    scores["reward_fn"] = {name: reward_fn(prompts.texts, s.texts)
                           for name, s in samples.items()}
  result = summarize(req, models, rm, prompts, samples, scores, kl, settings)
  if jax.process_index() == 0:
    write(out_dir, result, prompts, samples, scores, kl, req.report_samples)
    log.info("[evaluate] wrote eval.json, eval_samples.jsonl, report.md and plots to %s",
             out_dir)
  log.info("[evaluate] %s", json.dumps({j: [round(result["win_rate"][j], 4)] + [
      round(x, 4) for x in result["win_rate_ci95"][j]] for j in scores}))
  return result


def summarize(req: Request, models: dict, rm, prompts, samples: dict, scores: dict,
              kl: np.ndarray, settings) -> dict:
  """The `eval.json` contents: every metric keyed by judge or by policy."""
  judged = {judge: win_rate(s["policy"], s["baseline"]) for judge, s in scores.items()}
  return dict(
      policy=models["policy"].model_dir, baseline=models["baseline"].model_dir,
      reward_model=rm.model_dir if rm is not None else None,
      reward_fn=req.reward_fn or None, prompts=req.prompts, n_prompts=len(prompts),
      judges=list(scores),
      win_rate={j: r["win_rate"] for j, r in judged.items()},
      win_rate_ci95={j: r["ci95"] for j, r in judged.items()},
      wins_ties_losses={j: [r["wins"], r["ties"], r["losses"]] for j, r in judged.items()},
      ci_method=CI_METHOD,
      mean_score={j: {n: float(np.mean(v)) for n, v in s.items()} for j, s in scores.items()},
      kl_policy_baseline=float(np.mean(kl)),
      mean_response_tokens={n: float(np.mean(s.mask.sum(1))) for n, s in samples.items()},
      finished_rate={n: float(np.mean(s.has_eos)) for n, s in samples.items()},
      sampling=dict(temperature=settings.temperature, top_p=settings.top_p,
                    top_k=settings.top_k, max_new_tokens=settings.max_new_tokens,
                    seed=settings.seed))


def sample_rows(prompts, samples: dict, scores: dict, kl: np.ndarray) -> list:
  """`eval_samples.jsonl`: a row per prompt with both responses and every judge's scores."""
  rows = []
  for i, field in enumerate(prompts.fields):
    row = dict(field)
    for name, s in samples.items():
      row[name] = s.texts[i]
      row[f"{name}_finished"] = bool(s.has_eos[i])
      row[f"{name}_tokens"] = int(s.mask[i].sum())
    row["kl"] = float(kl[i])
    row["scores"] = {j: {n: float(v[i]) for n, v in s.items()} for j, s in scores.items()}
    rows.append(row)
  return rows


def write(out_dir: str, result: dict, prompts, samples: dict, scores: dict, kl: np.ndarray,
          report_samples: int = 8) -> None:
  """`eval.json`, `eval_samples.jsonl`, the plots and `report.md` in `out_dir`."""
  try:
    os.makedirs(out_dir, exist_ok=True)
  except OSError as e:
    raise UserError(f"--out_dir={out_dir}: {e}") from None
  with open(os.path.join(out_dir, "eval.json"), "w") as f:
    json.dump(result, f, indent=2)
  sampling_lib.write_jsonl(os.path.join(out_dir, "eval_samples.jsonl"),
                           sample_rows(prompts, samples, scores, kl))
  title = {"reward_model": "reward model", "reward_fn": "reward function"}
  plots = [
      reporting.score_histograms(os.path.join(out_dir, "score_hist.png"),
                                 {title[j]: s for j, s in scores.items()}),
      reporting.score_differences(os.path.join(out_dir, "score_diff.png"),
                                  {title[j]: s["policy"] - s["baseline"]
                                   for j, s in scores.items()})]
  with open(os.path.join(out_dir, "report.md"), "w") as f:
    f.write("\n".join(report_lines(result, prompts, samples, scores, plots, report_samples))
            + "\n")


def report_lines(result: dict, prompts, samples: dict, scores: dict, plots: list,
                 n_samples: int) -> list:
  """`report.md`: the metrics table, a few sample rows and the plots."""
  title = {"reward_model": f"reward model ({result['reward_model']})",
           "reward_fn": f"reward function ({result['reward_fn']})"}
  s = result["sampling"]
  lines = ["# Policy vs baseline", "",
           f"Policy `{result['policy']}` against baseline `{result['baseline']}` on "
           f"{result['n_prompts']} prompts of `{result['prompts']}`; one sample each, "
           f"temperature {s['temperature']}, top-p {s['top_p']}, top-k {s['top_k']}, at most "
           f"{s['max_new_tokens']} new tokens, seed {s['seed']}. Win rates count ties as "
           f"half; intervals: {result['ci_method']}.", ""]
  rows = []
  for j in result["judges"]:
    lo, hi = result["win_rate_ci95"][j]
    w, t, los = result["wins_ties_losses"][j]
    rows.append([f"win rate over the baseline, {title[j]}",
                 f"{result['win_rate'][j]:.3f} [{lo:.3f}, {hi:.3f}] ({w} wins, {t} ties, "
                 f"{los} losses)"])
  rows.append(["KL(policy ‖ baseline) per response", f"{result['kl_policy_baseline']:.4f}"])
  lines += reporting.table(["metric", "value"], rows) + [""]
  header = ["model"] + [f"mean score, {j.replace('_', ' ')}" for j in result["judges"]] + [
      "mean response tokens", "finished rate"]
  model_rows = [[n] + [f"{result['mean_score'][j][n]:.3f}" for j in result["judges"]] + [
      f"{result['mean_response_tokens'][n]:.1f}", f"{result['finished_rate'][n]:.3f}"]
      for n in NAMES]
  lines += reporting.table(header, model_rows)
  judge = result["judges"][0]
  cell = reporting.cell
  rows = [[cell(prompts.texts[i]), cell(samples["policy"].texts[i]),
           f"{scores[judge]['policy'][i]:.2f}", cell(samples["baseline"].texts[i]),
           f"{scores[judge]['baseline'][i]:.2f}"] for i in range(min(n_samples, len(prompts)))]
  lines += ["", f"## Samples (scores: {judge.replace('_', ' ')})", ""]
  lines += reporting.table(["prompt", "policy", "score", "baseline", "score"], rows)
  lines += ["", "## Scores", ""] + reporting.image_links(plots)
  return lines

