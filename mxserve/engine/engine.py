"""Continuous-batching engine: one thread owns the model, admits queued sequences, runs mixed prefill/decode steps
and pushes per-sequence outputs to callbacks.

Lifecycle: ``Engine(model, tokenizer, ...)`` -> ``start()`` (spawns the engine thread) -> ``submit()`` /
``abort()`` from any thread -> ``shutdown()``. Callbacks run on the engine thread and must not block (the server
hands them to its event loop with ``call_soon_threadsafe``).

Scheduling per step: aborted sequences are dropped first (their KV cache is freed at once), waiting sequences are
admitted FIFO up to ``max_num_seqs`` running, then decode tokens (one per running sequence) and prefill chunks share
a budget of ``max_batch_tokens`` flat tokens for one ``MoEModel.forward``.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from mxserve.engine.detok import StopChecker
from mxserve.engine.kv_cache import KVCache
from mxserve.engine.model import MoEModel
from mxserve.engine.sampling import Sampled, SamplingParams, sample

log = logging.getLogger("mxserve.engine")


class QueueFull(RuntimeError):
    """The bounded queue cannot take the request now (HTTP 429 + Retry-After)."""


class EngineUnavailable(RuntimeError):
    """The engine is stopped or failed (HTTP 503 + Retry-After)."""


@dataclass
class SeqOutput:
    """What one engine step produced for one sequence (choice ``index`` of request ``request_id``)."""

    request_id: str
    index: int
    token_ids: list[int]
    text: str
    logprobs: list[Sampled]
    finish_reason: str | None        # None while running; "stop" | "length" | "abort" | "error"
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


@dataclass
class _Seq:
    request_id: str
    index: int
    prompt: list[int]
    params: SamplingParams
    callback: Callable[[SeqOutput], None]
    arrival: float
    detok: StopChecker
    generator: torch.Generator | None
    out: list[int] = field(default_factory=list)
    computed: int = 0
    cache: KVCache | None = None
    last_token_time: float | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.out


class Engine:
    """The embedded engine.

    Args:
        model: loaded ``MoEModel``.
        tokenizer: HF tokenizer of the checkpoint.
        max_num_seqs: sequences decoded together at most.
        max_waiting: sequences queued beyond the running ones before ``submit`` raises ``QueueFull``.
        max_model_len: prompt + output tokens per sequence at most.
        max_batch_tokens: flat tokens per forward (prefills are chunked to fit).
        kv_cache_factory: ``factory(layers, kv_heads, head_dim, dtype) -> KVCache``; None = bf16.
        metrics: namespace from ``mxserve.metrics.definitions.create_engine_metrics`` or None.
        model_name: ``model_name`` label of the metrics.
    """

    def __init__(self, model: MoEModel, tokenizer, *, max_num_seqs: int = 16, max_waiting: int = 64,
                 max_model_len: int | None = None, max_batch_tokens: int = 512, kv_cache_factory=None,
                 metrics=None, model_name: str = "model"):
        self.model, self.tokenizer = model, tokenizer
        self.max_num_seqs, self.max_waiting = max_num_seqs, max_waiting
        self.max_model_len = min(max_model_len or model.spec.max_positions, model.spec.max_positions)
        self.max_batch_tokens = max(max_batch_tokens, max_num_seqs)
        self.kv_cache_factory = kv_cache_factory
        self.metrics, self.model_name = metrics, model_name
        eos = set(model.spec.eos_token_ids)
        if getattr(tokenizer, "eos_token_id", None) is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_ids = frozenset(eos)
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []
        self._aborts: set[str] = set()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._paused = False
        self.failed: str | None = None
        self.steps = 0

    # ---- public API (any thread) ------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="mxserve-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop and self.failed is None

    def counts(self) -> tuple[int, int]:
        """(waiting, running) sequence counts."""
        with self._cv:
            return len(self._waiting), len(self._running)

    def submit(self, request_id: str, prompt: list[int], params: SamplingParams, n: int,
               callback: Callable[[SeqOutput], None]) -> None:
        """Queue ``n`` sequences sharing ``prompt``; outputs arrive through ``callback`` (engine thread).

        Raises:
            ValueError: empty prompt or prompt + max_tokens beyond ``max_model_len``.
            QueueFull: the bounded queue is full.
            EngineUnavailable: the engine is stopped or failed.
        """
        if not prompt:
            raise ValueError("prompt is empty")
        if len(prompt) + params.max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                             f"model's context length {self.max_model_len}")
        if not self.alive:
            raise EngineUnavailable(self.failed or "engine is not running")
        now = time.monotonic()
        seqs = [_Seq(request_id, i, list(prompt), params, callback, now, StopChecker(self.tokenizer, params.stop),
                     torch.Generator().manual_seed(params.seed + i) if params.seed is not None else None)
                for i in range(n)]
        with self._cv:
            if len(self._waiting) + len(self._running) + n > self.max_num_seqs + self.max_waiting:
                raise QueueFull(f"queue full ({len(self._waiting)} waiting, {len(self._running)} running)")
            self._waiting.extend(seqs)
            self._cv.notify_all()
        self._update_gauges()

    def pause(self, paused: bool = True) -> None:
        """Stop (or resume) admitting and stepping sequences; aborts are still applied while paused (drain,
        maintenance, deterministic tests)."""
        with self._cv:
            self._paused = paused
            self._cv.notify_all()

    def abort(self, request_id: str) -> None:
        """Drop every sequence of ``request_id`` at the next step boundary (frees its slot and KV cache)."""
        with self._cv:
            self._aborts.add(request_id)
            self._cv.notify_all()

    # ---- engine thread ----------------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            self._serve_forever()
        except BaseException as e:  # engine bug: fail loudly, never leave clients waiting
            log.exception("engine thread died")
            self.failed = f"engine thread died: {type(e).__name__}: {e}"
            with self._cv:
                self._stop = True
        with self._cv:
            pending = self._waiting + deque(self._running)
            self._waiting.clear()
            self._running.clear()
        for s in pending:
            self._finish(s, "abort" if self.failed is None else "error", error=self.failed or "engine shut down")

    def _serve_forever(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self._aborts and (
                        self._paused or not (self._waiting or self._running)):
                    self._cv.wait()
                if self._stop:
                    break
                self._apply_aborts()
                while self._waiting and len(self._running) < self.max_num_seqs and not self._paused:
                    seq = self._waiting.popleft()
                    seq.cache = self.model.new_cache(self.kv_cache_factory)
                    self._running.append(seq)
                running = [] if self._paused else list(self._running)
            if running:
                try:
                    self._step(running)
                except Exception as e:  # a failed step fails its requests, never the server
                    log.exception("engine step failed")
                    with self._cv:
                        self._running = [s for s in self._running if s not in running]
                    for s in running:
                        self._finish(s, "error", error=f"{type(e).__name__}: {e}")
            self._update_gauges()

    def _apply_aborts(self) -> None:
        if not self._aborts:
            return
        ab, self._aborts = self._aborts, set()
        gone = [s for s in list(self._running) + list(self._waiting) if s.request_id in ab]
        self._running = [s for s in self._running if s.request_id not in ab]
        self._waiting = deque(s for s in self._waiting if s.request_id not in ab)
        for s in gone:
            s.cache = None
            self._record_finish(s, "abort")

    def _step(self, running: list[_Seq]) -> None:
        budget = self.max_batch_tokens
        batch: list[tuple[_Seq, int]] = []
        # decodes first (one token each), then prefill chunks with what is left of the budget
        for s in sorted(running, key=lambda s: len(s.tokens) - s.computed):
            take = min(len(s.tokens) - s.computed, budget)
            if take <= 0:
                break
            batch.append((s, take))
            budget -= take
        ids, pos, spans, caches, start = [], [], [], [], 0
        for s, take in batch:
            ids.extend(s.tokens[s.computed:s.computed + take])
            pos.extend(range(s.computed, s.computed + take))
            spans.append((start, start + take))
            caches.append(s.cache)
            start += take
        hidden = self.model.forward(torch.tensor(ids, dtype=torch.int64), torch.tensor(pos, dtype=torch.int64),
                                    spans, caches)
        logits = self.model.logits(hidden)
        self.steps += 1
        for row, (s, take) in enumerate(batch):
            s.computed += take
            if s.computed < len(s.tokens):
                continue  # prefill chunk, not done yet
            self._on_token(s, sample(logits[row], s.params, s.generator))

    def _on_token(self, s: _Seq, smp: Sampled) -> None:
        now = time.monotonic()
        m = self.metrics
        if m is not None:
            if s.last_token_time is None:
                m.ttft.labels(model_name=self.model_name).observe(now - s.arrival)
            else:
                m.itl.labels(model_name=self.model_name).observe(now - s.last_token_time)
            m.generation_tokens.labels(model_name=self.model_name).inc()
        s.last_token_time = now
        s.out.append(smp.token)
        p = s.params
        reason = None
        hit_eos = (smp.token in self.eos_ids and not p.ignore_eos) or smp.token in p.stop_token_ids
        if hit_eos:
            reason = "stop"
        elif len(s.out) >= p.max_tokens or len(s.tokens) >= self.max_model_len:
            reason = "length"
        visible = s.out[:-1] if hit_eos else s.out
        delta, hit_stop = s.detok.update(visible, final=reason is not None)
        if hit_stop:
            reason = "stop"
        if reason is not None:
            with self._cv:
                if s in self._running:
                    self._running.remove(s)
            s.cache = None
        s.callback(SeqOutput(s.request_id, s.index, [smp.token], delta, [smp] if p.logprobs is not None else [],
                             reason, len(s.prompt), len(s.out)))
        if reason is not None:
            self._record_finish(s, reason)

    def _finish(self, s: _Seq, reason: str, error: str | None = None) -> None:
        s.cache = None
        try:
            s.callback(SeqOutput(s.request_id, s.index, [], "", [], reason, len(s.prompt), len(s.out), error))
        finally:
            self._record_finish(s, reason)

    def _record_finish(self, s: _Seq, reason: str) -> None:
        m = self.metrics
        if m is None:
            return
        if s.index == 0:
            m.requests.labels(model_name=self.model_name, finished_reason=reason).inc()
            m.request_latency.labels(model_name=self.model_name).observe(time.monotonic() - s.arrival)
            m.prompt_tokens.labels(model_name=self.model_name).inc(len(s.prompt))

    def _update_gauges(self) -> None:
        m = self.metrics
        if m is None:
            return
        with self._cv:
            waiting = len({s.request_id for s in self._waiting})
            running = len({s.request_id for s in self._running})
            kv = [s.cache for s in self._running if s.cache is not None]
        m.num_requests_waiting.labels(model_name=self.model_name).set(waiting)
        m.num_requests_running.labels(model_name=self.model_name).set(running)
        # every precision seen so far is reported, 0 when no running sequence uses it any more
        self._kv_precisions = getattr(self, "_kv_precisions", set()) | {c.precision for c in kv}
        by_precision: dict[str, int] = dict.fromkeys(self._kv_precisions, 0)
        for c in kv:
            by_precision[c.precision] = by_precision.get(c.precision, 0) + c.nbytes()
        for precision, nbytes in by_precision.items():
            m.kv_cache_bytes.labels(model_name=self.model_name, precision=precision).set(nbytes)
        if kv:
            m.kv_cache_bits_per_element.labels(model_name=self.model_name).set(kv[0].bits_per_element)
