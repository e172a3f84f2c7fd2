"""Parse ``vllm bench throughput`` logs of the KV-cache throughput rows into one JSON (used by
``.ci/gpu/kv_throughput.sh``; imports neither vLLM nor mxserve).

``python -m mxserve_kernels.bench.kv_throughput_parse --logs DIR --variants auto,fp8,... --json OUT``

Per variant NAME it reads ``DIR/NAME.log`` (stdout + stderr of the bench) and its exit status (124 = the
per-variant timeout): the log's last ``kv_throughput: rc=N`` trailer line (what the script appends, so the output
folder holds one file per variant), else ``DIR/NAME.rc``; neither = not run. One entry per variant: ``status``
(ok / failed / timeout / not_run), ``output_tok_s``, ``total_tok_s``, ``requests_s`` (vLLM's "Throughput: ..."
line), ``kv_cache_tokens`` (its "GPU KV cache size: N tokens" line), ``max_concurrency``, and when it did not
succeed ``log_tail``, ``first_error`` (the engine core's first traceback / OOM / error line with 40 lines of
context, vLLM's process/level prefixes stripped) and ``root_cause`` (that block's exception line). ``ratios`` divide each
``mxmoe*`` variant's output tok/s and KV capacity by those of ``auto`` (bf16 KV) and ``int4_per_token_head``.

Timeline (every variant): ``init_s`` = vLLM's own "init engine (...) took X s"; with the script's clock trailer
``kv_throughput: start=MM-DD HH:MM:SS end=MM-DD HH:MM:SS`` also ``init_done_at_s`` (the init line's timestamp minus
start) and ``ended_at_s``. A timed-out variant gets ``timeout_phase`` (startup / engine_init / after_init) and
``timeout_detail``, e.g. "timeout after engine init at 90 s (killed at 110 s, 20 s after init); last progress: none
after init (prompts not rendered yet)", plus ``last_progress`` (the last tqdm segment: Rendering / Processed prompts,
Capturing CUDA graphs) and ``last_stats`` (the last "Engine 000: Avg prompt throughput" line): slow vs stuck.

``--merge A.json B.json --json OUT`` joins the JSONs of several calls (a later file's variant replaces an earlier
one of the same name) and recomputes the ratios, for runs split over device calls.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re

_THROUGHPUT = re.compile(r"Throughput:\s*([\d.]+)\s*requests/s,\s*([\d.]+)\s*total tokens/s,\s*([\d.]+)\s*output "
                         r"tokens/s")
_KV_TOKENS = re.compile(r"GPU KV cache size:\s*([\d,]+)\s*tokens")
_CONCURRENCY = re.compile(r"Maximum concurrency for\s*([\d,]+)\s*tokens per request:\s*([\d.]+)x")
_PROMPT = re.compile(r"Total num prompt tokens:\s*(\d+)")
_OUTPUT = re.compile(r"Total num output tokens:\s*(\d+)")
_RC_TRAILER = re.compile(r"^kv_throughput: rc=(-?\d+)\s*$", re.M)
# "(EngineCore pid=1363) ERROR 11-22 13:32:30 [core.py:1100] " / "(EngineCore_DP0 pid=1) " / "ERROR 11-22 ... [x.py:1] "
_PREFIX = re.compile(r"^(?:\([A-Za-z_]\w*(?: pid=\d+)?\) ?)?(?:(?:DEBUG|INFO|WARNING|ERROR|CRITICAL)\s+"
                     r"\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?\s+\[[^\]]*\]\s?)?")
_OOM = re.compile(r"CUDA out of memory|OutOfMemoryError|out of memory", re.I)
_EXC_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt)\b(?::.*)?$")
_ERROR_WORD = re.compile(r"\b\w*Error\b")
_STAMP = r"(\d\d-\d\d \d\d:\d\d:\d\d)"
_CLOCK = re.compile(r"^kv_throughput: start=" + _STAMP + r" end=" + _STAMP + r"\s*$", re.M)
_INIT_DONE = re.compile(_STAMP + r"(?:\.\d+)?\s+\[[^\]]*\]\s+init engine \(profile, create kv cache, warmup model\) "
                        r"took\s+([\d.]+)\s*s")
_STATS = re.compile(r"Engine \d+: Avg prompt throughput[^\r\n]*")
_ANY_STAMP = re.compile(r"(?:DEBUG|INFO|WARNING|ERROR|CRITICAL)\s+" + _STAMP)
# one tqdm bar state: "Processed prompts:  2%|...| 1/64 [00:10<10:43, 10.21s/it, est. speed ...]"
_BAR = re.compile(r"(?:Processed prompts|Rendering prompts|Adding requests|Capturing CUDA graphs[^:\r\n]*):\s*\d+%\|"
                  r"[^|\r\n]*\|\s*[\d?]+/[\d?]+\s*\[[^\]\r\n]*\]|Warming up with \d+ requests")
BASELINES = ("auto", "int4_per_token_head")
ERROR_CONTEXT = 40


def strip_prefix(line: str) -> str:
    """A log line without vLLM's ``(EngineCore pid=N) LEVEL date [file:line]`` prefix."""
    return _PREFIX.sub("", line, count=1)


