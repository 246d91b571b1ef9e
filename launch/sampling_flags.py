"""The flags `launch/sample.py` and `launch/evaluate.py` share: how to sample, which prompts
to read, the mesh and cluster, and one-line errors. Imported by those scripts only."""

import sys

from absl import flags

TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus mass (1.0 = off).")
TOP_K = flags.DEFINE_integer("top_k", 0, "Top-k (0 = off).")
NEW = flags.DEFINE_integer("max_new_tokens", 128, "Longest response in tokens.")
COLUMN = flags.DEFINE_string("prompt_column", "", "Column holding the prompt text (default "
                             "'prompt', or chat 'messages').")
MAX_PROMPT = flags.DEFINE_integer("max_prompt_len", 256, "Longest prompt in tokens; a longer "
                                  "one is an error (or skipped with --on_bad_row=skip).")
BAD = flags.DEFINE_enum("on_bad_row", "error", ["error", "skip"], "An unusable prompt row: "
                        "stop with its location, or skip it.")
MESH = flags.DEFINE_string("mesh", "data=-1", "Mesh axes, e.g. data=-1 or data=2,fsdp=4.")
DTYPE = flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16"],
                          "Compute dtype (auto: bfloat16 on an accelerator).")
COORD = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
NPROC = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
PID = flags.DEFINE_integer("process_id", None, "This process's index.")


def start():
  """Logging and (on clusters) jax.distributed, as launch/train.py starts."""
  from rlhf_jax import distributed, log_setup
  log_setup.configure()
  distributed.maybe_initialize(COORD.value, NPROC.value, PID.value)


def settings(num_samples: int, temperature: float, seed: int, batch_size: int):
  """`sample_responses.Settings` from these flags and the script's own."""
  from rlhf_jax import sample_responses
  return sample_responses.Settings(
      num_samples=num_samples, max_new_tokens=NEW.value, temperature=temperature,
      top_p=TOP_P.value, top_k=TOP_K.value, seed=seed, batch_size=batch_size)


def user_error(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def parse_flags(argv):
  """absl's flag parsing, with a mistake reported in one line instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    user_error(f"{str(e).splitlines()[0]} (--helpfull lists the flags)")
