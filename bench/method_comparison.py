r"""PPO-ptx, PPO, GRPO, RLOO, REINFORCE++ and DPO on the built-in task, from the same SFT model.

For each seed, the demo command (`make demo`: pretrain, SFT, the oracle's K-way rankings, the
RM, PPO-ptx, plain PPO, evaluation) runs once in `<root>/seed<S>/demo`; it gives the PPO-ptx
and PPO rows (at the default β). Every other method then runs in its own workdir whose shared
stages (task data, pretrain, SFT, RM) are links to the demo's (the pipeline reuses a finished
stage), exactly as a user would run it:

    python launch/train.py --config=configs/ppo.py  --workdir=W   # PPO-ptx (ppo.ptx_coef=1)
    python launch/train.py --config=configs/ppo.py  --workdir=W --config.ppo.ptx_coef=0
    python launch/train.py --config=configs/grpo.py --workdir=W --config.grpo.estimator=rloo
    python launch/train.py --config=configs/dpo.py  --workdir=W   # on the RM's rankings

and each reads its `eval.json`: the oracle's win rate over SFT on the 256 held-out prompts,
KL to SFT per response, the pretraining-loss tax, the unsafe rate; and the wall time of the
method's own training stage (from the launcher's log; shared stages and evaluation not counted).

Budget and tuning (the same for every method):
- Online methods see the same number of sampled responses: PPO 64 prompts x 1 sample per
  iteration, the group methods 16 prompts x G = 4 samples, 200 iterations each (12,800
  responses); all use the pipeline's learning rate, epochs and minibatches. DPO trains on the
  same K = 4 rankings the RM learns from (16000 prompts x 4 SFT samples) for its 250 steps.
- Each method's main coefficient is swept over three values on a tuning seed that is not
  reported (`--tune_seed`): β of the KL penalty for PPO / PPO-ptx / REINFORCE++, β of the k3
  KL loss for GRPO / RLOO, DPO's β. The value with the best win rate is then run on every
  reported seed.

    python bench/method_comparison.py --seeds 0 1 2 --tune_seed 10 --root runs/compare \
        --append docs/benchmarks.md --readme README.md

`--readme` replaces the README's block between `<!-- method-comparison -->` markers with the
table and the plot (`docs/method_comparison.png`: win rate against KL, one point per seed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = ("task_data", "pretrain", "sft", "rm")   # linked from the demo's workdir

# method -> (config file, fixed overrides, coefficient field, sweep values)
METHODS = {
    "PPO-ptx": ("ppo.py", [], "ppo.kl_coef", (0.005, 0.02, 0.08)),
    "PPO": ("ppo.py", ["--config.ppo.ptx_coef=0"], "ppo.kl_coef", (0.005, 0.02, 0.08)),
    "GRPO": ("grpo.py", ["--config.grpo.estimator=grpo"], "ppo.kl_coef", (0.01, 0.04, 0.16)),
    "RLOO": ("grpo.py", ["--config.grpo.estimator=rloo"], "ppo.kl_coef", (0.01, 0.04, 0.16)),
    "REINFORCE++": ("grpo.py", ["--config.grpo.estimator=reinforce_pp"], "ppo.kl_coef",
                    (0.005, 0.02, 0.08)),
    "DPO": ("dpo.py", [], "dpo.beta", (0.03, 0.1, 0.3)),
}
MARK = "<!-- method-comparison -->"


def _train(config: str, workdir: str, args: list, log_path: str) -> None:
  cmd = [sys.executable, os.path.join(REPO, "launch", "train.py"),
         "--config=" + os.path.join(REPO, "configs", config), f"--workdir={workdir}",
         "--config.train.progress=False", *args]
  os.makedirs(os.path.dirname(log_path), exist_ok=True)
  start = time.perf_counter()
  with open(log_path, "w") as log:
    proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
  if proc.returncode != 0:
    raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n  log: {log_path}")
  with open(log_path, "a") as log:
    log.write(f"\ncommand wall time: {time.perf_counter() - start:.1f} s\n")


def stage_seconds(log_path: str, stage: str) -> float:
  """Seconds from "[pipeline] <stage>: training" to the next pipeline / eval line (the
  launcher's log timestamps, 1 s resolution): the method's own training time."""
  stamps = []
  with open(log_path) as f:
    for line in f:
      m = re.match(r"(\d\d):(\d\d):(\d\d) \[(pipeline|eval)\] (\S+)", line)
      if m:
        h, mi, se = map(int, m.groups()[:3])
        stamps.append((h * 3600 + mi * 60 + se, m.group(5)))
  for i, (t, what) in enumerate(stamps[:-1]):
    if what == stage + ":":
      return float((stamps[i + 1][0] - t) % 86400)
  raise SystemExit(f"{log_path}: no '[pipeline] {stage}: training' line")


def demo(root: str, seed: int, extra: list, variant: str) -> str:
  """The demo command for `seed` (pretrain, SFT, rankings, RM, PPO-ptx, PPO, evaluation):
  its shared stages are what every other method starts from. Returns its workdir."""
  workdir = os.path.join(root, f"seed{seed}", "demo")
  if not os.path.isfile(os.path.join(workdir, "eval.json")):
    _train("ppo.py" + variant, workdir, [f"--config.seed={seed}", *extra], workdir + ".log")
  return workdir


def _row(method: str, seed: int, coef: float, result: dict, key: str, log_path: str,
         stage: str) -> dict:
  no_ptx = key == "ppo_noptx"
  return dict(method=method, seed=seed, coef=coef,
              win=result["oracle_win_rate_no_ptx" if no_ptx else "oracle_win_rate"],
              ceiling=result.get("oracle_win_rate_ceiling"),
              kl=result["kl_to_sft_no_ptx" if no_ptx else "kl_to_sft"],
              tax=result["alignment_tax"][key], unsafe=result["unsafe_rate"][key],
              unsafe_sft=result["unsafe_rate"]["sft"], wall=stage_seconds(log_path, stage))


def demo_rows(root: str, seed: int, extra: list, variant: str) -> list:
  """PPO-ptx and PPO as the demo command trains them (at the default coefficient)."""
  workdir = demo(root, seed, extra, variant)
  with open(os.path.join(workdir, "eval.json")) as f:
    result = json.load(f)
  coef = _default_coef("PPO-ptx")
  return [_row("PPO-ptx", seed, coef, result, "ppo", workdir + ".log", "ppo"),
          _row("PPO", seed, coef, result, "ppo_noptx", workdir + ".log", "ppo_noptx")]


def _default_coef(method: str) -> float:
  config, _, field, _ = METHODS[method]
  import importlib.util
  spec = importlib.util.spec_from_file_location("c", os.path.join(REPO, "configs", config))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  node = module.get_config()
  for part in field.split("."):
    node = node[part]
  return float(node)


def run_method(root: str, seed: int, method: str, coef: float, extra: list,
               variant: str) -> dict:
  """One method from the demo's shared stages of `seed`, in its own workdir."""
  config, fixed, field, _ = METHODS[method]
  base = demo(root, seed, extra, variant)
  name = re.sub(r"[^A-Za-z0-9]+", "_", method).strip("_").lower()
  workdir = os.path.join(root, f"seed{seed}", f"{name}_{field.split('.')[-1]}{coef:g}")
  if not os.path.isfile(os.path.join(workdir, "eval.json")):
    os.makedirs(workdir, exist_ok=True)
    for stage in SHARED:
      link = os.path.join(workdir, stage)
      if not os.path.lexists(link):
        os.symlink(os.path.join(base, stage), link)
    _train(config + variant, workdir,
           [f"--config.seed={seed}", f"--config.{field}={coef}",
            "--config.pipeline.compare_no_ptx=False", *fixed, *extra], workdir + ".log")
  with open(os.path.join(workdir, "eval.json")) as f:
    result = json.load(f)
  stage = result["method"]
  return _row(method, seed, coef, result, stage, workdir + ".log", stage)


def _mean_sd(values) -> str:
  values = list(values)
  sd = statistics.stdev(values) if len(values) > 1 else 0.0
  return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def summary_table(rows: list, chosen: dict) -> str:
  lines = ["| method | coefficient | oracle win rate over SFT | KL to SFT | pretraining-loss tax |"
           " unsafe rate (SFT: {}) | wall (s) | win rate per seed |".format(
               _mean_sd(r["unsafe_sft"] for r in rows if r["method"] == rows[0]["method"])),
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
  for method in METHODS:
    mine = [r for r in rows if r["method"] == method]
    if not mine:
      continue
    field = METHODS[method][2]
    lines.append(
        f"| {method} | {field} = {chosen[method]:g} | {_mean_sd(r['win'] for r in mine)} | "
        f"{_mean_sd(r['kl'] for r in mine)} | {_mean_sd(r['tax'] for r in mine)} | "
        f"{_mean_sd(r['unsafe'] for r in mine)} | {statistics.mean(r['wall'] for r in mine):.0f}"
        f" | {', '.join(format(r['win'], '.3f') for r in mine)} |")
  return "\n".join(lines)


def sweep_table(rows: list) -> str:
  lines = ["| method | coefficient | win rate | KL | tax |", "| --- | --- | --- | --- | --- |"]
  for r in rows:
    lines.append(f"| {r['method']} | {METHODS[r['method']][2]} = {r['coef']:g} | "
                 f"{r['win']:.3f} | {r['kl']:.2f} | {r['tax']:+.3f} |")
  return "\n".join(lines)


def plot(rows: list, path: str) -> str:
  from rlhf_jax import reporting
  plt = reporting.pyplot()
  fig, ax = plt.subplots(figsize=(6, 4.2))
  for i, method in enumerate(METHODS):
    mine = [r for r in rows if r["method"] == method]
    if not mine:
      continue
    color = f"C{i}"
    ax.scatter([r["kl"] for r in mine], [r["win"] for r in mine], color=color, alpha=0.5, s=18)
    ax.scatter([statistics.mean(r["kl"] for r in mine)],
               [statistics.mean(r["win"] for r in mine)], color=color, marker="D", s=50,
               label=method, edgecolors="black")
  ax.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
  ax.set_xlabel("KL(policy ‖ SFT) per response (nats)")
  ax.set_ylabel("oracle win rate over SFT")
  ax.set_title("Built-in task: win rate against KL (dots: seeds, diamonds: means)")
  ax.legend(fontsize=8)
  return reporting.save_figure(fig, path)


def demo_table(root: str, seeds, rows: list) -> str:
  """The demo command per seed (issue 17 item 5): its wall time and headline figures."""
  lines = ["| seed | demo wall (min) | RM accuracy | win rate PPO-ptx | reachable | KL |"
           " tax PPO-ptx | tax PPO | unsafe SFT → PPO-ptx |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for seed in seeds:
    workdir = os.path.join(root, f"seed{seed}", "demo")
    with open(os.path.join(workdir, "eval.json")) as f:
      r = json.load(f)
    with open(workdir + ".log") as f:
      wall = float(re.findall(r"command wall time: ([\d.]+) s", f.read())[-1])
    tax = r["alignment_tax"]
    lines.append(f"| {seed} | {wall / 60:.1f} | {r['rm_accuracy']:.3f} | "
                 f"{r['oracle_win_rate']:.3f} | {r['oracle_win_rate_ceiling']:.3f} | "
                 f"{r['kl_to_sft']:.2f} | {tax['ppo']:+.3f} | {tax['ppo_noptx']:+.3f} | "
                 f"{r['unsafe_rate']['sft']:.3f} → {r['unsafe_rate']['ppo']:.3f} |")
  return "\n".join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  ap.add_argument("--tune_seed", type=int, default=10,
                  help="the seed the coefficient sweep runs on (not reported); -1: no sweep, "
                       "each config's default coefficient")
  ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
  ap.add_argument("--variant", default="", help="config variant for every run, e.g. ':tiny' "
                  "(the smoke test of this script)")
  ap.add_argument("--root", default=os.path.join(REPO, "runs", "compare"))
  ap.add_argument("--append", default=None, help="markdown file to append the tables to")
  ap.add_argument("--readme", default=None, help="README whose marked block gets the table")
  ap.add_argument("--plot", default=os.path.join(REPO, "docs", "method_comparison.png"))
  ap.add_argument("overrides", nargs="*", help="extra --config.x=y flags for every run")
  args = ap.parse_args(argv)
  args.root = os.path.abspath(args.root)   # the method workdirs link into it
  loads = [common.load()]
  chosen, sweep = {}, []
  for method in args.methods:
    if args.tune_seed < 0:
      chosen[method] = _default_coef(method)
      continue
    tried = [run_method(args.root, args.tune_seed, method, v, args.overrides, args.variant)
             for v in METHODS[method][3]]
    for r in tried:
      print(f"tune seed {args.tune_seed} {method} {METHODS[method][2]}={r['coef']:g}: "
            f"win {r['win']:.3f} KL {r['kl']:.2f} tax {r['tax']:+.3f}", flush=True)
    sweep += tried
    chosen[method] = max(tried, key=lambda r: (r["win"], -r["kl"]))["coef"]
  rows = []
  for seed in args.seeds:
    from_demo = {r["method"]: r for r in demo_rows(args.root, seed, args.overrides,
                                                   args.variant)}
    for method in args.methods:
      if method in from_demo and chosen[method] == from_demo[method]["coef"]:
        rows.append(from_demo[method])
      else:
        rows.append(run_method(args.root, seed, method, chosen[method], args.overrides,
                               args.variant))
      r = rows[-1]
      print(f"seed {seed} {method}: win {r['win']:.3f} KL {r['kl']:.2f} tax {r['tax']:+.3f} "
            f"unsafe {r['unsafe']:.3f} stage {r['wall']:.0f} s", flush=True)
      loads.append(common.load())
  table = summary_table(rows, chosen)
  demos = demo_table(args.root, args.seeds, rows)
  plot_path = plot(rows, args.plot)
  command = common.command_line(argv, "bench/method_comparison.py")
  ceilings = [r["ceiling"] for r in rows if r["method"] == rows[0]["method"]]
  context = (f"Machine: {common.machine()}; {common.versions()}; {common.today()}; load average "
             f"{min(loads):.1f}–{max(loads):.1f}. Command: `{command}`. Means ± standard "
             f"deviation over seeds {', '.join(map(str, args.seeds))}"
             + (f"; coefficients chosen by the best win rate on seed {args.tune_seed}"
                if sweep else "; each config's default coefficient")
             + f". The highest win rate any policy can reach over these SFT samples (a perfect "
             f"answer ties a perfect SFT answer: 0.5) is {_mean_sd(ceilings)}. Wall: the "
             f"method's own training stage.")
  print(table)
  print(demos)
  if sweep:
    print(sweep_table(sweep))
  with open(os.path.join(args.root, "results.json"), "w") as f:
    json.dump(dict(rows=rows, sweep=sweep, chosen=chosen), f, indent=2)
  if args.append:
    with open(args.append, "a") as f:
      f.write(f"\n## Methods compared on the built-in task ({common.today()})\n\n{context}\n\n"
              f"{table}\n\nThe demo command per seed:\n\n{demos}\n"
              + (f"\nSweep (seed {args.tune_seed}):\n\n{sweep_table(sweep)}\n"
                 if sweep else ""))
  if args.readme:
    with open(args.readme) as f:
      text = f.read()
    if text.count(MARK) != 2:
      raise SystemExit(f"{args.readme}: expected two '{MARK}' lines around the table")
    head, _, tail = text.split(MARK)
    rel = os.path.relpath(plot_path, os.path.dirname(os.path.abspath(args.readme)))
    block = (f"\n{context}\n\n{table}\n\n![win rate against KL]({rel})\n\n"
             f"The demo command (`make demo`) on each seed:\n\n{demos}\n")
    with open(args.readme, "w") as f:
      f.write(head + MARK + block + MARK + tail)


if __name__ == "__main__":
  main()
