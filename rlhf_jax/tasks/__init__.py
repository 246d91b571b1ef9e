"""The embedded default task: a small instruction world that needs no downloads.

- ``instructions``: vocabulary, the five instruction kinds (copy, reverse, sort, count, last),
  ``TaskConfig``, ``Prompt``, ``sample_prompts`` and the train / heldout / eval splits.
- ``tokenizer``: ``build_tokenizer()``, a word-level ``PreTrainedTokenizerFast`` built in code.
- ``corpus``: the misaligned ``pretraining_corpus``, the ``demonstrations`` and
  ``write_datasets`` (jsonl files for the ordinary data loaders).
- ``oracle``: the hidden labeler ``Oracle`` (score / rank / prefers). Trainers never import
  it; only the pipeline's ranking collection and the evaluation do.

Example::

  from rlhf_jax import tasks
  tok = tasks.build_tokenizer()
  prompts = tasks.sample_prompts(seed=0, n=4, split="eval")
  oracle = tasks.Oracle(seed=0, noise=0.1)
  oracle.score(prompts[0].text, prompts[0].completion)      # 1.0
"""

from rlhf_jax.tasks.corpus import (CATEGORIES, demonstrations, pretraining_corpus,
                                   write_datasets)
from rlhf_jax.tasks.instructions import (EOS, FILLER, KINDS, SPLITS, UNSAFE, VOCAB, Prompt,
                                         TaskConfig, correct_answer, make_prompt,
                                         parse_prompt, sample_prompts, split_of)
from rlhf_jax.tasks.oracle import Oracle, response_words
from rlhf_jax.tasks.tokenizer import build_tokenizer

__all__ = [
    "CATEGORIES", "EOS", "FILLER", "KINDS", "SPLITS", "UNSAFE", "VOCAB", "Oracle", "Prompt",
    "TaskConfig", "build_tokenizer", "correct_answer", "demonstrations", "make_prompt",
    "parse_prompt", "pretraining_corpus", "response_words", "sample_prompts", "split_of",
    "write_datasets",
]
