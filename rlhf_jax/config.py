"""Config schema shared by `configs/{sft,rm,ppo}.py`, and its validation.

Every field lives here with its default, so `--config.x.y=value` overrides are type-checked
by ml_collections and `validate` can name any field whose value is not allowed.
"""

from __future__ import annotations

import os

import ml_collections

from rlhf_jax.errors import ConfigError

STAGES = ("pretrain", "sft", "rm", "ppo", "dpo", "grpo")


# The logical columns a dataset row may have (`data.sources.ROLES`); each can be renamed.
COLUMN_ROLES = ("prompt", "completion", "messages", "chosen", "rejected", "responses",
                "ranks", "finished", "text")


def data_spec(path: str = "", **columns) -> ml_collections.ConfigDict:
  """One dataset: a local json/jsonl/parquet file or directory, or a hub name."""
  return ml_collections.ConfigDict(dict(
      path=path,            # '' = none (the embedded task fills it in)
      split="train",
      format="",            # '' = from the file suffix
      # Column renames, e.g. --config.data.train.columns.prompt=question ('' = the role's name)
      columns=ml_collections.ConfigDict({r: columns.get(r, "") for r in COLUMN_ROLES}),
      on_bad_row="skip",    # skip (counted and reported) | error
      max_rows=0,           # 0 = all rows
  ))


def base_config(stage: str) -> ml_collections.ConfigDict:
  """Fields common to all stages."""
  c = ml_collections.ConfigDict()
  c.stage = stage
  c.seed = 0
  # 'default' = the embedded instruction task (no downloads); '' = your own data below.
  c.task = "default"
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  # Logical axis -> mesh axis overrides, e.g. "embed=fsdp,mlp=tensor,vocab=" ('' = replicate).
  c.sharding_rules = ""

  c.model = ml_collections.ConfigDict()
  c.model.preset = "small"      # used when init_from is '' (random init)
  c.model.init_from = ""        # local HF dir or a previous stage's workdir ('' = preset)
  # Compute dtype: auto (bfloat16 on GPU / TPU, float32 on CPU) | float32 | bfloat16; the
  # params (master weights) stay float32.
  c.model.dtype = "auto"
  c.model.remat = False         # rematerialise each block in the backward pass
  # Residual dropout (embeddings, attention and MLP outputs) and attention-probability
  # dropout, in SFT and reward-model training steps only: never in rollouts, scoring,
  # evaluation or PPO (InstructGPT's SFT used residual dropout 0.2).
  c.model.dropout = 0.0
  c.model.attention_dropout = 0.0
  # LoRA (rlhf_jax/models/lora.py): rank 0 = off (full fine-tuning). With rank > 0 only the
  # adapters (and a value model's head) are trained and held in the optimiser state; the
  # base stays frozen (it is also PPO's reference); the export is the merged model.
  c.model.lora = ml_collections.ConfigDict(dict(
      rank=0,
      alpha=16.0,             # the update is (alpha / rank) * A @ B
      targets="",             # HF module names, e.g. "q_proj,v_proj" or "all"; '' = q/v
      export_adapter=True,    # also write export/adapter (PEFT format) next to the merge
  ))
  c.tokenizer = ""              # HF tokenizer dir; '' = the one next to init_from / the task's

  c.data = ml_collections.ConfigDict()
  c.data.train = data_spec()
  c.data.eval = data_spec()
  c.data.max_prompt_len = 256  # prompt tokens (longer prompts are reported and skipped)
  c.data.max_len = 512         # prompt + response tokens
  # Length bucketing: each batch is cut to the smallest of bucket_min_len * 2^i (or max_len;
  # PPO: max_prompt_len for prompts, ppo.max_new_tokens for responses) that holds its longest
  # row; one compilation per bucket. 0 pads every batch to the full length.
  c.data.bucket_min_len = 64

  c.optim = ml_collections.ConfigDict(dict(
      lr=1e-3, warmup_steps=10, schedule="cosine", final_lr_frac=0.1,
      weight_decay=0.0, b1=0.9, b2=0.95, eps=1e-8, grad_clip=1.0))

  c.train = ml_collections.ConfigDict(dict(
      batch_size=32,          # global, across all devices and hosts
      grad_accum=1,           # microbatches per update (batch_size % grad_accum == 0)
      steps=0,                # 0 = epochs * examples / batch_size
      epochs=1,
      log_every=10,
      eval_every=0,           # 0 = only at the end
      eval_batches=4,
      ckpt_every=200,         # steps between checkpoints (a final one is always written)
      keep_checkpoints=2,
      max_consecutive_skips=5,  # non-finite updates in a row before the run stops
      progress=True,          # tqdm bar
      sample_every=10,        # PPO: log rows to samples.jsonl + TensorBoard every N (0 = off)
      samples_logged=4,       # PPO: rows (prompt, response, score, KL) logged each time
      wandb="",               # PPO: Weights & Biases project to mirror metrics to ('' = off)
  ))
  return c


