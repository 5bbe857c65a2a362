import os

import pytest
import torch

# Deterministic, quiet tests on small CPUs.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def pytest_configure(config):
    config.addinivalue_line("markers", "auto_dtype: trains with dtype='auto', in the dtype nanoseek.hardware picks "
                                       "for this CPU; `make test-other-dtype` reruns it on the other one")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
