"""Turn validated OpenAI requests into engine submissions: prompt tokenization, sampling parameters, feature
checks (422 for features the embedded engine does not implement, 400 for invalid values)."""
from __future__ import annotations

from dataclasses import dataclass

from mxserve.engine.sampling import MAX_LOGPROBS, SamplingParams
from mxserve.serve.errors import APIError
from mxserve.serve.protocol import MAX_PROMPTS, MAX_STOP, ChatCompletionRequest, CompletionRequest


@dataclass
class Prepared:
    """Prompts (token ids), shared sampling params and n for one API request."""

    prompts: list[list[int]]
    params: SamplingParams
    n: int
    stream: bool
    include_usage: bool
    logprobs: int | None


def _unsupported(feature: str, param: str) -> APIError:
    return APIError(422, f"{feature} is not supported by the embedded engine", param)


def _common(req, max_tokens: int | None, logprobs: int | None, extra_stop_ids: tuple[int, ...],
            default_max: int) -> tuple[SamplingParams, bool]:
    if req.presence_penalty or req.frequency_penalty:
        raise _unsupported("presence_penalty / frequency_penalty", "presence_penalty")
    if req.logit_bias:
        raise _unsupported("logit_bias", "logit_bias")
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options can only be set when stream=true", "stream_options")
    if logprobs is not None and logprobs > MAX_LOGPROBS:
        raise APIError(400, f"logprobs must be at most {MAX_LOGPROBS}, got {logprobs}", "logprobs")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP or any(not s for s in stop):
        raise APIError(400, f"stop: at most {MAX_STOP} non-empty strings", "stop")
    try:
        params = SamplingParams(
            max_tokens=max_tokens if max_tokens is not None else default_max,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            seed=None if req.seed is None else req.seed % (1 << 63), stop=tuple(stop),
            stop_token_ids=tuple(req.stop_token_ids or ()) + extra_stop_ids, logprobs=logprobs,
            ignore_eos=req.ignore_eos)
    except ValueError as e:
        raise APIError(400, str(e)) from None
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return params, include_usage


def _check_ids(ids: list[int], vocab: int, param: str) -> list[int]:
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {vocab})", param)
    return ids


def prepare_completion(req: CompletionRequest, tokenizer, vocab: int, room: int) -> Prepared:
    """Validate a completion request. ``room`` is the context length (prompt + max_tokens must fit)."""
    if req.echo:
        raise _unsupported("echo", "echo")
    if req.suffix:
        raise _unsupported("suffix", "suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise _unsupported("best_of != n", "best_of")
    p = req.prompt
    if isinstance(p, str):
        prompts = [tokenizer.encode(p, add_special_tokens=False)]
    elif p and all(isinstance(x, str) for x in p):
        prompts = [tokenizer.encode(x, add_special_tokens=False) for x in p]
    elif p and all(isinstance(x, int) for x in p):
        prompts = [_check_ids(list(p), vocab, "prompt")]
    else:
        prompts = [_check_ids(list(x), vocab, "prompt") for x in p]
    if not prompts or len(prompts) > MAX_PROMPTS:
        raise APIError(400, f"prompt: between 1 and {MAX_PROMPTS} prompts", "prompt")
    if any(not x for x in prompts):
        raise APIError(400, "prompt must not be empty", "prompt")
    if req.stop_token_ids:
        _check_ids(req.stop_token_ids, vocab, "stop_token_ids")
    params, usage = _common(req, req.max_tokens, req.logprobs, (), 16)
    _check_room(prompts, params, room)
    return Prepared(prompts, params, req.n, req.stream, usage, req.logprobs)


def chat_prompt(req: ChatCompletionRequest, tokenizer) -> list[int]:
    """Apply the checkpoint's chat template (400 if it has none)."""
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions", "messages")
    msgs = []
    for m in req.messages:
        c = m.content if isinstance(m.content, str) or m.content is None else "".join(p.text for p in m.content)
        msgs.append({"role": m.role, "content": c or ""})
    text = tokenizer.apply_chat_template(msgs, add_generation_prompt=req.add_generation_prompt, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def prepare_chat(req: ChatCompletionRequest, tokenizer, vocab: int, room: int) -> Prepared:
    """Validate a chat request; the template's end-of-turn token (``<|im_end|>``) also ends generation."""
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs requires logprobs=true", "top_logprobs")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    end = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
    if req.stop_token_ids:
        _check_ids(req.stop_token_ids, vocab, "stop_token_ids")
    max_tokens = req.max_completion_tokens or req.max_tokens
    prompt = chat_prompt(req, tokenizer)
    if not prompt:
        raise APIError(400, "messages render to an empty prompt", "messages")
    params, usage = _common(req, max_tokens, logprobs, (end,) if end is not None else (),
                            max(1, room - len(prompt)))
    _check_room([prompt], params, room)
    return Prepared([prompt], params, req.n, req.stream, usage, logprobs)


def _check_room(prompts: list[list[int]], params: SamplingParams, room: int) -> None:
    longest = max(len(x) for x in prompts)
    if longest + params.max_tokens > room:
        raise APIError(400, f"This model's maximum context length is {room} tokens; the prompt has {longest} "
                            f"tokens and max_tokens is {params.max_tokens}", "max_tokens")
