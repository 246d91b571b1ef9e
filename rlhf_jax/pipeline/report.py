"""`report.md` and PNG plots for the embedded pipeline's evaluation.

The tables and figures are drawn with `rlhf_jax.reporting`, which `launch/evaluate.py`'s
report (`rlhf_jax.compare`) shares.
"""

from __future__ import annotations

import os

from rlhf_jax import metrics, reporting


def _plot(workdir: str) -> list:
  plt = reporting.pyplot()
  written = []
  runs = {}
  for name in ("ppo", "ppo_noptx"):
    rows = [r for r in metrics.read_metrics(os.path.join(workdir, name), stage="ppo")
            if "score" in r and r.get("score") is not None]
    if rows:
      runs[name] = rows
  if not runs:
    return written
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  for name, rows in runs.items():
    steps = [r["step"] for r in rows]
    for ax, key in zip(axes, ("score", "kl", "kl_coef")):
      ax.plot(steps, [r.get(key) for r in rows], label=name)
      ax.set_title({"score": "RM score", "kl": "KL(π || π_SFT) per response",
                    "kl_coef": "β"}[key])
      ax.set_xlabel("PPO iteration")
  axes[0].legend()
  written.append(reporting.save_figure(fig, os.path.join(workdir, "ppo_curves.png")))
  fig, ax = plt.subplots(figsize=(5, 4))
  for name, rows in runs.items():
    ax.scatter([r.get("kl") for r in rows], [r.get("score") for r in rows], s=10, label=name)
  ax.set_xlabel("KL(π || π_SFT)")
  ax.set_ylabel("RM score")
  ax.set_title("Reward–KL trade-off")
  ax.legend()
  written.append(reporting.save_figure(fig, os.path.join(workdir, "reward_vs_kl.png")))
  return written


def write(workdir: str, result: dict, prompts: list, samples: dict, scores: dict,
          n_samples: int = 12) -> str:
  plots = _plot(workdir)
  cell = reporting.cell
  method = result.get("method", "ppo")
  label = {"ppo": "PPO-ptx"}.get(method, method.upper())
  metric_rows = [[f"oracle win rate, {label} over SFT", f"{result['oracle_win_rate']:.3f}"]]
  if result.get("oracle_win_rate_ceiling") is not None:
    metric_rows.append(["the highest win rate any policy could reach over these SFT samples "
                        "(a perfect answer ties a perfect SFT answer: 0.5)",
                        f"{result['oracle_win_rate_ceiling']:.3f}"])
  if result.get("oracle_win_rate_no_ptx") is not None:
    metric_rows.append(["oracle win rate, PPO over SFT",
                        f"{result['oracle_win_rate_no_ptx']:.3f}"])
  if result.get("rm_accuracy") is not None:   # no RM in an offline (DPO) pipeline
    metric_rows.append(["RM pairwise accuracy (held-out, vs oracle)",
                        f"{result['rm_accuracy']:.3f}"])
  metric_rows.append([f"KL({label} ‖ SFT) per response", f"{result['kl_to_sft']:.3f}"])
  if result.get("kl_to_sft_no_ptx") is not None:
    metric_rows.append(["KL(PPO ‖ SFT) per response", f"{result['kl_to_sft_no_ptx']:.3f}"])
  model_rows = []
  for name in result["pretrain_loss"]:
    tax = result["alignment_tax"].get(name, 0.0)
    model_rows.append([name, f"{result['oracle_score'][name]:.3f}",
                       f"{result['pretrain_loss'][name]:.4f}", f"{tax:+.4f}",
                       f"{result['unsafe_rate'][name]:.3f}", f"{result['eos_rate'][name]:.3f}"])
  sample_rows = [[cell(prompts[i]), cell(samples["sft"].texts[i]), f"{scores['sft'][i]:.2f}",
                  cell(samples[method].texts[i]), f"{scores[method][i]:.2f}"]
                 for i in range(min(n_samples, len(prompts)))]
  lines = ["# Evaluation on the built-in task", "",
           f"{result['n_prompts']} held-out prompts, sampling temperature "
           f"{result['temperature']}, seed {result['seed']}.", ""]
  lines += reporting.table(["metric", "value"], metric_rows)
  lines += [""] + reporting.table(["model", "oracle score", "pretraining loss",
                                   "alignment tax", "unsafe rate", "EOS rate"], model_rows)
  lines += ["", "## Samples", ""]
  lines += reporting.table(["prompt", "SFT", "score", label, "score"], sample_rows)
  if plots:
    lines += ["", "## Training curves", ""] + reporting.image_links(plots)
  path = os.path.join(workdir, "report.md")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return path
