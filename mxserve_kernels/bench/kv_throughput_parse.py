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
"""
from __future__ import annotations

import argparse
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


def write_json(path: str, obj: dict) -> None:
    """Atomic JSON write (temp file then rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--logs", required=True, help="directory with NAME.log and NAME.rc per variant")
    ap.add_argument("--variants", required=True, help="comma list of variant names")
    ap.add_argument("--json", required=True, help="output JSON path (written atomically)")
    ap.add_argument("--meta", default="{}", help="JSON object stored under 'meta'")
    args = ap.parse_args(argv)
    res = build(args.logs, [v for v in args.variants.split(",") if v], json.loads(args.meta))
    write_json(args.json, res)
    for name, e in res["variants"].items():
        print(f"{name:24s} {e['status']:8s} output tok/s {e.get('output_tok_s', '-')!s:>10s}  "
              f"KV tokens {e.get('kv_cache_tokens', '-')!s:>12s}"
              + (f"  cause: {e['root_cause'][:160]}" if e.get("root_cause") else ""))
    for name, r in res["ratios"].items():
        print(name, r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
