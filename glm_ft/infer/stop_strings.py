"""OpenAI's `stop` strings for `serve`: a reply ends before the first stop string its text holds, unstreamed and
streamed alike.

The text searched is the reply's as serve returns it (decoded without special tokens, ChatGLM3's leading newline
stripped), so the reply with `stop` is the reply without it, cut before the stop string. Generation stops on the
token that completes one (serve's StoppingCriteria calls `first_stop` on the text so far); a stream holds back any
end of its text that could still become a stop string, so no part of one is ever sent.
"""

from __future__ import annotations


def first_stop(text: str, stops: list[str]) -> int | None:
    """Where the earliest stop string in `text` begins; None when it holds none."""
    found = [i for i in (text.find(stop) for stop in stops) if i >= 0]
    return min(found) if found else None


def leading(text: str) -> int:
    """How many characters of `text` are the whitespace that starts a ChatGLM3 reply, which the reply leaves out."""
    return len(text) - len(text.lstrip())


class StopText:
    """A stream's decoded pieces -> the pieces that may be sent: the text up to the first stop string, nothing of
    one, and nothing after. `stopped` once a stop string has been seen."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.seen = ""
        self.sent = 0  # characters of `seen` already passed on
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        self.seen += text
        start = leading(self.seen)
        at = first_stop(self.seen[start:], self.stops)
        if at is not None:
            self.stopped = True
            end = start + at
        else:  # held back: the longest end of the text that begins a stop string
            end = len(self.seen) - max((n for stop in self.stops for n in range(1, len(stop))
                                        if self.seen.endswith(stop[:n])), default=0)
            end = max(end, min(start, len(self.seen)), self.sent)
        out, self.sent = self.seen[self.sent:end], max(self.sent, end)
        return out

    def flush(self) -> str:
        """What was held back, once the reply has ended without completing a stop string."""
        out, self.sent = ("" if self.stopped else self.seen[self.sent:]), len(self.seen)
        return out
