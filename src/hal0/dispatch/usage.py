"""What one relayed answer cost: when its first byte left, and its token counts as the backend reported them.

Token counts come from the answer's `usage` (OpenAI, Anthropic and Responses shapes) or, where a stream carries
none, llama-server's `timings`; the client's request is never changed to get them.
"""

from __future__ import annotations

import json
import time
from collections import deque
from typing import Any

from hal0.datatypes import datatype

#: Stream chunks kept from the end of an answer: its last events (usage, timings) are small and come last.
TAIL_CHUNKS = 8
#: A non-streamed JSON answer larger than this is relayed without reading its usage.
BODY_LIMIT = 4 << 20
_KEYS = (b'"usage"', b'"timings"')
_DECODER = json.JSONDecoder()


@datatype(frozen=True, slots=True, compiled_init=True)
class Usage:
    """The tokens one answer counted: prompt and completion."""
    prompt_tokens: int
    completion_tokens: int


class _Counts:
    """The largest figures seen, `usage` first and `timings` where no usage said (a stream may repeat or
    grow its counts from event to event: Anthropic's message_start and message_delta)."""

    def __init__(self) -> None:
        self.usage: list[int | None] = [None, None]
        self.timings: list[int | None] = [None, None]

    @staticmethod
    def _more(into: list[int | None], i: int, value: Any) -> None:
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            old = into[i]
            into[i] = value if old is None else max(old, value)

    def add_usage(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
        if isinstance(prompt, int):
            # Anthropic's input_tokens leave out what came from (or went into) the prompt cache; OpenAI's
            # prompt_tokens, and so hal0's count, hold the whole prompt.
            for cached in ("cache_read_input_tokens", "cache_creation_input_tokens"):
                if isinstance(usage.get(cached), int):
                    prompt += usage[cached]
        self._more(self.usage, 0, prompt)
        self._more(self.usage, 1, usage.get("completion_tokens", usage.get("output_tokens")))

    def add_timings(self, timings: Any) -> None:
        if not isinstance(timings, dict):
            return
        prompt = timings.get("prompt_n")
        cached = timings.get("cache_n", 0)
        if isinstance(prompt, int) and isinstance(cached, int):
            # llama-server's usage.prompt_tokens is the prompt processed plus what its cache already held.
            self._more(self.timings, 0, prompt + cached)
        self._more(self.timings, 1, timings.get("predicted_n"))

    def add_object(self, obj: Any) -> None:
        if not isinstance(obj, dict):
            return
        self.add_usage(obj.get("usage"))
        self.add_timings(obj.get("timings"))
        for inner in ("message", "response"):  # Anthropic's message_start, the Responses API's events
            if isinstance(obj.get(inner), dict):
                self.add_usage(obj[inner].get("usage"))

    def result(self) -> Usage | None:
        prompt = self.usage[0] if self.usage[0] is not None else self.timings[0]
        completion = self.usage[1] if self.usage[1] is not None else self.timings[1]
        if prompt is None and completion is None:
            return None
        return Usage(prompt or 0, completion or 0)


def usage_from_body(body: bytes) -> Usage | None:
    """Token counts of a whole JSON answer. Only the `usage` and `timings` objects are parsed, not the answer
    (an embeddings answer is mostly floats): a quote inside a JSON string is escaped, so `"usage":` found in
    the bytes is a key."""
    counts = _Counts()
    for key, add in ((b'"usage"', counts.add_usage), (b'"timings"', counts.add_timings)):
        if key == b'"timings"' and counts.usage[1] is not None:
            break  # usage said it all; timings only stand in for it
        at = body.rfind(key)
        if at < 0:
            continue
        colon = body.find(b":", at + len(key))
        if colon < 0:
            continue
        try:
            value, _ = _DECODER.raw_decode(body[colon + 1:].decode("utf-8", errors="replace").lstrip())
        except ValueError:
            continue
        add(value)
    return counts.result()


def usage_from_events(*parts: bytes) -> Usage | None:
    """Token counts from server-sent events (`data: {...}` lines); each part is read on its own, and a line cut
    off at a part's edge is skipped."""
    counts = _Counts()
    for part in parts:
        if not any(key in part for key in _KEYS):
            continue
        for line in part.split(b"\n"):
            if not line.startswith(b"data:") or not any(key in line for key in _KEYS):
                continue
            try:
                counts.add_object(json.loads(line[5:]))
            except ValueError:
                continue
    return counts.result()


class AnswerMeter:
    """Fed every chunk the relay sends: notes when the first one left and keeps just enough of the answer to
    read its token counts after the last one (the first chunk and the last few of a stream, a JSON body
    whole up to BODY_LIMIT, nothing of other answers)."""

    __slots__ = ("_body", "_first", "_size", "_stream", "_tail", "first_at")

    def __init__(self, content_type: str) -> None:
        self.first_at: float | None = None
        self._first = b""
        self._stream = content_type.startswith("text/event-stream")
        self._tail: deque[bytes] = deque(maxlen=TAIL_CHUNKS)
        self._body: list[bytes] | None = [] if content_type.startswith("application/json") else None
        self._size = 0

    def feed(self, chunk: bytes) -> None:
        if self.first_at is None:
            self.first_at = time.time()
            self._first = chunk
        if self._stream:
            self._tail.append(chunk)
        elif self._body is not None:
            self._size += len(chunk)
            if self._size > BODY_LIMIT:
                self._body = None
            else:
                self._body.append(chunk)

    def usage(self) -> Usage | None:
        if self._stream:
            return usage_from_events(self._first, b"".join(self._tail))
        if self._body:
            return usage_from_body(b"".join(self._body))
        return None
