"""Scrape-time aggregation of worker snapshots into ``mxserve:`` metric families (runs in the API server).

Lifecycle: the vLLM plugin (``mxserve.vllm_plugin.metrics_hook``) registers one :class:`SideChannelCollector` in
prometheus_client's global ``REGISTRY`` in process 0, which vLLM's ``/metrics`` serves. On every scrape
``collect()`` reads ``<dir>/<pid>.json`` (see :mod:`mxserve.metrics.sidechannel`), drops dead or stale pids,
adds this process's own in-memory snapshot (the ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` case), and combines the
workers of one ``(model_name, engine)`` with each metric's ``agg`` rule (sum over TP ranks, or max for ratios).
The collector has no ``_name`` starting with ``vllm:``, so vLLM's ``unregister_vllm_metrics()`` leaves it alone.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mxserve import envs
from mxserve.metrics import sidechannel
from mxserve.metrics.definitions import WORKER_METRICS, MetricSpec

LabelKey = tuple[str, ...]


def aggregate(snapshots: Iterable[dict], per_expert: bool = False) -> dict[str, dict[LabelKey, float]]:
    """Combine snapshots into ``{metric key: {label values: value}}``.

    Args:
        snapshots: dicts as written by ``sidechannel.flush`` (``model_name``, ``engine``, ``sections``).
        per_expert: keep ``layer``/``expert`` labels for metrics that support them; otherwise sum them away.
    Returns:
        For each ``WORKER_METRICS`` key present, label tuples in the spec's label order
        (``model_name, engine, *extra[, layer, expert]``) mapped to the aggregated value.
    """
    # first: per worker, sum sections; then across workers of one engine, apply spec.agg
    out: dict[str, dict[LabelKey, float]] = defaultdict(dict)
    for snap in snapshots:
        base = (str(snap.get("model_name", "")), str(snap.get("engine", 0)))
        worker: dict[str, dict[LabelKey, float]] = defaultdict(lambda: defaultdict(float))
        for values in snap.get("sections", {}).values():
            for key, v in values.items():
                spec = WORKER_METRICS.get(key)
                if spec is None:  # written by a newer/older mxserve: ignore rather than fail the scrape
                    continue
                for labels, x in _expand(spec, v, per_expert):
                    if spec.kind == "info":
                        worker[key][base + labels] = 1.0
                    else:
                        worker[key][base + labels] += x
        for key, series in worker.items():
            agg = WORKER_METRICS[key].agg
            for labels, x in series.items():
                prev = out[key].get(labels)
                out[key][labels] = x if prev is None else (prev + x if agg == "sum" else max(prev, x))
    return dict(out)


def _expand(spec: MetricSpec, v, per_expert: bool) -> list[tuple[LabelKey, float]]:
    extra = spec.labels[2:]
    if spec.kind == "info":
        return [(tuple(str(v.get(lbl, "")) for lbl in extra), 1.0)]
    if not isinstance(v, dict):
        return [((), float(v))]
    if extra:
        return [((str(k),), float(x)) for k, x in v.items()]
    if per_expert:
        return [(tuple(str(k).split("/", 1)), float(x)) for k, x in v.items()]
    return [((), float(sum(v.values())))]


def families(agg: dict[str, dict[LabelKey, float]], per_expert: bool = False) -> list[Metric]:
    """Turn :func:`aggregate` output into prometheus_client metric families (only metrics with data)."""
    fams: list[Metric] = []
    for key, spec in WORKER_METRICS.items():
        series = agg.get(key)
        if not series:
            continue
        use_pe = per_expert and any(len(lbls) == len(spec.labels) + len(spec.per_expert_labels) for lbls in series)
        names = list(spec.labels) + (list(spec.per_expert_labels) if use_pe else [])
        if spec.kind == "counter":
            fam: Metric = CounterMetricFamily(spec.base_name, spec.help, labels=names)
        else:
            fam = GaugeMetricFamily(spec.name, spec.help, labels=names)
        for labels, x in sorted(series.items()):
            if len(labels) != len(names):  # mixed publishers (some per-expert, some not): pad with "all"
                labels = labels + ("all",) * (len(names) - len(labels))
            fam.add_metric(list(labels), x)
        fams.append(fam)
    return fams


class SideChannelCollector(Collector):
    """prometheus_client Collector over a side-channel directory.

    Args:
        directory: the snapshot dir; default ``MXSERVE_METRICS_DIR`` read at each scrape.
        per_expert: emit ``layer``/``expert`` labels where published.
        stale_after_s: ignore snapshots older than this.
        include_local: add this process's in-memory snapshot (it replaces this pid's file, which may be older).
    """

    def __init__(self, directory: str | None = None, per_expert: bool = False, stale_after_s: float = 600.0,
                 include_local: bool = True) -> None:
        self.directory = directory
        self.per_expert = per_expert
        self.stale_after_s = stale_after_s
        self.include_local = include_local

    def snapshots(self) -> list[dict]:
        """The live snapshots this scrape aggregates."""
        d = self.directory or envs.metrics_dir()
        snaps = sidechannel.read_snapshots(d, self.stale_after_s) if d else []
        if self.include_local:
            local = sidechannel.local_snapshot()  # fresher than this pid's own file, if any
            if local["sections"]:
                snaps = [s for s in snaps if s.get("pid") != local["pid"]] + [local]
        return snaps

    def collect(self) -> Iterable[Metric]:
        return families(aggregate(self.snapshots(), self.per_expert), self.per_expert)

    def describe(self) -> Iterable[Metric]:
        # no describe-time families: registering must not read the directory or clash with other collectors
        return []