def first_error(text: str, context: int = ERROR_CONTEXT) -> dict:
    """The first error block of a log: the first ``Traceback`` line, else the first out-of-memory line, else the
    first line naming an ``...Error`` (each looked for in the engine core's ``(EngineCore...)`` lines first: the
    client's own traceback only says EngineDeadError); with ``context`` lines after it (and 3 before).

    Returns:
        {} when nothing matched, else {"first_error": block (prefix-stripped lines), "root_cause": the block's
        exception line (first ``XxxError: ...`` line after the traceback header, else the matched line)}.
    """
    raw = text.splitlines()
    lines = [strip_prefix(x.rstrip()) for x in raw]
    core = [x.startswith("(EngineCore") for x in raw]  # the engine core's lines first: the client only sees
    tests = (lambda x: "Traceback (most recent call last)" in x, _OOM.search, _ERROR_WORD.search)  # EngineDead
    idx = next((i for t in tests for only_core in (True, False) for i, x in enumerate(lines)
                if (core[i] or not only_core) and t(x)), None)
    if idx is None:
        return {}
    block = lines[max(0, idx - 3): idx + context + 1]
    after = lines[idx + 1:]
    cause = next((x.strip() for x in after if _EXC_LINE.match(x.strip())), None)
    oom = next((x.strip() for x in lines[idx:] if _OOM.search(x)), None)
    return {"first_error": "\n".join(block), "root_cause": oom or cause or lines[idx].strip()}


def parse_log(text: str) -> dict:
    """Numbers of one bench log (the last occurrence of each line; absent lines are left out).

    Returns:
        dict with any of requests_s, total_tok_s, output_tok_s (float), kv_cache_tokens (int, summed over
        engine-core ranks if several print it), max_concurrency (float), prompt_tokens, output_tokens (int).
    """
    out: dict = {}
    m = _THROUGHPUT.findall(text)
    if m:
        out["requests_s"], out["total_tok_s"], out["output_tok_s"] = (float(x) for x in m[-1])
    kv = _KV_TOKENS.findall(text)
    if kv:
        out["kv_cache_tokens"] = int(kv[-1].replace(",", ""))
    c = _CONCURRENCY.findall(text)
    if c:
        out["max_concurrency"] = float(c[-1][1])
    for key, rx in (("prompt_tokens", _PROMPT), ("output_tokens", _OUTPUT)):
        v = rx.findall(text)
        if v:
            out[key] = int(v[-1])
    return out


def _stamp_s(stamp: str) -> float:
    """Seconds of a vLLM log stamp ``MM-DD HH:MM:SS`` (no year: a leap year so 02-29 parses)."""
    return _dt.datetime.strptime("2000-" + stamp, "%Y-%m-%d %H:%M:%S").timestamp()


def _last_progress(text: str) -> str | None:
    """Last tqdm bar state (bars redraw with carriage returns, ``_BAR``) or "Warming up with N requests"."""
    hits = list(_BAR.finditer(text))
    return hits[-1].group(0).strip() if hits else None


def timeline(text: str) -> dict:
    """When a run got where: engine init and the last progress, for slow vs stuck (see the module docstring).
    Without the clock trailer, times count from the log's first stamped line (``clock`` says which).

    Returns:
        dict with any of init_s, init_done_at_s, ended_at_s (float s), clock ("process start" / "first log
        line"), last_progress, last_stats (str), and timeout_phase ("startup" / "engine_init" / "after_init")
        with timeout_detail (str).
    """
    out: dict = {}
    init = _INIT_DONE.search(text)
    clock = _CLOCK.findall(text)
    first = _ANY_STAMP.search(text)
    start = None
    if clock:
        start = _stamp_s(clock[-1][0])
        out["clock"] = "process start"
        out["ended_at_s"] = round(_stamp_s(clock[-1][1]) - start, 1)
    elif first:
        start = _stamp_s(first.group(1))
        out["clock"] = "first log line"
    if init:
        out["init_s"] = float(init.group(2))
        if start is not None:
            out["init_done_at_s"] = round(_stamp_s(init.group(1)) - start, 1)
    after = text[init.end():] if init else text
    prog = _last_progress(after)
    stats = _STATS.findall(after)
    if prog:
        out["last_progress"] = prog
    if stats:
        out["last_stats"] = stats[-1].strip()[:300]
    since = "" if out.get("clock") != "first log line" else " after the first log line"
    if init:
        out["timeout_phase"] = "after_init"
        at = f" at {out['init_done_at_s']:.0f} s{since}" if "init_done_at_s" in out else ""
        killed = (f" (killed at {out['ended_at_s']:.0f} s, {out['ended_at_s'] - out['init_done_at_s']:.0f} s after "
                  f"init)" if "init_done_at_s" in out and "ended_at_s" in out else "")
        last = prog or "none after init (prompts not rendered yet)"
        out["timeout_detail"] = (f"timeout after engine init{at}{killed}, vLLM init {out['init_s']:.0f} s; "
                                 f"last progress: {last}" + (f"; last stats: {out['last_stats']}" if stats else ""))
    elif "(EngineCore" in text:
        out["timeout_phase"] = "engine_init"
        out["timeout_detail"] = f"timeout during engine init; last progress: {prog or 'none'}"
    else:
        out["timeout_phase"] = "startup"
        out["timeout_detail"] = "timeout before the engine core started"
    return out


