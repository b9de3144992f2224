"""Incremental detokenization: the text of a growing list of generated ids, O(new ids) per step.

`twotower generate` (streaming) and the HTTP server both print text as blocks or tokens are committed. A
byte-level BPE token can end inside a UTF-8 character, so the text of a chunk of ids is not the text of
those ids decoded alone; re-decoding everything generated so far at every event is right but O(length) per
event. tokenizers' `DecodeStream` keeps the few ids it needs to decode the next ones in context and holds
back a character until all its bytes have arrived.
"""
from __future__ import annotations


class TextStream:
    """`add(ids)` returns the text those ids complete; `finish()` the rest. The concatenation of every
    returned piece is `tokenizer.decode(all ids)` (special tokens skipped, as `TwoTowerLM.decode`)."""

    def __init__(self, tokenizer):
        from tokenizers.decoders import DecodeStream

        self.tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)
        self._held: list[int] = []   # ids whose text DecodeStream holds back (an incomplete character)

    def add(self, ids) -> str:
        ids = list(ids)
        if not ids:
            return ""
        text = self._stream.step(self.tokenizer, ids)
        if text is None:
            self._held += ids
            return ""
        self._held = []
        return text

    def finish(self) -> str:
        """The text of ids still held back at the end (an incomplete character decodes as U+FFFD, as the
        whole-list decode does)."""
        text = self.tokenizer.decode(self._held) if self._held else ""
        self._held = []
        return text
