"""Every ``mxserve:`` Prometheus metric, in one place.

Naming (see ../shared/docs/ecosystem.md §2.3): ``mxserve:`` prefix (never ``vllm:``: vLLM's
``unregister_vllm_metrics()`` removes collectors named ``vllm:*``), base units in the name (``_seconds``,
``_bytes``), counters end in ``_total``, a fixed label set that always starts with ``model_name`` so series join
with vLLM's own ``vllm:*`` series.  Per-expert labels (``layer``, ``expert``) are opt-in
(``MetricSpec.per_expert_labels``, enabled with ``per_expert=True``) because layers x experts is
thousands of series.

Two groups:

* ``ENGINE_METRICS``: recorded by the embedded CPU engine (``mxserve serve`` without vLLM) directly with
  prometheus_client objects. Create them on a registry with :func:`create_engine_metrics` (one registry per app
  instance, so tests can build several apps in one process).
* ``WORKER_METRICS``: produced inside vLLM worker processes (expert cache, offload, KV, weights). Workers publish
  plain numbers through :mod:`mxserve.metrics.sidechannel`; the API-server collector
  (:mod:`mxserve.metrics.collector`) turns them into these families at scrape time, adding ``engine`` (the
  publishing worker's rank) to the labels.

Example:
    >>> reg = CollectorRegistry(); m = create_engine_metrics(reg)
    >>> m.ttft.labels(model_name="tiny").observe(0.05)
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "mxserve:"
Kind = Literal["counter", "gauge", "histogram", "info"]

# Latency buckets: vLLM's TTFT/ITL buckets trimmed to a range that also suits a CPU engine.
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)


@dataclass(frozen=True)
class MetricSpec:
    """One metric family: name (with prefix and unit suffix), kind, help text and fixed label names.

    Attributes:
        name: full name, e.g. ``mxserve:expert_cache_hits_total``.
        kind: counter | gauge | histogram | info (info = gauge with value 1 whose labels carry config).
        help: one-line description with the unit.
        labels: fixed label names (always starts with ``model_name``).
        per_expert_labels: extra labels added only when per-expert series are enabled.
        buckets: histogram buckets (seconds).
        agg: how the API-server collector combines workers of one engine (TP ranks): ``sum`` (bytes, counts,
            experts held) or ``max`` (per-element ratios, which are the same on every rank).
    """

    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ("model_name",)
    per_expert_labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()
    agg: Literal["sum", "max"] = "sum"

    def __post_init__(self) -> None:
        if not self.name.startswith(PREFIX):
            raise ValueError(f"metric {self.name!r}: name must start with {PREFIX!r}")
        if self.labels[:1] != ("model_name",):
            raise ValueError(f"metric {self.name!r}: labels must start with 'model_name', got {self.labels}")
        if self.kind == "counter" and not self.name.endswith("_total"):
            raise ValueError(f"metric {self.name!r}: counters must end in '_total'")
        if self.kind == "info" and not self.name.endswith("_info"):
            raise ValueError(f"metric {self.name!r}: info gauges must end in '_info'")
        if self.kind == "histogram" and not self.buckets:
            raise ValueError(f"metric {self.name!r}: histograms need buckets")

    @property
    def base_name(self) -> str:
        """Name without ``_total`` (what prometheus_client calls the family of a counter)."""
        return self.name[: -len("_total")] if self.kind == "counter" else self.name


def _s(name: str, kind: Kind, help_: str, *labels: str, per_expert: tuple[str, ...] = (),
       buckets: tuple[float, ...] = (), agg: Literal["sum", "max"] = "sum") -> MetricSpec:
    return MetricSpec(PREFIX + name, kind, help_, ("model_name",) + labels, per_expert, buckets, agg)


# ---- embedded engine (mxserve serve on CPU): attribute name -> spec ------------------------------------------
ENGINE_METRICS: dict[str, MetricSpec] = {
    "request_latency": _s("e2e_request_latency_seconds", "histogram",
                          "End-to-end request latency in seconds (arrival to last token).", buckets=REQUEST_BUCKETS),
    "ttft": _s("time_to_first_token_seconds", "histogram", "Time to first token in seconds.",
               buckets=LATENCY_BUCKETS),
    "itl": _s("inter_token_latency_seconds", "histogram", "Gap between successive output tokens in seconds.",
              buckets=LATENCY_BUCKETS),
    "prompt_tokens": _s("prompt_tokens_total", "counter", "Prompt tokens processed."),
    "generation_tokens": _s("generation_tokens_total", "counter", "Output tokens generated."),
    "requests": _s("requests_total", "counter", "Finished requests by outcome (stop, length, abort, error).",
                   "finished_reason"),
    "num_requests_waiting": _s("num_requests_waiting", "gauge", "Requests queued, not yet scheduled."),
    "num_requests_running": _s("num_requests_running", "gauge", "Requests currently being decoded."),
    "weight_bytes": _s("weight_bytes", "gauge", "Model weight bytes by storage precision (bf16, int2, int4, ...).",
                       "precision"),
    "kv_cache_bytes": _s("kv_cache_bytes", "gauge", "Bytes allocated to the KV cache by precision (bf16, mxkv, ...).",
                         "precision"),
    "kv_cache_bits_per_element": _s("kv_cache_bits_per_element", "gauge",
                                    "Effective KV-cache bits per stored element, scales included."),
}

# ---- vLLM worker side (via the side channel): snapshot key -> spec ---------------------------------------------
# Snapshot keys are the names workers pass to sidechannel.publish(); see sidechannel's docstring.
_W = ("engine",)
WORKER_METRICS: dict[str, MetricSpec] = {
    "expert_cache_hits": _s("expert_cache_hits_total", "counter",
                            "Expert lookups served from the GPU expert cache.", *_W, per_expert=("layer", "expert")),
    "expert_cache_misses": _s("expert_cache_misses_total", "counter",
                              "Expert lookups that had to fetch from host memory.", *_W,
                              per_expert=("layer", "expert")),
    "expert_h2d_bytes": _s("expert_h2d_bytes_total", "counter", "Expert weight bytes copied host to device.", *_W),
    "expert_stall_seconds": _s("expert_stall_seconds_total", "counter",
                               "Seconds the forward pass waited for expert transfers.", *_W),
    "prefetch_issued": _s("expert_prefetch_issued_total", "counter", "Expert prefetches issued.", *_W),
    "prefetch_useful": _s("expert_prefetch_useful_total", "counter",
                          "Prefetched experts that were used before eviction.", *_W),
    "resident_experts": _s("gpu_resident_experts", "gauge", "Experts currently resident in the GPU cache.", *_W),
    "resident_planes": _s("gpu_resident_expert_planes", "gauge",
                          "Resident experts by served bit prefix (plane mix of nested MWQ experts).", *_W, "bits"),
    "host_pinned_bytes": _s("host_pinned_bytes", "gauge", "Pinned host memory holding offloaded experts.", *_W),
    "weight_bytes": _s("worker_weight_bytes", "gauge", "Weight bytes on this worker by storage precision.", *_W,
                       "precision"),
    "kv_cache_bits_per_element": _s("worker_kv_cache_bits_per_element", "gauge",
                                    "Effective KV-cache bits per element on this worker, scales included.", *_W,
                                    agg="max"),
    "kv_cache_bytes": _s("worker_kv_cache_bytes", "gauge", "KV-cache bytes allocated on this worker.", *_W),
    "quant_config": _s("quant_config_info", "info",
                       "Static mxmoe configuration (value 1; the labels carry the config).", *_W,
                       "weight_bits_mix", "kv_bits", "offload", "scheme", agg="max"),
}

ALL_METRICS: tuple[MetricSpec, ...] = tuple(ENGINE_METRICS.values()) + tuple(WORKER_METRICS.values())


def _make(spec: MetricSpec, registry: CollectorRegistry, per_expert: bool):
    labels = spec.labels + (spec.per_expert_labels if per_expert else ())
    if spec.kind == "counter":
        return Counter(spec.base_name, spec.help, labels, registry=registry)
    if spec.kind == "histogram":
        return Histogram(spec.name, spec.help, labels, buckets=spec.buckets, registry=registry)
    return Gauge(spec.name, spec.help, labels, registry=registry)


def create_engine_metrics(registry: CollectorRegistry, per_expert: bool = False) -> SimpleNamespace:
    """Create every ``ENGINE_METRICS`` family on ``registry``.

    Args:
        registry: the app's own ``CollectorRegistry`` (one per app instance; never the global one in tests).
        per_expert: add the opt-in per-expert labels.
    Returns:
        A namespace with one prometheus_client object per ``ENGINE_METRICS`` key, e.g. ``m.ttft``, ``m.requests``.
    """
    return SimpleNamespace(**{k: _make(s, registry, per_expert) for k, s in ENGINE_METRICS.items()})


def create_worker_metrics(registry: CollectorRegistry, per_expert: bool = False) -> SimpleNamespace:
    """Create every ``WORKER_METRICS`` family as live prometheus_client objects on ``registry``.

    Used by single-process tools (bench scripts, the embedded engine when it runs the offload path); inside vLLM
    the side channel + collector path is used instead.
    """
    return SimpleNamespace(**{k: _make(s, registry, per_expert) for k, s in WORKER_METRICS.items()})


def exposition_names() -> list[str]:
    """All sample-family names as they appear on ``/metrics`` (counters with ``_total``)."""
    return [s.name for s in ALL_METRICS]
