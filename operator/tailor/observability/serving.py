"""Prometheus metrics of the serving workload (``tailor.workloads.serving.app``).

Every metric is named ``tailor_serve_*`` and labelled with ``deployment`` (the served name,
which is the ModelDeployment's name) and, where it is about one request, ``model`` (the
name the client asked for: ``<deployment>`` or ``<deployment>/<adapter>``). The metrics live
in their own :class:`~prometheus_client.CollectorRegistry` per server, so several servers
can run in one process (tests) without clashing, and ``/metrics`` exposes exactly these.
The in-flight gauge is what the HorizontalPodAutoscaler scales on; the device-seconds
histogram is the estimated cost of a request (the wall time of each batched forward pass,
divided among the requests in it).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20)
RETRIEVAL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 64, 128, 256)
TOKENS_PER_SECOND_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000)
DEVICE_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class ServingMetrics:
    """The metrics of one serving process, bound to its deployment name."""

    def __init__(self, deployment: str, registry: CollectorRegistry | None = None):
        self.deployment = deployment
        self.registry = registry or CollectorRegistry()
        self.upstreams: set[str] = set()
        """URLs of upstream engines whose metrics this registry re-exports."""
        r = self.registry
        per_model = ["deployment", "model"]
        self.requests = Counter(
            "tailor_serve_requests",
            "Requests answered, by model, endpoint and HTTP status code.",
            [*per_model, "endpoint", "code"],
            registry=r,
        )
        self.errors = Counter(
            "tailor_serve_errors",
            "Requests that failed, by model, HTTP status code and OpenAI error type.",
            [*per_model, "code", "type"],
            registry=r,
        )
        self.latency = Histogram(
            "tailor_serve_request_duration_seconds",
            "Time from receiving a generation request to its last byte.",
            per_model,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "tailor_serve_time_to_first_token_seconds",
            "Time from receiving a generation request to its first generated token.",
            per_model,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "tailor_serve_prompt_tokens", "Prompt tokens processed.", per_model, registry=r
        )
        self.completion_tokens = Counter(
            "tailor_serve_completion_tokens", "Completion tokens generated.", per_model, registry=r
        )
        self.tokens_per_second = Histogram(
            "tailor_serve_request_tokens_per_second",
            "Completion tokens per second of each request, after its first token.",
            per_model,
            buckets=TOKENS_PER_SECOND_BUCKETS,
            registry=r,
        )
        self.cache_hits = Counter(
            "tailor_serve_cache_hits",
            "Responses served from the response cache.",
            per_model,
            registry=r,
        )
        self.cache_misses = Counter(
            "tailor_serve_cache_misses",
            "Cacheable requests that were not in the response cache.",
            per_model,
            registry=r,
        )
        self.retrieval_latency = Histogram(
            "tailor_serve_retrieval_duration_seconds",
            "Time to retrieve context from the knowledge base.",
            ["deployment"],
            buckets=RETRIEVAL_BUCKETS,
            registry=r,
        )
        self.retrieval_failures = Counter(
            "tailor_serve_retrieval_failures",
            "Requests answered without context because the vector store was unavailable.",
            ["deployment"],
            registry=r,
        )
        self.adapter_requests = Counter(
            "tailor_serve_adapter_requests",
            "Generation requests per adapter (base for the base model).",
            ["deployment", "adapter"],
            registry=r,
        )
        self.feedback = Counter(
            "tailor_serve_feedback",
            "User feedback on responses (user satisfaction), by rating up or down and the "
            "prompt-profile revision that answered (empty without a profile).",
            [*per_model, "rating", "revision"],
            registry=r,
        )
        self.capture = Counter(
            "tailor_serve_capture",
            "Capture (spec.feedback): records written, records dropped (the writer fell "
            "behind), records failed (could not be written) and segments published.",
            ["deployment", "outcome"],
            registry=r,
        )
        self.inflight = Gauge(
            "tailor_serve_inflight_requests",
            "Generation requests being processed (queued or generating).",
            ["deployment"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "tailor_serve_queue_depth",
            "Requests waiting for a slot in the running batch.",
            ["deployment"],
            registry=r,
        )
        self.batch_size = Histogram(
            "tailor_serve_batch_size",
            "Sequences in each forward pass of the generation engine.",
            ["deployment"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.device_seconds = Histogram(
            "tailor_serve_request_device_seconds",
            "Estimated cost of a request: its share of the wall time of the batches it ran in.",
            per_model,
            buckets=DEVICE_SECONDS_BUCKETS,
            registry=r,
        )
        self.generated_tokens = Counter(
            "tailor_serve_engine_generated_tokens",
            "Tokens generated by the engine (rate() of it is the aggregate tokens/s).",
            ["deployment"],
            registry=r,
        )
        self.profile_reloads = Counter(
            "tailor_serve_prompt_profile_reloads",
            "Times the mounted PromptProfile file was (re)loaded, by result ok or invalid.",
            ["deployment", "result"],
            registry=r,
        )
        self.adapter_changes = Counter(
            "tailor_serve_adapter_changes",
            "Adapters loaded or unloaded in the running server (no restart), by action "
            "load or unload and result ok or error.",
            ["deployment", "action", "result"],
            registry=r,
        )
        self.prefix_tokens = Counter(
            "tailor_serve_prefix_cache_tokens",
            "Prompt tokens the in-process engine (builtin or llamacpp) took from its prefix "
            "cache (result reused) or ran through the model (result computed).",
            ["deployment", "result"],
            registry=r,
        )
        self.rollout_requests = Counter(
            "tailor_serve_rollout_requests",
            "Requests of a rollout (spec.rollout) by variant (stable, candidate) and outcome "
            "(ok, error; shadow: the candidate's unseen answers, skipped when the server was "
            "busy).",
            ["deployment", "variant", "outcome"],
            registry=r,
        )
        self.rollout_feedback = Counter(
            "tailor_serve_rollout_feedback",
            "Ratings of a rollout's answers by variant and rating (up, down).",
            ["deployment", "variant", "rating"],
            registry=r,
        )
        self.rollout_latency = Histogram(
            "tailor_serve_rollout_latency_seconds",
            "Seconds per answer of a rollout, by variant.",
            ["deployment", "variant"],
            buckets=(0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.rollout_judged = Counter(
            "tailor_serve_rollout_judged",
            "The shadow judge's comparisons by outcome (won, lost, tie for the candidate).",
            ["deployment", "outcome"],
            registry=r,
        )
        self.rollout_weight = Gauge(
            "tailor_serve_rollout_weight",
            "The rollout's candidate weight now (percent; 0 without a rollout).",
            ["deployment"],
            registry=r,
        )
        self.ready = Gauge(
            "tailor_serve_ready",
            "1 once the model is loaded and serving.",
            ["deployment"],
            registry=r,
        )
        self.inflight.labels(deployment).set(0)
        self.queue_depth.labels(deployment).set(0)
        self.ready.labels(deployment).set(0)
        self.rollout_weight.labels(deployment).set(0)
        self.retrieval_failures.labels(deployment)

    # The engine's view: one call per forward pass.
    def observe_batch(self, size: int, generated_tokens: int) -> None:
        """Record one forward pass of ``size`` sequences that produced ``generated_tokens``."""
        self.batch_size.labels(self.deployment).observe(size)
        if generated_tokens:
            self.generated_tokens.labels(self.deployment).inc(generated_tokens)

    def set_queue_depth(self, depth: int) -> None:
        self.queue_depth.labels(self.deployment).set(depth)

    # The server's view: one call per request.
    def observe_request(self, model: str, endpoint: str, code: int, error_type: str = "") -> None:
        """Count one answered request; codes of 400 and up also count as errors."""
        self.requests.labels(self.deployment, model, endpoint, str(code)).inc()
        if code >= 400:
            self.errors.labels(self.deployment, model, str(code), error_type or "error").inc()

    def observe_adapter(self, adapter: str | None) -> None:
        """Count a generation request (cache hits included) for its adapter."""
        self.adapter_requests.labels(self.deployment, adapter or "base").inc()

    def observe_generation(
        self,
        model: str,
        prompt_tokens: int,
        completion_tokens: int,
        seconds: float,
        first_token_seconds: float | None,
        device_seconds: float,
    ) -> None:
        """Record a generation that ran on the engine (not a cache hit)."""
        labels = (self.deployment, model)
        self.prompt_tokens.labels(*labels).inc(prompt_tokens)
        self.completion_tokens.labels(*labels).inc(completion_tokens)
        self.latency.labels(*labels).observe(seconds)
        self.device_seconds.labels(*labels).observe(device_seconds)
        if first_token_seconds is not None:
            self.time_to_first_token.labels(*labels).observe(first_token_seconds)
            decode_seconds = seconds - first_token_seconds
            if completion_tokens > 1 and decode_seconds > 0:
                rate = (completion_tokens - 1) / decode_seconds
                self.tokens_per_second.labels(*labels).observe(rate)

    def observe_cache(self, model: str, hit: bool) -> None:
        (self.cache_hits if hit else self.cache_misses).labels(self.deployment, model).inc()

    def observe_retrieval(self, seconds: float, ok: bool) -> None:
        self.retrieval_latency.labels(self.deployment).observe(seconds)
        if not ok:
            self.retrieval_failures.labels(self.deployment).inc()

    def observe_feedback(self, model: str, rating: str, revision: str = "") -> None:
        self.feedback.labels(self.deployment, model, rating, revision).inc()

    def observe_capture(self, outcome: str, count: int) -> None:
        self.capture.labels(self.deployment, outcome).inc(count)

    def observe_profile_reload(self, ok: bool) -> None:
        self.profile_reloads.labels(self.deployment, "ok" if ok else "invalid").inc()

    def observe_adapter_change(self, action: str, result: str) -> None:
        self.adapter_changes.labels(self.deployment, action, result).inc()

    def observe_prefix(self, reused: int, computed: int) -> None:
        if reused:
            self.prefix_tokens.labels(self.deployment, "reused").inc(reused)
        if computed:
            self.prefix_tokens.labels(self.deployment, "computed").inc(computed)

    def observe_rollout(self, variant: str, outcome: str, seconds: float | None) -> None:
        self.rollout_requests.labels(self.deployment, variant, outcome).inc()
        if seconds is not None:
            self.rollout_latency.labels(self.deployment, variant).observe(seconds)

    def observe_rollout_rating(self, variant: str, rating: str) -> None:
        self.rollout_feedback.labels(self.deployment, variant, rating).inc()

    def observe_rollout_judged(self, outcome: str) -> None:
        self.rollout_judged.labels(self.deployment, outcome).inc()

    def set_rollout_weight(self, weight: int) -> None:
        self.rollout_weight.labels(self.deployment).set(weight)

    def set_ready(self, ready: bool) -> None:
        self.ready.labels(self.deployment).set(1 if ready else 0)

    def inflight_inc(self) -> None:
        self.inflight.labels(self.deployment).inc()

    def inflight_dec(self) -> None:
        self.inflight.labels(self.deployment).dec()

    def value(self, name: str, **labels: str) -> float:
        """The current value of a sample (0 when absent): for tests and the benchmark."""
        found = self.registry.get_sample_value(name, {"deployment": self.deployment, **labels})
        return found or 0.0
