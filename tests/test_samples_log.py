"""What the policy writes (`samples.jsonl`, TensorBoard text) and the optional W&B mirror.

Oracles: the rows read back from samples.jsonl and from the TensorBoard event files (parsed
with tensorboardX's protobufs); a resumed run ends with exactly the rows of an uninterrupted
one; a fake `wandb` module (in `sys.modules`, or first on the launcher's PYTHONPATH: wandb
is not a dependency and is never installed here) records what it is given.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import shutil
import struct
import sys
import textwrap
import types

import pytest

import helpers
from rlhf_jax import metrics, samples_log
from rlhf_jax.errors import UserError

KEYS = {"step", "stage", "row", "prompt", "response", "score", "kl"}


def tb_texts(logdir: str) -> list:
  """(step, tag, text) of every text summary in the event files under `logdir`."""
  from tensorboardX.event_file_writer import event_pb2
  out = []
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
    with open(path, "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for v in event.summary.value:
        if v.metadata.plugin_data.plugin_name == "text":
          out.append((event.step, v.tag, v.tensor.string_val[0].decode("utf-8")))
  return out


def _rows(n, tag):
  return [dict(prompt=f"say : a {i} =", response=f"{tag} good | {i}", score=0.5 * i,
               fn_score=float(i), kl=0.1 * i) for i in range(n)]


# ----------------------------------------------------------------------- the writer


def test_samples_jsonl_tensorboard_text_and_resume(tmp_path):
  with samples_log.SamplesWriter(tmp_path, "ppo", enabled=True) as w:
    w.write(2, _rows(3, "first"))
    w.write(4, _rows(3, "second"))
    w.write(6, [dict(prompt="p", response="r", score=float("nan"), kl=0.0)])
  rows = samples_log.read_samples(tmp_path)
  assert [(r["step"], r["row"]) for r in rows] == [(2, 0), (2, 1), (2, 2), (4, 0), (4, 1),
                                                   (4, 2), (6, 0)]
  assert set(rows[0]) == KEYS | {"fn_score"} and rows[0]["stage"] == "ppo"
  assert rows[4]["response"] == "second good | 1" and rows[4]["fn_score"] == 1.0
  assert rows[-1]["score"] is None   # JSON has no NaN
  texts = tb_texts(str(tmp_path / "tb" / "ppo"))
  assert [(s, t) for s, t, _ in texts] == [(2, "samples/text_summary"),
                                           (4, "samples/text_summary"),
                                           (6, "samples/text_summary")]
  table = texts[1][2].splitlines()
  assert table[0] == "| row | prompt | response | score | fn_score | kl |"
  assert table[3] == "| 1 | say : a 1 = | second good \\| 1 | 0.5 | 1 | 0.1 |"
  # A kill mid-line, then a resume from the checkpoint at step 2: later rows go.
  with open(tmp_path / samples_log.SAMPLES_FILE, "a") as f:
    f.write('{"step": 8, "row"')
  w = samples_log.SamplesWriter(tmp_path, "ppo", enabled=True, resume_step=2)
  w.write(4, _rows(1, "again"))
  w.close()
  rows = samples_log.read_samples(tmp_path)
  assert [(r["step"], r["row"]) for r in rows] == [(2, 0), (2, 1), (2, 2), (4, 0)]
  assert rows[-1]["response"] == "again good | 0"


def test_disabled_writer_writes_nothing(tmp_path):
  w = samples_log.SamplesWriter(tmp_path / "run", "ppo", enabled=False)
  assert w.write(2, _rows(2, "x")) == []
  w.close()
  assert not os.path.exists(tmp_path / "run")


# ---------------------------------------------------------------- W&B (a fake module)


class FakeWandb(types.ModuleType):
  """Records `wandb.init` / `run.log` / `run.finish` calls."""

  def __init__(self):
    super().__init__("wandb")
    self.calls = []
    fake = self

    class Table:
      def __init__(self, columns, data):
        self.columns, self.data = columns, data

    class Run:
      def log(self, data, step=None):
        fake.calls.append(("log", step, data))

      def finish(self):
        fake.calls.append(("finish",))

    self.Table = Table
    self._run = Run

  def init(self, **kwargs):
    self.calls.append(("init", dict(kwargs, mode=os.environ.get("WANDB_MODE"))))
    return self._run()


@pytest.fixture
def fake_wandb(monkeypatch, tmp_path):
  fake = FakeWandb()
  monkeypatch.setitem(sys.modules, "wandb", fake)
  for var in ("WANDB_API_KEY", "WANDB_MODE"):   # set then deleted: restored after the test
    monkeypatch.setenv(var, "")
    monkeypatch.delenv(var)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))   # no ~/.netrc with a saved key
  return fake


def test_wandb_gets_the_scalars_and_the_samples_table_offline(fake_wandb, tmp_path):
  workdir = tmp_path / "run"
  sink = metrics.WandbSink("my-project", workdir, "ppo", config={"seed": 3})
  with metrics.attached(workdir, "ppo", [sink]):
    with metrics.MetricsWriter(workdir, "ppo", enabled=True) as w:
      w.write(1, {"score": 0.5, "kl": float("nan"), "note": "x", "flag": True, "v": [1.0]})
      w.write(2, {"score": 0.75, "eval/score": 1.0})
    with samples_log.SamplesWriter(workdir, "ppo", enabled=True, wandb=sink) as s:
      s.write(2, _rows(2, "t"))
  # Detached on exit: a later writer of the same workdir does not forward.
  with metrics.MetricsWriter(workdir, "ppo", enabled=True) as w:
    w.write(3, {"score": 9.0})
  sink.close()
  init = fake_wandb.calls[0]
  assert init[0] == "init" and init[1]["project"] == "my-project"
  assert init[1]["mode"] == "offline" and os.environ["WANDB_MODE"] == "offline"
  assert init[1]["config"] == {"seed": 3} and init[1]["dir"] == str(workdir)
  logs = [c for c in fake_wandb.calls if c[0] == "log"]
  assert [(step, data) for _, step, data in logs[:2]] == [
      (1, {"score": 0.5}), (2, {"score": 0.75, "eval/score": 1.0})]
  _, step, data = logs[2]
  table = data["samples"]
  assert step == 2 and table.columns == ["row", "prompt", "response", "score", "fn_score",
                                         "kl"]
  assert table.data[1] == [1, "say : a 1 =", "t good | 1", 0.5, 1.0, 0.1]
  assert len(logs) == 3 and fake_wandb.calls[-1] == ("finish",)
  # A resumed run continues the same W&B run.
  metrics.WandbSink("my-project", workdir, "ppo").close()
  inits = [c[1] for c in fake_wandb.calls if c[0] == "init"]
  assert inits[1]["id"] == inits[0]["id"] and inits[1]["resume"] == "allow"


def test_wandb_with_a_key_is_left_online(fake_wandb, tmp_path, monkeypatch):
  monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
  metrics.WandbSink("p", tmp_path / "run", "ppo").close()
  assert fake_wandb.calls[0][1]["mode"] is None and "WANDB_MODE" not in os.environ


def test_wandb_not_installed_is_a_one_line_user_error(monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)   # import wandb -> ImportError
  with pytest.raises(UserError, match=r"^config\.train\.wandb='proj' needs the Weights & "
                     r"Biases client: pip install wandb"):
    metrics.WandbSink("proj", "/nonexistent", "ppo")


# ---------------------------------------------------------------- through the launcher

FAKE_WANDB_MODULE = """
import json, os

