"""Parse ``vllm bench throughput`` logs of the KV-cache throughput rows into one JSON (used by
``.ci/gpu/kv_throughput.sh``; imports neither vLLM nor mxserve).

``python -m mxserve_kernels.bench.kv_throughput_parse --logs DIR --variants auto,fp8,... --json OUT``

Per variant NAME it reads ``DIR/NAME.log`` (stdout + stderr of the bench) and ``DIR/NAME.rc`` (exit status; 124 =
the per-variant timeout; absent = not run) and writes one entry: ``status`` (ok / failed / timeout / not_run),
``output_tok_s``, ``total_tok_s``, ``requests_s`` (vLLM's "Throughput: ..." line), ``kv_cache_tokens`` (its "GPU KV
cache size: N tokens" line), ``max_concurrency``, and ``log_tail`` when it did not succeed. ``ratios`` divide each
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
BASELINES = ("auto", "int4_per_token_head")


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
    if not os.path.exists(rc_path):
        return {"status": "not_run"}
    with open(rc_path) as f:
        rc_text = f.read().strip()
    try:
        rc = int(rc_text)
    except ValueError:
        return {"status": "failed", "rc": None, "error": f"{rc_path}: bad exit status {rc_text!r}"}
    text = ""
    if os.path.exists(log_path):
        with open(log_path, errors="replace") as f:
            text = f.read()
    entry = {"rc": rc, **parse_log(text)}
    ok = rc == 0 and "output_tok_s" in entry
    entry["status"] = "ok" if ok else ("timeout" if rc in (124, 137) else "failed")
    if not ok:
        entry["log_tail"] = "\n".join(text.splitlines()[-tail_lines:])
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
              f"KV tokens {e.get('kv_cache_tokens', '-')!s:>12s}")
    for name, r in res["ratios"].items():
        print(name, r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
