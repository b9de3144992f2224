"""A request's text and its stop strings, on the decoding thread (docs/semantics.md: "Stop strings").

Stop strings are a decode rule: a request stops at the first one its text holds, whichever block or token
boundaries the match straddles, so the text is built where the tokens are committed (incrementally: O(new
tokens) per event, tokenizers' DecodeStream through detokenize.TextStream) and every text a client receives
comes from here. Text that could still be the start of a stop string is held back until the next tokens
settle it, so a stream never shows text past a stop."""
from __future__ import annotations

from .detokenize import TextStream


class RequestText:
    """`add(ids)` -> (how many of ids to keep, the text they make visible, whether a stop string matched);
    `finish()` -> the text held back at the end. The text before the first stop string is the whole output."""

    def __init__(self, tokenizer, stops: tuple[str, ...] = ()):
        self.stream = TextStream(tokenizer)
        self.stops = tuple(stops)
        self.hold = max((len(s) for s in self.stops), default=1) - 1   # characters a stop could still need
        self.pending = ""   # decoded, not yet shown
        self.text = ""      # shown so far
        self.stopped = False

    def add(self, ids: list[int]) -> tuple[int, str, bool]:
        if not self.stops:
            self.text += (shown := self.stream.add(ids))
            return len(ids), shown, False
        for i, t in enumerate(ids):   # one id at a time: the stop's last token is the last one kept
            self.pending += self.stream.add([t])
            at = min((j for j in (self.pending.find(s) for s in self.stops) if j >= 0), default=-1)
            if at >= 0:
                shown, self.pending, self.stopped = self.pending[:at], "", True
                self.text += shown
                return i + 1, shown, True
        cut = max(0, len(self.pending) - self.hold)
        shown, self.pending = self.pending[:cut], self.pending[cut:]
        self.text += shown
        return len(ids), shown, False

    def finish(self) -> str:
        if self.stopped:   # nothing after a stop string is shown
            return ""
        shown = self.pending + self.stream.finish()
        self.pending = ""
        self.text += shown
        return shown
