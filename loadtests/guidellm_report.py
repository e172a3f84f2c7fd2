"""Convert a GuideLLM (>= 0.8, report ``metadata.version`` 2) JSON report into the ``loadtests.report`` format.

Each GuideLLM benchmark (one per concurrency / rate of the profile) becomes one level; the per-request records
(``benchmarks[i].requests.{successful,errored,incomplete}``) are turned into :class:`RequestResult` s and summarized
by the same :func:`loadtests.report.summarize` as our own driver, so TTFT, TPOT, E2E, throughputs, goodput and the
SLO verdict use identical definitions. Differences that remain (recorded in ``notes``):

* ITL: GuideLLM keeps no per-chunk arrival times, only each request's mean inter-token latency
  ``(e2e - ttft) / (output_tokens - 1)``; ``itl_s`` is that mean weighted by the request's output_tokens - 1
  (GuideLLM's own ITL distribution), not the per-chunk gaps our driver measures.
* ``incomplete`` requests (cut off when GuideLLM's max_duration / max_requests constraint ends a benchmark) are
  counted apart, not as failures: our driver instead awaits in-flight requests.
* GuideLLM may keep only a sample of the requests (``--metrics sample_size``): then sent/completed counts are of
  the sample; ``requests_made`` holds GuideLLM's full totals.
"""
from __future__ import annotations

import json
import pathlib
import re

from loadtests.client import RequestResult
from loadtests.report import _pcts, check_slo, summarize

SUPPORTED_VERSIONS = (2,)
_STATUS = re.compile(r"\b([45]\d\d)\b")


def _request(rec: dict, ok: bool) -> RequestResult:
    """One GuideLLM per-request record -> RequestResult (times in seconds on GuideLLM's wall clock)."""
    start = float(rec["request_start_time"])
    end = rec.get("request_end_time")
    ttft_ms = rec.get("time_to_first_token_ms")
    info = rec.get("info") or {}
    err = str(info.get("error") or "")
    r = RequestResult(start=start, end=float(end) if end is not None else start, ok=ok,
                      first_token=start + float(ttft_ms) / 1000.0 if ttft_ms is not None else None,
                      prompt_tokens=int(rec.get("prompt_tokens") or 0),
                      output_tokens=int(rec.get("output_tokens") or 0), error=err)
    m = _STATUS.search(err)
    r.status = 200 if ok else (int(m.group(1)) if m else 0)
    if not ok and not err:
        r.error = "guidellm: errored"
    return r


def _itl_token_weighted(recs: list[dict]) -> list[float]:
    """Each successful request's mean ITL (s), repeated output_tokens - 1 times (GuideLLM's ITL population)."""
    out = []
    for rec in recs:
        itl, n = rec.get("inter_token_latency_ms"), int(rec.get("output_tokens") or 0)
        if itl is not None and n >= 2:
            out += [float(itl) / 1000.0] * (n - 1)
    return out


def _offered_rate(bench: dict) -> float | None:
    """Requests/s GuideLLM targeted (poisson / constant strategies); None for concurrent / synchronous."""
    st = (bench.get("config") or {}).get("strategy") or {}
    rate = st.get("rate")
    return float(rate) if rate is not None else None


def convert_benchmark(bench: dict, slo: dict | None) -> dict:
    """One GuideLLM benchmark -> one ``summarize`` dict (plus ``offered_rate``, ``strategy``, ``incomplete``)."""
    reqs = bench.get("requests") or {}
    succ, errd, inc = (list(reqs.get(k) or []) for k in ("successful", "errored", "incomplete"))
    results = [_request(x, True) for x in succ] + [_request(x, False) for x in errd]
    out = summarize(results, float(bench["duration"]), slo)
    out["itl_s"] = _pcts(_itl_token_weighted(succ))
    if slo:  # the ITL bound is checked on the (re)defined itl_s
        out["slo"] = check_slo(out, slo)
    st = (bench.get("config") or {}).get("strategy") or {}
    out.update(offered_rate=_offered_rate(bench), strategy=st.get("type_"), incomplete=len(inc),
               concurrency=st.get("streams"),
               requests_made=(bench.get("scheduler_metrics") or {}).get("requests_made"))
    return out


def to_report(path_or_obj: str | pathlib.Path | dict, slo: dict | None = None) -> dict:
    """A GuideLLM JSON report (path or parsed dict) -> our report: one summary, or ``levels`` for several benchmarks.

    Args:
        path_or_obj: GuideLLM's ``--output kind=json`` file or its parsed content.
        slo: the ``slo.yaml`` dict (goodput + verdict), or None.
    Returns:
        The ``loadtests.run`` report dict, with ``source: "guidellm"`` and ``notes``.
    Raises:
        ValueError naming the file and field when the report is not a GuideLLM v2 report.
    """
    where = "<dict>" if isinstance(path_or_obj, dict) else str(path_or_obj)
    d = path_or_obj if isinstance(path_or_obj, dict) else json.loads(pathlib.Path(path_or_obj).read_text())
    ver = (d.get("metadata") or {}).get("version")
    if ver not in SUPPORTED_VERSIONS:
        raise ValueError(f"{where}: metadata.version {ver!r} is not a supported GuideLLM report version "
                         f"{SUPPORTED_VERSIONS} (guidellm {(d.get('metadata') or {}).get('guidellm_version')})")
    benches = d.get("benchmarks")
    if not isinstance(benches, list) or not benches:
        raise ValueError(f"{where}: no 'benchmarks' list")
    for i, b in enumerate(benches):
        for key in ("requests", "duration"):
            if key not in b:
                raise ValueError(f"{where}: benchmarks[{i}] has no {key!r} field")
    levels = [convert_benchmark(b, slo) for b in benches]
    if len(levels) == 1:
        out = levels[0]
    else:
        allb = {"duration": sum(float(b["duration"]) for b in benches),
                "requests": {k: [x for b in benches for x in (b["requests"].get(k) or [])]
                             for k in ("successful", "errored", "incomplete")}}
        out = convert_benchmark(allb, slo)
        out["levels"] = levels
    backend = (benches[0].get("config") or {}).get("backend") or {}
    out.update(source="guidellm", guidellm_version=d["metadata"].get("guidellm_version"),
               base_url=backend.get("target"), model=backend.get("model"),
               notes=["itl_s: per-request mean ITL weighted by output_tokens - 1 (GuideLLM keeps no chunk times)",
                      "incomplete: requests cut off by GuideLLM's constraints, not counted as failed"])
    return out
