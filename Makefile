# Two commands for a fresh machine:  `make speedrun`  and  `make test`.
VENV  ?= .venv
PY    := $(VENV)/bin/python
# CPU wheel of torch; override on GPU machines, e.g. `make setup TORCH=torch==2.13.0+cu128`.
TORCH ?= torch==2.13.0

.PHONY: setup speedrun test test-fast test-other-dtype bench clean

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

# The tests that train in the dtype this CPU picks (marker auto_dtype), rerun on the path it does not pick:
# NANOSEEK_CPU_BF16 forces bf16 autocast (1) or fp32 (0); BF16=1|0 chooses, default the other side. The
# slow quick speedrun runs on the fp32 side only: forced bf16 on a CPU without fast bf16 stretches it
# from ~1 to ~8 minutes (bf16 matmul is ~70x slower there).
test-other-dtype: setup
	@bf16=$${BF16:-$$(env -u NANOSEEK_CPU_BF16 $(PY) -c \
	    'from nanoseek.hardware import cpu_has_fast_bf16; print(int(not cpu_has_fast_bf16()))')}; \
	sel="auto_dtype"; [ "$$bf16" = 0 ] || sel="auto_dtype and not slow"; \
	echo "NANOSEEK_CPU_BF16=$$bf16 pytest -m '$$sel'"; \
	NANOSEEK_CPU_BF16=$$bf16 $(PY) -m pytest -q -m "$$sel" $(ARGS)

bench: setup
	$(PY) -m benchmarks $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
