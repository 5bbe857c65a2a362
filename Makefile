# Two commands for a fresh machine:  `make speedrun`  and  `make test`.
VENV  ?= .venv
PY    := $(VENV)/bin/python
# CPU wheel of torch; override on GPU machines, e.g. `make setup TORCH=torch==2.13.0+cu128`.
TORCH ?= torch==2.13.0

.PHONY: setup speedrun test test-fast test-dtypes bench clean

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

# The tests that train with dtype "auto" (marker auto_dtype), with each dtype forced: NANOSEEK_CPU_BF16=0 (fp32)
# and =1 (bf16 autocast), so both paths stay green whatever this CPU would choose. The slow quick speedrun runs
# on the fp32 side only: forced bf16 on a CPU without bf16 instructions stretches it from ~1 to ~8 minutes
# (bf16 matmul is ~70x slower there). Both passes run; the target fails if either does.
test-dtypes: setup
	@rc=0; \
	echo "NANOSEEK_CPU_BF16=0 pytest -m auto_dtype"; \
	NANOSEEK_CPU_BF16=0 $(PY) -m pytest -q -m auto_dtype $(ARGS) || rc=$$?; \
	echo "NANOSEEK_CPU_BF16=1 pytest -m 'auto_dtype and not slow'"; \
	NANOSEEK_CPU_BF16=1 $(PY) -m pytest -q -m "auto_dtype and not slow" $(ARGS) || rc=$$?; \
	exit $$rc

bench: setup
	$(PY) -m benchmarks $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
