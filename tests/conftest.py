import os
import shutil
import tempfile

import pytest
import torch

# Deterministic, quiet tests on small CPUs.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# dtype="auto" runs cache their measured dtype choice per machine (nanoseek/dtype_choice.py). The session gets an
# empty cache of its own, never a developer's or CI's stale one; set here, at import, so that the environments test
# modules copy for the commands they start have it too.
_DTYPE_CACHE = tempfile.mkdtemp(prefix="nanoseek-test-cache-")
os.environ["NANOSEEK_CACHE_DIR"] = _DTYPE_CACHE


def pytest_configure(config):
    config.addinivalue_line("markers", "auto_dtype: trains with dtype='auto', in the dtype nanoseek picks for this "
                                       "CPU and model; `make test-dtypes` runs it with each dtype forced")


def pytest_unconfigure(config):
    shutil.rmtree(_DTYPE_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
