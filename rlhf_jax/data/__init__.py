"""Datasets -> static-shape numpy arrays for the trainers.

    from rlhf_jax import data
    spec = data.DataSpec(path="train.jsonl", split="train", format=None,
                         columns=dict(prompt="question"), on_bad_row="skip", max_rows=None)
    sft = data.load_sft(spec, tokenizer, max_prompt_len, max_len)
    rm = data.load_comparisons(spec, tokenizer, max_prompt_len, max_len, k_max)
    pr = data.load_prompts(spec, tokenizer, max_prompt_len)          # LEFT padded, .texts
    ptx = data.load_text(spec, tokenizer, seq_len, pack=True)
    sft.arrays["input_ids"], sft.report, sft.format, sft.is_chat     # TokenArrays
    stops = data.stop_ids(tokenizer)   # EOS + chat end-of-turn ids: sampling.generate(eos_id=)
    it = data.BatchIterator(sft.arrays, global_batch_size, seed, process_index, process_count)
    batch = next(it); it.state(); it.restore(state)
    # length bucketing: each batch cut to the smallest of 64, 128, ..., max_len holding it
    it = data.BatchIterator(sft.arrays, ..., bucketing=data.Bucketing(
        ("input_ids", "attention_mask", "loss_mask"), smallest=64, side="right"))
    data.check_tokenizer(tokenizer, vocab_size, name); data.check_same_tokenizer(a, b)
    # on-disk cache: each of P processes tokenizes rows i % P == p, reads only its batches
    sft = data.load_cached("sft", spec, tokenizer, dict(max_prompt_len=64, max_len=256),
                           cache_dir, process_index=p, process_count=P, barrier=fn)

Rooms: `sources` (open a file / directory / hub dataset), `validate` (bad rows, `DataError`,
`DataReport`), `vocab` (tokenizer helpers, BOS policy), `chat` (a chat template's
end-of-turn text and the stop ids), `tokenize` (the loaders and their array layouts),
`batches` (`BatchIterator`), `cache` (tokenized shards on disk, memory-mapped, per-host
tokenization and reading). Each module's docstring has the details.
"""

from rlhf_jax.data.batches import BatchIterator, Bucketing, bucket_for, length_buckets
from rlhf_jax.data.cache import load_cached
from rlhf_jax.data.chat import closing_text, end_of_turn_ids, stop_ids
from rlhf_jax.data.sources import DataSpec, open_source
from rlhf_jax.data.tokenize import (TokenArrays, load_comparisons, load_kind, load_prompts,
                                    load_sft, load_text)
from rlhf_jax.data.validate import DataError, DataReport
from rlhf_jax.data.vocab import check_same_tokenizer, check_tokenizer

__all__ = [
    "BatchIterator", "Bucketing", "DataError", "bucket_for", "DataReport", "DataSpec",
    "TokenArrays", "check_same_tokenizer", "check_tokenizer", "closing_text",
    "end_of_turn_ids", "load_cached", "load_comparisons", "load_kind", "load_prompts",
    "length_buckets", "load_sft", "load_text", "open_source", "stop_ids",
]
