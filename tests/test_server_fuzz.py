"""schemathesis on `nanoseek serve`'s own /openapi.json: generated requests, valid (positive) and invalid
(negative), to every route; none may get a 5xx. A few examples per route here; the benchmark
(`python -m benchmarks.serve_hardening --only fuzz`) runs this test with NANOSEEK_FUZZ_EXAMPLES=200 and reads
the report it writes to NANOSEEK_FUZZ_REPORT. Bodies that name a model name the served one, so valid requests
reach the engine (context 64: every generation is short)."""
import json
import os
from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable

from test_server import KEY, build_model_dir

from nanoseek.infer.server import BackgroundServer, Options

AUTH = {"Authorization": f"Bearer {KEY}"}
EXAMPLES = int(os.environ.get("NANOSEEK_FUZZ_EXAMPLES", 12))  # per route, split between the two modes


@pytest.fixture(scope="module")
def fuzzed_server(tmp_path_factory):
    opts = Options(model=build_model_dir(tmp_path_factory.mktemp("fuzzed")), served_model_name="served", api_key=KEY,
                   max_batch=4, max_queue=4, max_len=64, request_timeout=60, shutdown_timeout=2)
    with BackgroundServer(opts) as s:
        yield s


def test_no_generated_request_gets_a_5xx(fuzzed_server):
    schema = schemathesis.openapi.from_url(fuzzed_server.url + "/openapi.json", headers=AUTH)
    statuses, server_errors = Counter(), []
    for result in schema.get_all_operations():
        op = result.ok()
        for mode in schemathesis.GenerationMode:
            @settings(max_examples=max(1, EXAMPLES // 2), deadline=None, database=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def call(case):
                valid = mode is schemathesis.GenerationMode.POSITIVE
                if valid and isinstance(case.body, dict) and "model" in case.body:
                    case.body["model"] = "served"
                response = case.call(base_url=fuzzed_server.url, headers=AUTH)
                statuses[f"{op.label} {mode.value} {response.status_code}"] += 1
                if response.status_code >= 500:
                    server_errors.append((op.label, case.body, response.text[:300]))
            try:
                call()
            except Unsatisfiable:  # a route without parameters or body has no invalid request to generate
                assert mode is schemathesis.GenerationMode.NEGATIVE
    report = os.environ.get("NANOSEEK_FUZZ_REPORT")
    if report:
        with open(report, "w") as f:
            json.dump({"examples_per_route": EXAMPLES, "statuses": dict(sorted(statuses.items())),
                       "server_errors": server_errors}, f, indent=1)
    assert sum(statuses.values()) > 0 and not server_errors, server_errors[:3]
