r"""The embedded default pipeline across seeds: wall clock and the paper-style figures.

Runs `launch/train.py --config=configs/ppo.py` exactly as a user would (fresh workdir per
seed), then reads each `eval.json`:

  .venv/bin/python bench/pipeline_seeds.py --seeds 0 1 2 --append docs/benchmarks.md

Acceptance (issue 5): ≤ 10 min wall clock on the 2-core CPU, RM held-out accuracy ≥ 0.75,
PPO-ptx oracle win rate over SFT ≥ 0.70, PPO-ptx's pretraining-loss regression smaller than
plain PPO's — for every seed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_seed(seed: int, root: str, extra: list) -> dict:
  workdir = os.path.join(root, f"seed{seed}")
  cmd = [sys.executable, os.path.join(REPO, "launch", "train.py"),
         "--config=" + os.path.join(REPO, "configs", "ppo.py"), f"--workdir={workdir}",
         f"--config.seed={seed}", "--config.train.progress=False", *extra]
  load_before = os.getloadavg()[0]
  start = time.perf_counter()
  proc = subprocess.run(cmd, capture_output=True, text=True)
  wall = time.perf_counter() - start
  if proc.returncode != 0:
    raise SystemExit(f"seed {seed} failed:\n{proc.stderr[-4000:]}")
  with open(os.path.join(workdir, "eval.json")) as f:
    result = json.load(f)
  result.update(wall_s=wall, load_before=load_before, workdir=workdir)
  return result


def row(r: dict) -> str:
  tax = r["alignment_tax"]
  ok = (r["wall_s"] <= 600 and r["rm_accuracy"] >= 0.75 and r["oracle_win_rate"] >= 0.70
        and tax["ppo"] < tax["ppo_noptx"])
  return (f"| {r['seed']} | {r['wall_s'] / 60:.1f} | {r['rm_accuracy']:.3f} | "
          f"{r['oracle_win_rate']:.3f} | {r['oracle_win_rate_no_ptx']:.3f} | "
          f"{r['kl_to_sft']:.2f} | {tax['ppo']:+.3f} | {tax['ppo_noptx']:+.3f} | "
          f"{r['unsafe_rate']['sft']:.3f} → {r['unsafe_rate']['ppo']:.3f} | "
          f"{r['load_before']:.1f} | {'yes' if ok else 'NO'} |")


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--root", default=None, help="where the workdirs go (default: a temp dir)")
  parser.add_argument("--append", default=None, help="markdown file to append the table to")
  parser.add_argument("overrides", nargs="*", help="extra --config.x=y flags")
  args = parser.parse_args()
  root = args.root or tempfile.mkdtemp(prefix="rlhf_jax_seeds_")
  header = ("| seed | wall (min) | RM acc | win PPO-ptx | win PPO | KL | tax ptx | tax no-ptx |"
            " unsafe SFT → PPO-ptx | load avg | meets targets |\n"
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
  rows = []
  for seed in args.seeds:
    r = run_seed(seed, root, args.overrides)
    rows.append(row(r))
    print(rows[-1], flush=True)
  if args.append:
    cpu = subprocess.run(["bash", "-c", "lscpu | grep 'Model name' | cut -d: -f2"],
                         capture_output=True, text=True).stdout.strip()
    import jax
    with open(args.append, "a") as f:
      f.write(f"\n## Embedded default pipeline across seeds ({datetime.date.today()})\n\n"
              f"Machine: {cpu}, {os.cpu_count()} cores; python {platform.python_version()}, "
              f"jax {jax.__version__}.\n"
              f"Command: `python bench/pipeline_seeds.py --seeds "
              f"{' '.join(map(str, args.seeds))} {' '.join(args.overrides)}` (each seed runs "
              f"`launch/train.py --config=configs/ppo.py` in a fresh workdir).\n\n"
              + header + "\n" + "\n".join(rows) + "\n")
  print(header)
  print("\n".join(rows))


if __name__ == "__main__":
  main()
