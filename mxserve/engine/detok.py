"""Incremental detokenization with stop strings, safe for streaming (never emits text a stop may still claim)."""
from __future__ import annotations


class StopChecker:
    """Tracks one sequence's decoded text and decides how much of it may be released.

    Args:
        tokenizer: HF tokenizer (``decode``).
        stop: stop strings; text from the first occurrence on is dropped and generation ends.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tok = tokenizer
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.emitted = 0        # characters released so far
        self.text = ""

    def update(self, token_ids: list[int], final: bool) -> tuple[str, bool]:
        """Re-decode ``token_ids`` (all output so far) and return ``(new_text_delta, hit_stop)``.

        A trailing U+FFFD (an incomplete UTF-8 sequence) and the last ``len(longest stop) - 1`` characters are
        held back until more tokens arrive or ``final`` is set.
        """
        text = self.tok.decode(token_ids, skip_special_tokens=True)
        if self.stop:
            start = max(0, self.emitted - self.hold)
            cut = min((i for i in (text.find(s, start) for s in self.stop) if i >= 0), default=-1)
            if cut >= 0:
                self.text = text[:cut]
                delta = self.text[self.emitted:]
                self.emitted = len(self.text)
                return delta, True
        self.text = text
        end = len(text)
        if not final:
            end -= self.hold
            while end > self.emitted and text[end - 1] == "\ufffd":
                end -= 1
        end = max(end, self.emitted)
        delta = text[self.emitted:end]
        self.emitted = end
        return delta, False