def _record(entry):
  with open(os.environ["FAKE_WANDB_LOG"], "a") as f:
    f.write(json.dumps(entry) + "\\n")

class Table:
  def __init__(self, columns, data):
    self.columns, self.data = columns, data

class _Run:
  def log(self, data, step=None):
    _record(dict(call="log", step=step, data={
        k: (dict(columns=v.columns, rows=v.data) if isinstance(v, Table) else v)
        for k, v in data.items()}))

  def finish(self):
    _record(dict(call="finish"))

def init(**kwargs):
  _record(dict(call="init", id=kwargs["id"], project=kwargs["project"],
               mode=os.environ.get("WANDB_MODE"), config_keys=sorted(kwargs["config"])))
  return _Run()
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  pytest.importorskip("torch", reason="torch makes the tiny HF checkpoints (test extra)")
  d = tmp_path_factory.mktemp("samples")
  fake = d / "fake_wandb"
  fake.mkdir()
  (fake / "wandb.py").write_text(textwrap.dedent(FAKE_WANDB_MODULE))
  (d / "fn.py").write_text("def count(prompts, responses):\n"
                           "  return [len(r.split()) for r in responses]\n")
  return dict(base=helpers.tiny_hf_llama(str(d / "base")), fake=str(fake),
              fn=str(d / "fn.py") + ":count",
              prompts=helpers.write_jsonl(str(d / "prompts.jsonl"), [
                  dict(prompt=r["prompt"]) for r in helpers.copy_rows(32)]))


