# The two commands the README opens with: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
WORKDIR ?= runs/demo

.PHONY: venv demo test clean

# The library alone (what `make demo` needs: no torch).
$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e .
	touch $@

# The test extra: torch==2.13.0 (transformers' PyTorch reference) picks the local CPU build.
$(BIN)/.installed-test: $(BIN)/.installed
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

venv: $(BIN)/.installed

# The whole pipeline on the embedded default task (pretrain -> SFT -> RM -> PPO-ptx -> eval).
demo: venv
	$(BIN)/python launch/train.py --config=configs/ppo.py --workdir=$(WORKDIR)

test: $(BIN)/.installed-test
	$(BIN)/python -m pytest -n 2 -q tests

clean:
	rm -rf $(VENV) runs
