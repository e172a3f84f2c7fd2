"""metrics_hook.register(): process-0 detection, MXSERVE_METRICS_DIR inheritance, collector on the global REGISTRY,
idempotence, and never touching PROMETHEUS_MULTIPROC_DIR. Runs in fresh interpreters (it mutates global state)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

_SCRIPT = textwrap.dedent("""
    import json, multiprocessing as mp, os, sys
    from prometheus_client import REGISTRY, generate_latest

    def child(q):
        from mxserve.vllm_plugin import metrics_hook
        from mxserve.metrics import sidechannel
        metrics_hook.register()
        sidechannel.configure(model_name="tiny", engine=0)
        sidechannel.publish("offload", {"expert_cache_hits": 5, "expert_h2d_bytes": 4096}, min_interval_s=0)
        q.put({"dir": os.environ.get("MXSERVE_METRICS_DIR"),
               "child_has_collector": metrics_hook._state["collector"] is not None})

    if __name__ == "__main__":
        from mxserve.vllm_plugin import metrics_hook
        n_before = len(list(REGISTRY._collector_to_names))
        metrics_hook.register()
        metrics_hook.register()
        d = os.environ["MXSERVE_METRICS_DIR"]
        ctx = mp.get_context(sys.argv[1])
        q = ctx.Queue()
        p = ctx.Process(target=child, args=(q,))
        p.start(); res = q.get(timeout=60)
        text = generate_latest(REGISTRY).decode()   # scraped while the child is still alive
        p.join(timeout=60)
        print(json.dumps({"dir": d, "child": res, "added": len(list(REGISTRY._collector_to_names)) - n_before,
                          "multiproc": os.environ.get("PROMETHEUS_MULTIPROC_DIR"),
                          "line": [l for l in text.splitlines() if l.startswith("mxserve:expert_cache_hits_total")],
                          "python_gc_still_there": "python_gc_objects_collected_total" in text}))
""")


def _run(tmp_path, method):
    script = tmp_path / "hook_script.py"
    script.write_text(_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("MXSERVE_METRICS_DIR", "PROMETHEUS_MULTIPROC_DIR")}
    out = subprocess.run([sys.executable, str(script), method], capture_output=True, text=True, env=env, timeout=120,
                         cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_register_process0_and_forked_worker(tmp_path):
    r = _run(tmp_path, "fork")
    assert r["dir"] and os.path.basename(r["dir"]).startswith("mxserve-metrics-")
    assert r["child"]["dir"] == r["dir"]                 # inherited, not re-created
    # a forked child inherits process 0's already-registered state (as vLLM's engine core does): no second dir
    assert r["added"] == 1                               # idempotent: one collector
    assert r["multiproc"] is None                        # never set (would drop vLLM's own metrics)
    assert r["line"] == ['mxserve:expert_cache_hits_total{engine="0",model_name="tiny"} 5.0']
    assert r["python_gc_still_there"]                    # default registry content untouched
    assert not os.path.exists(r["dir"])                  # owned temp dir removed at exit


def test_register_spawned_worker(tmp_path):
    r = _run(tmp_path, "spawn")
    assert r["child"]["dir"] == r["dir"] and r["child"]["child_has_collector"] is False
    assert r["line"] == ['mxserve:expert_cache_hits_total{engine="0",model_name="tiny"} 5.0']