def _positive(c, path: str, allow_zero: bool = False):
  value = _get(c, path)
  ok = isinstance(value, (int, float)) and (value >= 0 if allow_zero else value > 0)
  if not ok:
    raise ConfigError(path, value, "a number >= 0" if allow_zero else "a number > 0")


def _int_at_least(c, path: str, lo: int):
  value = _get(c, path)
  if isinstance(value, bool) or not isinstance(value, int) or value < lo:
    raise ConfigError(path, value, f"an int >= {lo}")


def _choice(c, path: str, choices):
  value = _get(c, path)
  if value not in choices:
    raise ConfigError(path, value, "one of " + ", ".join(repr(x) for x in choices))


def _get(c, path: str):
  node = c
  for part in path.split("."):
    node = node[part]
  return node


def _check_spec(c, path: str, required: bool):
  spec = _get(c, path)
  _choice(c, f"{path}.on_bad_row", ("skip", "error"))
  _choice(c, f"{path}.format", ("", "json", "jsonl", "parquet", "csv"))
  _positive(c, f"{path}.max_rows", allow_zero=True)
  if required and not spec.path:
    raise ConfigError(f"{path}.path", spec.path,
                      "a dataset (local json/jsonl/parquet file or dir, or a hub name) "
                      "when config.task=''")
  if spec.path and (spec.path.startswith(("/", ".", "~")) or os.sep in spec.path[:1]):
    if not os.path.exists(os.path.expanduser(spec.path)):
      raise ConfigError(f"{path}.path", spec.path, "an existing file or directory")


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first field whose value is not allowed."""
  _choice(c, "stage", STAGES)
  for stage, block in (("rm", "rm"), ("ppo", "ppo"), ("dpo", "dpo"),
                       ("grpo", "grpo")):
    if c.stage == stage and block not in c:
      raise ConfigError("stage", c.stage, f"the stage of this config file (it has no "
                        f"`{block}` block: use configs/{stage}.py)")
  _choice(c, "task", ("default", ""))
  for axis in ("data", "fsdp", "tensor"):
    value = c.mesh[axis]
    if not isinstance(value, int) or (value < 1 and value != -1):
      raise ConfigError(f"mesh.{axis}", value, "a positive int, or -1 for 'the rest'")
  if sum(c.mesh[a] == -1 for a in ("data", "fsdp", "tensor")) > 1:
    raise ConfigError("mesh", dict(c.mesh), "at most one axis set to -1")
  _choice(c, "model.dtype", ("auto", "float32", "bfloat16"))
  for f in ("dropout", "attention_dropout"):
    value = c.model[f]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
      raise ConfigError(f"model.{f}", value, "a rate in [0, 1)")
  _check_lora(c)
  if c.model.init_from and not os.path.isdir(os.path.expanduser(c.model.init_from)):
    raise ConfigError("model.init_from", c.model.init_from,
                      "a local HF model directory or a previous stage's workdir")
  if c.tokenizer and not os.path.isdir(os.path.expanduser(c.tokenizer)):
    raise ConfigError("tokenizer", c.tokenizer, "a local HF tokenizer directory")
  _positive(c, "data.max_prompt_len")
  _positive(c, "data.max_len")
  _int_at_least(c, "data.bucket_min_len", 0)
  if c.data.max_prompt_len >= c.data.max_len:
    raise ConfigError("data.max_prompt_len", c.data.max_prompt_len,
                      f"less than data.max_len={c.data.max_len}")
  for spec_path in ("data.train", "data.eval"):
    _check_spec(c, spec_path, required=(spec_path == "data.train" and c.task == ""
                                        and c.stage != "ppo"))
  for extra_spec in ("norm", "ptx"):  # stage-specific datasets (rm / ppo)
    if extra_spec in c.data:
      _check_spec(c, f"data.{extra_spec}", required=False)
  _positive(c, "optim.lr")
  _positive(c, "optim.warmup_steps", allow_zero=True)
  _choice(c, "optim.schedule", ("cosine", "linear", "constant"))
  _positive(c, "optim.final_lr_frac", allow_zero=True)
  _positive(c, "optim.weight_decay", allow_zero=True)
  _positive(c, "optim.grad_clip", allow_zero=True)
  for f in ("b1", "b2"):
    if not 0.0 <= c.optim[f] < 1.0:
      raise ConfigError(f"optim.{f}", c.optim[f], "a number in [0, 1)")
  _positive(c, "optim.eps")
  for field in ("batch_size", "grad_accum", "epochs", "log_every", "keep_checkpoints",
                "max_consecutive_skips", "eval_batches"):
    _positive(c, f"train.{field}")
  for field in ("steps", "eval_every", "ckpt_every"):
    _positive(c, f"train.{field}", allow_zero=True)
  if c.train.batch_size % c.train.grad_accum:
    raise ConfigError("train.grad_accum", c.train.grad_accum,
                      f"a divisor of train.batch_size={c.train.batch_size}")
  validate_stage(c)


def sft_config(stage: str = "sft") -> ml_collections.ConfigDict:
  """SFT (and `pretrain`): InstructGPT trains 16 epochs, cosine to 10 %, residual dropout 0.2
  (`--config.model.dropout=0.2`; off by default here)."""
  return base_config(stage)


def rm_config() -> ml_collections.ConfigDict:
  c = base_config("rm")
  c.rm = ml_collections.ConfigDict(dict(
      k_max=0,                # K responses per prompt (InstructGPT: 2..9); 0 = from the data
      normalize="bias",       # bias | bias_gain | none  (measured on data.norm)
  ))
  c.data.norm = data_spec()   # demonstrations (prompt/completion) for the normalisation
  c.optim.lr = 1e-4
  return c


def ppo_config() -> ml_collections.ConfigDict:
  c = base_config("ppo")
  c.ppo = ml_collections.ConfigDict(dict(
      reward_from="",         # RM: HF dir or RM workdir ('' = reward_fn only)
      # A Python reward, called on the host as
      # name(prompts: list[str], responses: list[str]) -> list[float]:
      reward_fn="",           # path/to/file.py:name or module:name ('' = the RM only)
      reward_model_weight=1.0,  # score = reward_model_weight * normalised RM score + ...
      reward_fn_weight=1.0,     # ... + reward_fn_weight * reward_fn's score
      value_from="",          # value model init ('' = the reward model, as in InstructGPT)
      value_lora=True,        # with model.lora.rank > 0: LoRA (+ its head) for the value model too
      iterations=100,         # rollout + update rounds
      max_new_tokens=256,     # response tokens per rollout (prompt + response <= data.max_len)
      temperature=1.0,
      top_k=0,               # must stay 0 / 1.0: PPO samples from softmax(logits / temperature)
      top_p=1.0,
      # π_old of the ratio and the KL: score = the policy's full forward over the rollout |
      # sampler = the rollout's own per-token log-probs, one policy forward fewer per
      # iteration; equal up to float32 rounding in float32, up to ~0.02 nats a token apart
      # in bfloat16 (the KV-cache decode path rounds differently)
      old_logprobs="score",
      # Up to this many halvings of the rollout's decode batch once half its rows have
      # stopped (sampling.generate(compact=)): the same samples, less compute on finished
      # rows; each width compiles one more decode loop; 0 = off
      rollout_compaction=2,
      epochs=1,               # InstructGPT: 1 PPO epoch per batch
      minibatches=4,
      clip_eps=0.2,
      value_clip_eps=0.2,
      vf_coef=1.0,
      value_lr_scale=1.0,     # value-model lr = optim.lr * this
      gamma=1.0,
      lam=0.95,
      whiten_advantages=True,
      kl_coef=0.02,           # β
      kl_kind="k1",           # k1 | k2 | k3 estimator in the reward
      kl_controller="fixed",  # fixed | adaptive (Ziegler et al. 2019)
      kl_target=6.0,
      kl_horizon=10000,
      no_eos_penalty=1.0,     # subtracted from the score of a response without EOS
      ptx_coef=1.0,           # γ of PPO-ptx (InstructGPT: 27.8 on its loss scale); 0 = PPO
      ptx_batch_size=8,       # pretraining sequences per minibatch
      ema_decay=0.0,          # InstructGPT used 0.992; 0 = off
      kl_warn=50.0,           # warn loudly (log + `kl_warn` metric) when KL exceeds this; 0 = off
      score_warn=100.0,       # ... when |mean RM score| exceeds this (reward hacking); 0 = off
  ))
  c.data.ptx = data_spec()    # plain text for PPO-ptx
  c.optim.lr = 1e-5
  c.optim.warmup_steps = 0
  c.optim.schedule = "constant"
  c.train.log_every = 1
  c.train.ckpt_every = 20
  return c


def dpo_config() -> ml_collections.ConfigDict:
  """DPO on chosen/rejected pairs or K-way rankings (the RM's data), from an SFT model.

  `dpo.rankings` says how a K-way ranking becomes a loss; it is a field of its own (not a
  `dpo.loss` value) because it is about the data, and both choices are DPO on pairs:
  `plackett_luce` (default) is the likelihood of the whole ranking under the Plackett–Luce
  model DPO derives from, so a ranking counts once and its pairs are not treated as
  independent observations; `all_pairs` is the RM's reading of the same rows (InstructGPT
  eq. 1: each of a prompt's pairs a term, averaged per prompt), which IPO and cDPO label
  smoothing need, being defined on pairs only.
  """
  c = base_config("dpo")
  c.dpo = ml_collections.ConfigDict(dict(
      beta=0.1,               # β: strength of the KL tie to the reference (the init model)
      # How a row with K ranked responses becomes a loss (chosen/rejected rows are K = 2,
      # where both are DPO exactly): plackett_luce = the ranking's Plackett-Luce likelihood
      # (Rafailov et al. App. A.3; ties by Breslow) | all_pairs = every pair with different
      # ranks, averaged per prompt as the RM's loss (InstructGPT eq. 1): needed for ipo /
      # label_smoothing, which are defined on pairs.
      rankings="plackett_luce",
      loss="dpo",             # dpo (sigmoid, eq. 7) | ipo (Azar et al. eq. 17): all_pairs only
      label_smoothing=0.0,    # cDPO's flip probability ε in [0, 0.5): loss=dpo, all_pairs
      k_max=0,                # K responses per prompt; 0 = from the data
  ))
  c.optim.lr = 1e-5
  c.optim.warmup_steps = 10
  return c


# PPO's fields GRPO has no use for (value model, GAE, KL controller, EMA): they must stay at
# their defaults in a GRPO config, so that setting one is an error rather than a no-op.
PPO_ONLY = ("value_from", "value_clip_eps", "vf_coef", "value_lr_scale", "gamma", "lam",
            "whiten_advantages", "kl_controller", "kl_target", "kl_horizon", "ema_decay")
GRPO_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp")


def grpo_config() -> ml_collections.ConfigDict:
  """GRPO, Dr. GRPO, RLOO and REINFORCE++: critic-free online RL (`trainers/grpo.py`).

  The `ppo` block is shared: the reward sources (`ppo.reward_from`, `ppo.reward_fn`, their
  weights, `ppo.no_eos_penalty`), the rollout (`ppo.iterations`, `ppo.max_new_tokens`,
  `ppo.temperature`), the update (`ppo.epochs`, `ppo.minibatches`, `ppo.clip_eps`,
  `ppo.kl_coef`, optional `ppo.ptx_coef`) and the alarms mean what they mean in PPO; only
  what is new lives in `grpo`. `train.batch_size` counts prompts: a rollout has
  `train.batch_size * grpo.group_size` responses.
  """
  c = ppo_config()
  c.stage = "grpo"
  c.grpo = ml_collections.ConfigDict(dict(
      # grpo: (r - mean) / std within each prompt's group (Shao et al. 2024) | dr_grpo: no
      # std division (Liu et al. 2025) | rloo: leave-one-out baseline (Ahmadian et al. 2024)
      # | reinforce_pp: KL in the per-token reward, batch-whitened returns (Hu 2025)
      estimator="grpo",
      group_size=4,           # G responses per prompt (one generate on the repeated batch)
      length_norm="token",    # token: Σ over all tokens / their count | sequence: eq. 3's
                              # mean per response, then over responses
      clip_eps_high=0.0,      # upper clip ε (DAPO's clip-higher); 0 = ppo.clip_eps
  ))
  # β of the k3 KL loss term (GRPO / Dr. GRPO / RLOO; DeepSeekMath: 0.04), or of the
  # per-token `ppo.kl_kind` KL in the reward (REINFORCE++).
  c.ppo.kl_coef = 0.04
  c.ppo.ptx_coef = 0.0        # > 0 adds PPO-ptx's pretraining term (needs data.ptx.path)
  c.ppo.minibatches = 4
  return c


def _validate_grpo(c) -> None:
  g, p = c.grpo, c.ppo
  _choice(c, "grpo.estimator", GRPO_ESTIMATORS)
  _choice(c, "grpo.length_norm", ("token", "sequence"))
  lo = 1 if g.estimator == "reinforce_pp" else 2
  value = g.group_size
  if isinstance(value, bool) or not isinstance(value, int) or value < lo:
    raise ConfigError("grpo.group_size", value,
                      f"an int >= {lo} (grpo.estimator={g.estimator!r}"
                      + (": a group baseline needs another sample of the prompt)" if lo == 2
                         else ")"))
  _positive(c, "grpo.clip_eps_high", allow_zero=True)
  defaults = ppo_config().ppo
  for f in PPO_ONLY:
    if p[f] != defaults[f]:
      raise ConfigError(f"ppo.{f}", p[f], f"its default {defaults[f]!r}: GRPO has no value "
                        "model, GAE, KL controller or EMA (this field is PPO's)")
  if (c.train.batch_size * value) % p.minibatches:
    raise ConfigError("ppo.minibatches", p.minibatches,
                      f"a divisor of train.batch_size * grpo.group_size = "
                      f"{c.train.batch_size * value} (the responses of one rollout)")


def validate_stage(c) -> None:
  """Stage-specific checks on top of `validate`."""
  _int_at_least(c, "train.sample_every", 0)
  _int_at_least(c, "train.samples_logged", 1)
  _check_wandb_project(c.train.wandb)
  if c.stage == "rm":
    if isinstance(c.rm.k_max, bool) or not isinstance(c.rm.k_max, int) or c.rm.k_max < 0 \
        or c.rm.k_max == 1:
      raise ConfigError("rm.k_max", c.rm.k_max, "an int >= 2, or 0 for the data's largest K")
    _choice(c, "rm.normalize", ("bias", "bias_gain", "none"))
    if c.task == "" and c.rm.normalize != "none" and not c.data.norm.path:
      raise ConfigError("data.norm.path", c.data.norm.path,
                        "demonstrations (prompt/completion or chat rows) to measure the "
                        f"reward normalisation rm.normalize={c.rm.normalize!r} on, or "
                        "--config.rm.normalize=none")
  if c.stage == "dpo":
    _validate_dpo(c)
  if c.stage == "grpo":
    _validate_grpo(c)
  if c.stage in ("ppo", "grpo"):
    p = c.ppo
    for f in ("iterations", "max_new_tokens", "temperature", "epochs", "minibatches",
              "ptx_batch_size", "kl_target", "kl_horizon"):
      _positive(c, f"ppo.{f}")
    for f in ("clip_eps", "value_clip_eps", "vf_coef", "kl_coef", "ptx_coef", "top_k",
              "no_eos_penalty", "value_lr_scale", "kl_warn", "score_warn"):
      _positive(c, f"ppo.{f}", allow_zero=True)
    if not 0.0 < p.top_p <= 1.0:
      raise ConfigError("ppo.top_p", p.top_p, "a number in (0, 1]")
    # PPO's ratio and KL are log-probs of softmax(logits / temperature): a rollout drawn from
    # a top-k / top-p filtered distribution would make every update silently off-policy.
    for f, off in (("top_k", 0), ("top_p", 1.0)):
      if p[f] != off:
        raise ConfigError(f"ppo.{f}", p[f], f"{off} in PPO: the ratio and the KL are "
                          "computed on softmax(logits / ppo.temperature), the distribution "
                          "the rollout must be drawn from (use ppo.temperature instead)")
    for f in ("gamma", "lam"):
      if not 0.0 <= p[f] <= 1.0:
        raise ConfigError(f"ppo.{f}", p[f], "a number in [0, 1]")
    if not 0.0 <= p.ema_decay < 1.0:
      raise ConfigError("ppo.ema_decay", p.ema_decay, "a number in [0, 1)")
    _choice(c, "ppo.kl_kind", ("k1", "k2", "k3"))
    _choice(c, "ppo.kl_controller", ("fixed", "adaptive"))
    _choice(c, "ppo.old_logprobs", ("score", "sampler"))
    _int_at_least(c, "ppo.rollout_compaction", 0)
    if c.stage == "ppo" and c.train.batch_size % p.minibatches:
      raise ConfigError("ppo.minibatches", p.minibatches,
                        f"a divisor of train.batch_size={c.train.batch_size}")
    for f in ("reward_model_weight", "reward_fn_weight"):
      _positive(c, f"ppo.{f}", allow_zero=True)
    _check_reward_fn(p.reward_fn)
    if c.data.max_prompt_len + p.max_new_tokens > c.data.max_len:
      raise ConfigError("ppo.max_new_tokens", p.max_new_tokens,
                        f"at most data.max_len - data.max_prompt_len = "
                        f"{c.data.max_len - c.data.max_prompt_len}")


def _validate_dpo(c) -> None:
  d = c.dpo
  if c.task == "" and not c.model.init_from:
    raise ConfigError("model.init_from", c.model.init_from, "the SFT model (HF dir or SFT "
                      "workdir) DPO starts from: it is also the frozen reference")
  if isinstance(d.beta, bool) or not isinstance(d.beta, (int, float)) or not d.beta > 0:
    raise ConfigError("dpo.beta", d.beta, "a number > 0")
  _choice(c, "dpo.rankings", ("plackett_luce", "all_pairs"))
  _choice(c, "dpo.loss", ("dpo", "ipo"))
  if isinstance(d.k_max, bool) or not isinstance(d.k_max, int) or d.k_max < 0 or d.k_max == 1:
    raise ConfigError("dpo.k_max", d.k_max, "an int >= 2, or 0 for the data's largest K")
  if not isinstance(d.label_smoothing, (int, float)) or not 0.0 <= d.label_smoothing < 0.5:
    raise ConfigError("dpo.label_smoothing", d.label_smoothing, "a number in [0, 0.5)")
  # The Plackett-Luce likelihood has no IPO or label-smoothed form: those act on pairs.
  if d.rankings == "plackett_luce" and d.loss != "dpo":
    raise ConfigError("dpo.loss", d.loss, "'dpo' with dpo.rankings='plackett_luce' (IPO "
                      "is a loss on pairs: set --config.dpo.rankings=all_pairs)")
  if d.label_smoothing and (d.rankings != "all_pairs" or d.loss != "dpo"):
    raise ConfigError("dpo.label_smoothing", d.label_smoothing,
                      "0 unless dpo.loss='dpo' and dpo.rankings='all_pairs' (cDPO smooths "
                      "the label of a pair)")


def _check_lora(c) -> None:
  """`model.lora`: the numbers, the target names, and the stages that take it."""
  lo = c.model.lora
  _int_at_least(c, "model.lora.rank", 0)
  _positive(c, "model.lora.alpha")
  from rlhf_jax.models import lora
  lora.check_names(tuple(t.strip() for t in lo.targets.split(",") if t.strip()))
  if lo.rank == 0:
    return
  if c.stage in ("rm", "grpo", "dpo"):
    raise ConfigError("model.lora.rank", lo.rank, f"0 for the {c.stage} stage (LoRA trains "
                      "the policy in sft / pretrain / ppo, and PPO's value model; the "
                      f"{c.stage} stage trains the full model)")
  if "ppo" in c and c.ppo.ema_decay > 0:
    # An EMA of the factors A and B is not the EMA of the merged update A @ B.
    raise ConfigError("ppo.ema_decay", c.ppo.ema_decay, "0 with model.lora.rank > 0")


def _check_reward_fn(spec: str) -> None:
  """`ppo.reward_fn`'s shape, and its file when it names one (importing waits for PPO)."""
  if not spec:
    return
  from rlhf_jax import reward_fns
  try:
    source, _ = reward_fns.split_spec(spec)
  except ValueError as e:
    raise ConfigError("ppo.reward_fn", spec, str(e)) from None
  if reward_fns.is_file_spec(source) and not os.path.isfile(os.path.expanduser(source)):
    raise ConfigError("ppo.reward_fn", spec, "an existing Python file, then :function")


def _check_wandb_project(project: str) -> None:
  """A W&B project name: printable, at most 128 characters, none of / \\ # ? % :."""
  if project and (len(project) > 128 or not project.isprintable() or
                  any(ch in project for ch in "/\\#?%:") or project != project.strip()):
    raise ConfigError("train.wandb", project, "a Weights & Biases project name (at most 128 "
                      "printable characters, none of / \\ # ? % :), or '' for off")


def variants(arg) -> list:
  """The comma-separated variants of `--config=configs/<stage>.py:<arg>`."""
  return [v.strip() for v in (arg or "").split(",") if v.strip()]


def apply_variant(c: ml_collections.ConfigDict, arg) -> ml_collections.ConfigDict:
  """`--config=configs/<stage>.py:tiny` shrinks everything to a CI/laptop smoke test (the
  built-in task's own sizes shrink in `pipeline.settings.task_settings`)."""
  for variant in variants(arg):
    if variant == "tiny":
      c.train.batch_size = 16
      c.train.log_every = 2
      c.model.preset = "tiny"
      c.train.eval_batches = 1
      c.train.progress = False
      if "ppo" in c:
        c.ppo.iterations = 3
        c.ppo.minibatches = 2
        c.ppo.max_new_tokens = 8
        c.ppo.ptx_batch_size = 4
      if not c.train.steps:
        c.train.steps = 4
    else:
      raise ConfigError("<config arg>", variant, "'' or 'tiny'")
  return c


def compute_dtype(value: str) -> str:
  """`model.dtype` as a concrete dtype: 'auto' is bfloat16 on an accelerator, else float32."""
  if value != "auto":
    return value
  import jax
  return "float32" if jax.default_backend() == "cpu" else "bfloat16"
