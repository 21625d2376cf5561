"""Property-based fuzzing of the server from its own OpenAPI document (schemathesis): valid and invalid requests,
zero 5xx. The server runs with a short context and n <= 2, and generated requests ask for at most 4 tokens, so a few
hundred requests take seconds; the full ranges of those fields are covered by tests/test_serve.py."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="needs the dev extra (pip install -e '.[dev]')")
from hypothesis import HealthCheck, given, settings  # noqa: E402

from test_serve import MODEL, ServerProcess  # noqa: E402


@pytest.fixture(scope="module")
def fuzz_server():
    s = ServerProcess("--max-model-len", "128", "--max-n", "2", "--max-waiting", "256")
    yield s
    code, out = s.stop()
    assert code == 0, out
    assert "Traceback" not in out, out


def _cap_tokens(case, mode: str) -> None:
    if isinstance(case.body, dict):
        if mode == "positive" and isinstance(case.body.get("model"), str):
            case.body["model"] = MODEL              # else nearly every valid request is a 404 for an unknown model
        for key in ("max_tokens", "max_completion_tokens"):
            v = case.body.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and v > 4:
                case.body[key] = 4
        if "max_tokens" not in case.body and "max_completion_tokens" not in case.body:
            case.body["max_tokens"] = 4


# schemathesis' own pytest plugin does not run under this pytest, so the strategies are driven by hypothesis here.
@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_server_errors(fuzz_server, mode):
    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    ops = [r.ok() for r in schema.get_all_operations()]
    assert {o.path for o in ops} >= {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health"}
    seen: dict[int, int] = {}
    for op in ops:
        if mode == "negative" and op.method != "post":      # nothing to get wrong in a parameterless GET
            continue

        @given(case=op.as_strategy(generation_mode=schemathesis.GenerationMode(mode)))
        @settings(max_examples=60 if op.method == "post" else 10, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case):
            _cap_tokens(case, mode)
            response = case.call(base_url=fuzz_server.url, timeout=60)
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            assert response.status_code < 500, (op.path, case.body, response.status_code, response.text[:500])

        run()
    print(f"\n{mode}: status codes {dict(sorted(seen.items()))}")
    assert sum(seen.values()) >= 100
    assert any(400 <= c < 500 for c in seen) if mode == "negative" else 200 in seen
