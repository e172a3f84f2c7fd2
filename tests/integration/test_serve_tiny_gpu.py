"""GPU (foundation acceptance): `vllm serve` of a `mxserve make-tiny` checkpoint, completion + chat through the
official `openai` client. Every supported architecture is served (one server at a time, small memory share)."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.gpu

ARGS = ["--max-model-len", "512", "--gpu-memory-utilization", "0.10", "--max-num-seqs", "8"]


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "qwen2_moe", "olmoe"])
def test_vllm_serves_make_tiny(arch, tmp_path):
    import openai

    from mxserve.models.tiny import make_tiny
    from mxserve.vllm_plugin.server import VllmServer

    ckpt = make_tiny(arch, tmp_path / arch, layers=2, experts=8, top_k=2, hidden=256, inter=128, vocab=1024,
                     heads=4, kv_heads=2, head_dim=64)
    with VllmServer(str(ckpt), ARGS, log_dir=str(tmp_path)) as srv:
        srv.wait_healthy(420)
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused")
        models = [m.id for m in client.models.list().data]
        assert models == [srv.served_name]
        c = client.completions.create(model=srv.served_name, prompt="def main(", max_tokens=8, temperature=0)
        assert c.usage.completion_tokens == 8 and isinstance(c.choices[0].text, str)
        ch = client.chat.completions.create(model=srv.served_name, max_tokens=6, temperature=0,
                                            messages=[{"role": "user", "content": "import os"}])
        assert ch.choices[0].message.role == "assistant" and ch.usage.completion_tokens >= 1
        print(f"{arch}: completion={c.choices[0].text!r} chat={ch.choices[0].message.content!r}")
