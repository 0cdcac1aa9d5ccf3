"""Incremental detokenization with stop strings.

`TextStream` turns a growing list of token ids into text deltas. It holds back
text that is an incomplete UTF-8 sequence or could be the start of a stop
string, so a consumer never sees text that is later retracted.
"""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already handed out
        self.stopped = False
        self.text = ""

    def _decode(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """Add a token; return the text that became final."""
        self.ids.append(token_id)
        text = self._decode()
        if text.endswith("\ufffd"):  # incomplete multi-byte character
            return ""
        self.text = text
        for s in self.stop:
            pos = text.find(s, max(0, self.emitted - len(s)))
            if pos != -1:
                self.text = text[:pos]
                self.stopped = True
                break
        if self.stopped:
            return self._emit(len(self.text))
        hold = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        return self._emit(len(text) - hold)

    def _emit(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        delta = self.text[self.emitted : upto]
        self.emitted = upto
        return delta

    def flush(self) -> str:
        """Release held-back text at the end of generation (no stop string matched)."""
        if not self.stopped:
            text = self._decode()
            self.text = text
        return self._emit(len(self.text))
