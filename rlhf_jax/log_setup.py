"""Console logging: our progress lines at INFO, library chatter (orbax, absl) at WARNING."""

from __future__ import annotations

import logging
import sys


def configure(level: int = logging.INFO) -> logging.Logger:
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every file it writes at INFO
  log = logging.getLogger("rlhf_jax")
  if not log.handlers:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    log.addHandler(handler)
  log.setLevel(level)
  log.propagate = False
  return log
