"""Soak verdict (``loadtests.soak_check``) and the process-tree memory sampler (``loadtests.procmem``) used by
``.ci/gpu/soak.sh``; the script itself runs end to end on CPU with ``bash .ci/gpu/soak.sh 120 --embedded``."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from loadtests import procmem, soak_check


def _exposition(stop: float, length: float, abort: float = 0.0, error: float = 0.0, name="vllm:request_success"):
    lines = [f"# HELP {name}_total x", f"# TYPE {name}_total counter"]
    for eng in ("0", "1"):  # two engines: the check sums them
        for r, v in (("stop", stop), ("length", length), ("abort", abort), ("error", error)):
            lines.append(f'{name}_total{{engine="{eng}",finished_reason="{r}",model_name="m"}} {v / 2}')
    return "\n".join(lines) + "\n"


def _soak(completed=100, lost=0, faults=("disconnect", "oversize", "invalid", "burst", "disconnect")):
    return {"pass": lost == 0, "completed": completed, "lost_requests": lost, "faults_ok": True,
            "healthy_after": True, "rss_growth_fraction": 0.0, "duration_s": 300.0,
            "faults": [{"fault": f, "ok": True} for f in faults]}


def _rss(values):
    return [{"t": 5.0 * i, "rss_bytes": v, "n_procs": 3, "gpu_used_bytes": None} for i, v in enumerate(values)]


FLAT = [1e9, 1.01e9, 1e9, 1.02e9, 1.01e9, 1e9, 1.01e9, 1.02e9]


@pytest.mark.parametrize("name", ["vllm:request_success", "mxserve:requests"])
def test_pass_when_everything_agrees(name):
    before = _exposition(10, 20, name=name)
    after = _exposition(10 + 60, 20 + 40 + 30 + 1, abort=1, name=name)  # 130 completed + 1 disconnect finished
    out = soak_check.check(_soak(completed=100), {"sent": 30, "completed": 30, "failed": 0}, before, after,
                           _rss(FLAT))
    assert out["pass"], out
    assert out["checks"]["server_counters"]["finished_delta"]["abort"] == pytest.approx(1.0)


@pytest.mark.parametrize("case", ["lost", "server_short", "server_error", "server_extra", "rss", "sweep_loss",
                                  "no_counters"])
def test_each_failure_is_caught(case):
    soak, sweep = _soak(), {"sent": 30, "completed": 30, "failed": 0}
    before, after, rss = _exposition(0, 0), _exposition(0, 130), FLAT
    if case == "lost":
        soak = _soak(lost=1)
    elif case == "server_short":      # the server finished fewer than the clients saw complete
        after = _exposition(0, 129)
    elif case == "server_error":
        after = _exposition(0, 130, error=2)
    elif case == "server_extra":      # more finished than completed + disconnects: requests the clients lost track of
        after = _exposition(0, 133)
    elif case == "rss":
        rss = [1e9, 1e9, 1.05e9, 1.1e9, 1.15e9, 1.2e9, 1.25e9, 1.3e9]
    elif case == "sweep_loss":
        sweep = {"sent": 30, "completed": 29, "failed": 1}
        after = _exposition(0, 129)
    else:
        after = "# nothing\n"
    out = soak_check.check(soak, sweep, before, after, _rss(rss))
    assert not out["pass"]
    failed = {k for k, c in out["checks"].items() if not c["ok"]}
    expect = {"lost": {"soak_driver"}, "server_short": {"server_counters"}, "server_error": {"server_counters"},
              "server_extra": {"server_counters"}, "rss": {"tree_rss_flat"}, "sweep_loss": {"sweep_no_loss"},
              "no_counters": {"server_counters"}}[case]
    assert failed == expect


def test_cli_writes_verdict_and_reports_missing_steps(tmp_path):
    (tmp_path / "soak.json").write_text(json.dumps(_soak()))
    (tmp_path / "before.txt").write_text(_exposition(0, 0))
    (tmp_path / "after.txt").write_text(_exposition(0, 100))
    (tmp_path / "rss.jsonl").write_text("\n".join(json.dumps(x) for x in _rss(FLAT)))
    args = ["--soak", str(tmp_path / "soak.json"), "--metrics-before", str(tmp_path / "before.txt"),
            "--metrics-after", str(tmp_path / "after.txt"), "--rss", str(tmp_path / "rss.jsonl"),
            "--planned-soak", "400", "--json", str(tmp_path / "v.json")]
    assert soak_check.main(args) == 0
    v = json.loads((tmp_path / "v.json").read_text())
    assert v["pass"] and v["soak_shortened"]  # 300 s of a planned 400 s
    assert soak_check.main(args + ["--sweep", str(tmp_path / "nope.json")]) == 1
    v = json.loads((tmp_path / "v.json").read_text())
    assert not v["pass"] and "nope.json" in v["checks"]["inputs"]["error"]


def test_growth():
    assert procmem.growth([1.0, 1.0, 1.0]) is None
    assert procmem.growth([1.0, 1.0, 2.0, 2.0]) == pytest.approx(1.0)
    assert procmem.growth([4.0] * 4 + [5.0] * 4) == pytest.approx(0.25)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
def test_sampler_sees_the_process_tree(tmp_path):
    # a parent python that starts a child allocating ~64 MiB: the tree is both, and the RSS includes the child's
    code = ("import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', "
            "'b = bytearray(64 << 20); import time; time.sleep(30)']); time.sleep(30)")
    p = subprocess.Popen([sys.executable, "-c", code])
    try:
        for _ in range(100):
            s = procmem.sample(p.pid)
            if s["n_procs"] >= 2 and s["rss_bytes"] > 64 << 20:
                break
            time.sleep(0.1)
        assert s["n_procs"] >= 2 and s["rss_bytes"] > 64 << 20, s
        assert s["rss_bytes"] > procmem.rss_bytes(p.pid)
        out = tmp_path / "rss.jsonl"
        stop = tmp_path / "stop"
        assert procmem.main(["--pid", str(p.pid), "--out", str(out), "--interval", "0.05", "--max-seconds", "0.3",
                             "--stop-file", str(stop)]) == 0
        lines = [json.loads(x) for x in out.read_text().splitlines()]
        assert lines and all(x["rss_bytes"] > 64 << 20 for x in lines)
        assert (lines[0]["gpu_used_bytes"] is None) == (shutil.which("nvidia-smi") is None)
    finally:
        for c in procmem.children(p.pid):
            os.kill(c, 9)
        p.kill()
        p.wait()
