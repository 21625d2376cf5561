"""Prometheus metrics for /metrics, with vLLM's names under the `mimoflash:` prefix.

A dashboard built for vLLM maps one to one: `vllm:num_requests_running` is `mimoflash:num_requests_running`, and so
on. Each app has its own `CollectorRegistry` (tests build several apps in one process). The engine process sends
the gauges' figures with every step's message and the server records them, with the token/latency figures, as the
message arrives; the HTTP layer adds what only it knows (reasoning tokens, cost, rejected requests).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for app.py)

P = "mimoflash:"
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0)
_E2E = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0)


class ServerMetrics:
    def __init__(self, model_name: str):
        r = self.registry = CollectorRegistry()
        lab = ["model_name"]
        self.running = Gauge(P + "num_requests_running", "Requests in the running batch", lab, registry=r)
        self.waiting = Gauge(P + "num_requests_waiting", "Requests waiting to be scheduled", lab, registry=r)
        self.kv_usage = Gauge(P + "kv_cache_usage_perc", "Fraction of each KV-cache pool in use (1 = full)",
                              lab + ["pool"], registry=r)
        self.prompt_tokens = Counter(P + "prompt_tokens", "Prefill tokens processed", lab, registry=r)
        self.generation_tokens = Counter(P + "generation_tokens", "Generated tokens", lab, registry=r)
        self.reasoning_tokens = Counter(P + "reasoning_tokens", "Generated tokens inside <think>", lab, registry=r)
        self.success = Counter(P + "request_success", "Finished requests", lab + ["finished_reason"], registry=r)
        self.rejected = Counter(P + "request_rejected", "Requests refused before running", lab + ["reason"],
                                registry=r)
        self.preemptions = Counter(P + "num_preemptions", "Sequences preempted (cache freed, recomputed later)",
                                   lab, registry=r)
        self.cost = Counter(P + "request_cost_usd", "Cost of served tokens at the configured prices", lab,
                            registry=r)
        self.ttft = Histogram(P + "time_to_first_token_seconds", "Time to first token", lab, buckets=_LATENCY,
                              registry=r)
        self.itl = Histogram(P + "inter_token_latency_seconds", "Time between tokens of one sequence", lab,
                             buckets=_LATENCY, registry=r)
        self.e2e = Histogram(P + "e2e_request_latency_seconds", "Arrival to last token", lab, buckets=_E2E,
                             registry=r)
        self.spec_verify = Counter(P + "spec_decode_num_verify_steps", "MTP verify steps", lab, registry=r)
        self.spec_accepted = Counter(P + "spec_decode_num_accepted_tokens", "Draft tokens accepted", lab,
                                     registry=r)
        self.model = model_name
        self._preempt_seen = 0
        self._children: dict = {}

    def m(self, metric, **labels):
        """The child of `metric` for this model (and `labels`), cached: called per token."""
        key = (id(metric), tuple(sorted(labels.items())))
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(model_name=self.model, **labels)
        return child

    def on_stats(self, stats: tuple) -> None:
        """Gauges from the engine's figures after a step (engine_core.step_stats: running, waiting, KV blocks and
        rings in use, preemptions so far)."""
        running, waiting, blocks, rings, preemptions = stats
        self.m(self.running).set(running)
        self.m(self.waiting).set(waiting)
        if blocks is not None:
            self.m(self.kv_usage, pool="global_blocks").set(blocks)
        if rings is not None:
            self.m(self.kv_usage, pool="swa_rings").set(rings)
        if preemptions > self._preempt_seen:
            self.m(self.preemptions).inc(preemptions - self._preempt_seen)
            self._preempt_seen = preemptions

    def render(self) -> bytes:
        return generate_latest(self.registry)
