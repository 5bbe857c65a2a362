# Two commands for a fresh machine:  `make speedrun`  and  `make test`.
VENV  ?= .venv
PY    := $(VENV)/bin/python
# CPU wheel of torch; override on GPU machines, e.g. `make setup TORCH=torch==2.13.0+cu128`.
TORCH ?= torch==2.13.0

.PHONY: setup speedrun test test-fast bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

speedrun: setup
	$(VENV)/bin/nanoseek speedrun $(ARGS)

# pytest exits 5 when nothing was collected: treat that as a failure of the suite layout, not success.
test: setup
	$(PY) -m pytest -q $(ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not distributed and not browser" $(ARGS)

bench: setup
	$(PY) -m benchmarks $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
