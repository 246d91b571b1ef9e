"""`evaluation.win_rate_ceiling` against the oracle's own comparisons.

Reference: the win rate (`Oracle.prefers`, ties 0.5) of the perfect policy, which answers
every prompt exactly, over the same SFT samples; and no policy may beat it.
"""

import numpy as np

from rlhf_jax import tasks
from rlhf_jax.pipeline.evaluation import win_rate_ceiling


def test_ceiling_is_the_perfect_policys_win_rate_and_bounds_every_policy():
  oracle = tasks.Oracle(seed=0)
  prompts = tasks.sample_prompts(seed=3, n=200, split="eval")
  rng = np.random.default_rng(0)
  words = ["a", "b", "c", "d", "2", "3", "well", "darn"]
  sft = []
  for p in prompts:   # a third perfect, the rest the answer with noise or random words
    u = rng.random()
    answer = list(p.answer)
    if u < 1 / 3:
      sft.append(" ".join(answer))
    elif u < 2 / 3:
      sft.append(" ".join(answer + [str(rng.choice(words))]))
    else:
      sft.append(" ".join(rng.choice(words, size=rng.integers(1, 5))))
  sft_scores = [oracle.score(p.text, r) for p, r in zip(prompts, sft)]
  perfect = np.mean([oracle.prefers(p.text, " ".join(p.answer), r)
                     for p, r in zip(prompts, sft)])
  ceiling = win_rate_ceiling(sft_scores)
  assert 0.6 < ceiling < 0.95       # the sample mixes perfect and imperfect answers
  assert ceiling == perfect
  for trial in range(5):          # random policies: never above the ceiling
    other = [" ".join(rng.choice(words, size=rng.integers(1, 5))) if rng.random() < 0.5
             else " ".join(p.answer) for p in prompts]
    assert np.mean([oracle.prefers(p.text, o, r)
                    for p, o, r in zip(prompts, other, sft)]) <= ceiling
