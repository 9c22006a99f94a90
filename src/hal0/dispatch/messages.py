"""Anthropic's `/v1/messages` streams as its clients read them: every stream begins with `message_start`.

llama-server emits `message_start` with the partial result of the first generated token. When that token ends in
an incomplete UTF-8 sequence (a byte-fallback token: CJK text, emoji, or any byte of a small model), no partial
is sent for it and the stream begins with `content_block_start`; Anthropic's SDKs refuse such a stream
("unexpected event order"). The dispatcher puts the missing event in front, with the prompt's token count that
the backend's own `/v1/messages/count_tokens` gives for the same body.
"""

from __future__ import annotations

import json

#: How a stream that lost its `message_start` begins: with one of the events that follow it.
_LATER_EVENTS = (b"event: content_block_", b"event: message_delta", b"event: message_stop", b"event: ping")
#: Enough of a stream's head to tell its first event's name.
HEAD_BYTES = 32


def lacks_message_start(head: bytes) -> bool:
    """Whether a streamed answer that begins with `head` (at least HEAD_BYTES, or all of it) skipped
    `message_start`. An error event or anything unknown is left as it is."""
    return head.lstrip().startswith(_LATER_EVENTS)


def message_start(message_id: str, model: str, input_tokens: int) -> bytes:
    """The `message_start` event llama-server sends when it does not skip it, with `message_id` for its id."""
    data = {"type": "message_start", "message": {
        "id": message_id, "type": "message", "role": "assistant", "content": [], "model": model,
        "stop_reason": None, "stop_sequence": None,
        "usage": {"cache_read_input_tokens": 0, "input_tokens": input_tokens, "output_tokens": 0}}}
    return b"event: message_start\ndata: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


__all__ = ["HEAD_BYTES", "lacks_message_start", "message_start"]
