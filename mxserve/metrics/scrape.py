"""Read a ``/metrics`` exposition back into numbers (tests, benchmarks, ops scripts).

Parse with prometheus_client's own text parser, never with a hand-written regex: the GPU offload test's regex
``mxserve:expert_[a-z_]+`` silently skipped ``mxserve:expert_h2d_bytes_total`` (the digit in ``h2d``), which then
looked like a metric that was never published (issue 7).
"""
from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def metric_totals(text: str, prefix: str = "mxserve:") -> dict[str, float]:
    """Sum of every sample whose name starts with ``prefix``, over all label sets.

    Args:
        text: the Prometheus text exposition (``GET /metrics`` body).
        prefix: sample-name prefix to keep (counters keep their ``_total`` suffix, as on the wire).
    Returns:
        {sample name: summed value}. Histogram sample names (``_bucket``/``_sum``/``_count``) appear as such.
    Raises:
        ValueError: ``text`` is not a valid exposition (prometheus_client's parser error, re-raised with context).
    """
    out: dict[str, float] = {}
    try:
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name.startswith(prefix) and not s.name.endswith("_created"):
                    out[s.name] = out.get(s.name, 0.0) + float(s.value)
    except ValueError as exc:
        raise ValueError(f"metric_totals: not a Prometheus text exposition ({exc}); first line: "
                         f"{text.splitlines()[0][:120] if text else ''!r}") from exc
    return out