def variant_entry(log_path: str, rc_path: str, tail_lines: int = 40) -> dict:
    """Entry of one variant from its log and exit-status files (see the module docstring)."""
    text = ""
    if os.path.exists(log_path):
        with open(log_path, errors="replace") as f:
            text = f.read()
    trailer = _RC_TRAILER.findall(text)
    if trailer:
        rc = int(trailer[-1])
    elif os.path.exists(rc_path):
        with open(rc_path) as f:
            rc_text = f.read().strip()
        try:
            rc = int(rc_text)
        except ValueError:
            return {"status": "failed", "rc": None, "error": f"{rc_path}: bad exit status {rc_text!r}"}
    else:
        return {"status": "not_run"}
    entry = {"rc": rc, **parse_log(text)}
    ok = rc == 0 and "output_tok_s" in entry
    entry["status"] = "ok" if ok else ("timeout" if rc in (124, 137) else "failed")
    tl = timeline(text)
    if entry["status"] != "timeout":
        tl = {k: x for k, x in tl.items() if not k.startswith("timeout_")}
    entry.update(tl)
    if not ok:
        entry.update(first_error(text))
        entry["log_tail"] = "\n".join(x for x in text.splitlines()[-tail_lines:] if not _RC_TRAILER.match(x))
    return entry


def ratios(entries: dict) -> dict:
    """{ours: {"output_tok_s_vs_<base>": r, "kv_tokens_vs_<base>": r}} for every ``mxmoe*`` entry that ran."""
    res: dict = {}
    for name, e in entries.items():
        if not name.startswith("mxmoe") or e.get("status") != "ok":
            continue
        r = {}
        for base in BASELINES:
            b = entries.get(base, {})
            for key, label in (("output_tok_s", "output_tok_s"), ("kv_cache_tokens", "kv_tokens")):
                if e.get(key) and b.get(key):
                    r[f"{label}_vs_{base}"] = round(e[key] / b[key], 3)
        res[name] = r
    return res


def build(logs: str, variants: list[str], meta: dict | None = None) -> dict:
    entries = {v: variant_entry(os.path.join(logs, v + ".log"), os.path.join(logs, v + ".rc")) for v in variants}
    return {"meta": meta or {}, "variants": entries, "ratios": ratios(entries)}


def merge(results: list[dict]) -> dict:
    """Join several ``build`` results (later variants replace earlier ones of the same name); ratios recomputed.

    Returns:
        {"meta": {"merged": [each input's meta]}, "variants": ..., "ratios": ...}.
    """
    entries: dict = {}
    for r in results:
        if not isinstance(r, dict) or not isinstance(r.get("variants"), dict):
            raise ValueError("merge: every input needs a 'variants' object (a kv_throughput.json)")
        entries.update(r["variants"])
    return {"meta": {"merged": [r.get("meta", {}) for r in results]}, "variants": entries,
            "ratios": ratios(entries)}


def write_json(path: str, obj: dict) -> None:
    """Atomic JSON write (temp file then rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--logs", help="directory with NAME.log and NAME.rc per variant")
    ap.add_argument("--variants", help="comma list of variant names")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="join these kv_throughput.json files instead")
    ap.add_argument("--json", required=True, help="output JSON path (written atomically)")
    ap.add_argument("--meta", default="{}", help="JSON object stored under 'meta'")
    args = ap.parse_args(argv)
    if args.merge:
        loaded = []
        for path in args.merge:
            with open(path) as f:
                loaded.append(json.load(f))
        res = merge(loaded)
    elif args.logs and args.variants:
        res = build(args.logs, [v for v in args.variants.split(",") if v], json.loads(args.meta))
    else:
        ap.error("give --logs and --variants, or --merge")
    write_json(args.json, res)
    for name, e in res["variants"].items():
        print(f"{name:24s} {e['status']:8s} output tok/s {e.get('output_tok_s', '-')!s:>10s}  "
              f"KV tokens {e.get('kv_cache_tokens', '-')!s:>12s}"
              + (f"  cause: {e['root_cause'][:160]}" if e.get("root_cause") else "")
              + (f"  {e['timeout_detail'][:200]}" if e.get("timeout_detail") else ""))
    for name, r in res["ratios"].items():
        print(name, r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