def _ppo(files, workdir, log_path, *extra):
  return helpers.run_launcher(
      "configs/ppo.py", workdir, "--config.task=", f"--config.model.init_from={files['base']}",
      f"--config.data.train.path={files['prompts']}", "--config.ppo.ptx_coef=0",
      f"--config.ppo.reward_fn={files['fn']}", "--config.ppo.iterations=4",
      "--config.train.batch_size=8", "--config.ppo.minibatches=2",
      "--config.ppo.max_new_tokens=4", "--config.data.max_prompt_len=8",
      "--config.data.max_len=12", "--config.train.sample_every=2",
      "--config.train.samples_logged=3", "--config.train.ckpt_every=2",
      "--config.train.wandb=test-project", "--config.ppo.no_eos_penalty=0", *extra,
      env_extra=dict(PYTHONPATH=files["fake"], FAKE_WANDB_LOG=log_path, WANDB_API_KEY="",
                     HOME=os.path.dirname(log_path)))


def test_ppo_logs_samples_tensorboard_text_and_wandb_and_resumes(files, tmp_path):
  workdir, log_path = str(tmp_path / "ppo"), str(tmp_path / "wandb_calls.jsonl")
  proc = _ppo(files, workdir, log_path)
  assert proc.returncode == 0, proc.stderr[-4000:]
  rows = samples_log.read_samples(workdir)
  assert [(r["step"], r["row"]) for r in rows] == [(2, 0), (2, 1), (2, 2), (4, 0), (4, 1),
                                                   (4, 2)]
  prompts = {json.loads(line)["prompt"] for line in open(files["prompts"])}
  for r in rows:
    assert set(r) == KEYS | {"fn_score"}, r
    assert r["prompt"] in prompts            # the dataset's text, not a decoding of it
    assert r["fn_score"] == len(r["response"].split())   # what the function returned
    assert r["score"] == pytest.approx(r["fn_score"])   # weight 1, no RM, no penalty
  texts = tb_texts(os.path.join(workdir, "tb", "ppo"))
  assert [s for s, _, _ in texts] == [2, 4]
  assert rows[3]["response"].replace("|", "\\|") in texts[1][2].splitlines()[2]
  calls = [json.loads(line) for line in open(log_path)]
  assert calls[0]["call"] == "init" and calls[0]["project"] == "test-project"
  assert calls[0]["mode"] == "offline" and "ppo" in calls[0]["config_keys"]
  scalars = [c for c in calls if c["call"] == "log" and "score" in c["data"]]
  assert [c["step"] for c in scalars] == [1, 2, 3, 4]
  by_step = {r["step"]: r for r in helpers.read_metrics(workdir) if "score" in r}
  for c in scalars:
    assert c["data"]["score"] == pytest.approx(by_step[c["step"]]["score"])
    assert c["data"]["kl"] == pytest.approx(by_step[c["step"]]["kl"])
  tables = [c for c in calls if c["call"] == "log" and "samples" in c["data"]]
  assert [c["step"] for c in tables] == [2, 4]
  assert tables[1]["data"]["samples"]["rows"][0][2] == rows[3]["response"]
  assert calls[-1]["call"] == "finish"

  # A crash after step 4's samples but before its checkpoint: resume from step 2 drops
  # step 4's rows and writes them again, once.
  shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))
  proc = _ppo(files, workdir, log_path)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "resumed from" in proc.stderr
  again = samples_log.read_samples(workdir)
  assert [(r["step"], r["row"]) for r in again] == [(2, 0), (2, 1), (2, 2), (4, 0), (4, 1),
                                                    (4, 2)]
  assert again[:3] == rows[:3]
  inits = [json.loads(line) for line in open(log_path) if '"init"' in line]
  assert len(inits) == 2 and inits[1]["id"] == inits[0]["id"]
  assert len(tb_texts(os.path.join(workdir, "tb", "ppo"))) == 3   # 2 and 4, then 4 again


def test_wandb_requested_but_not_installed_stops_before_models_load(files, tmp_path):
  if importlib.util.find_spec("wandb") is not None:
    pytest.skip("wandb is installed here")
  proc = helpers.run_launcher(
      "configs/ppo.py", str(tmp_path / "w"), "--config.task=",
      f"--config.model.init_from={files['base']}",
      f"--config.data.train.path={files['prompts']}", "--config.ppo.ptx_coef=0",
      f"--config.ppo.reward_fn={files['fn']}", "--config.train.wandb=proj",
      "--config.data.max_prompt_len=8", "--config.data.max_len=12",
      "--config.ppo.max_new_tokens=4")
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  errors = [line for line in proc.stderr.splitlines() if "error: " in line]
  assert len(errors) == 1 and "pip install wandb" in errors[0], proc.stderr[-2000:]
  assert "[ppo] prompts" not in proc.stderr
