"""The kinds of slot hal0 knows, the slots that always exist, and the /v1 endpoints each kind serves.

One owner for these facts: config validation, resolution, the catalog and the CLI all read them from here.
"""

from __future__ import annotations

#: Every slot type, in display order. `rpc` is a worker of llama.cpp's RPC backend: it serves no endpoint itself
#: but lends its devices to a llama-server slot (on this node or another) whose `rpc` setting names it.
SLOT_TYPES: tuple[str, ...] = ("chat", "embed", "rerank", "stt", "tts", "rpc")

#: The provider a slot of each type gets unless its config names another.
DEFAULT_PROVIDER: dict[str, str] = {"chat": "llama.cpp", "embed": "llama.cpp", "rerank": "llama.cpp",
                                    "stt": "moonshine", "tts": "kokoro", "rpc": "rpc"}

#: Slot types whose backend loads no model file: an rpc worker gets its tensors from the main llama-server.
MODEL_LESS_TYPES: frozenset[str] = frozenset({"rpc"})

#: Slot types that may bind a non-loopback host (the `host` setting): a worker must be reachable by the main
#: node. Everything else listens on 127.0.0.1 only, behind hal0's API.
NETWORK_TYPES: frozenset[str] = frozenset({"rpc"})

#: The slots that always exist, with their type (and display order).
BUILTIN_SLOTS: dict[str, str] = {"primary": "chat", "embed": "embed", "stt": "stt", "tts": "tts"}

#: The model names stock OpenAI client code asks for, answered by the built-in speech slots unless their config
#: sets `aliases` itself.
BUILTIN_ALIASES: dict[str, tuple[str, ...]] = {
    "stt": ("whisper-1", "gpt-4o-transcribe", "gpt-4o-mini-transcribe"),
    "tts": ("tts-1", "tts-1-hd", "gpt-4o-mini-tts"),
}

#: Which slot types may serve each /v1 endpoint.
ENDPOINT_TYPES: dict[str, frozenset[str]] = {
    "/v1/chat/completions": frozenset({"chat"}),
    "/v1/completions": frozenset({"chat"}),
    "/v1/responses": frozenset({"chat"}),
    "/v1/messages": frozenset({"chat"}),
    "/v1/messages/count_tokens": frozenset({"chat"}),
    "/v1/embeddings": frozenset({"embed"}),
    "/v1/rerank": frozenset({"rerank"}),
    "/v1/reranking": frozenset({"rerank"}),
    "/v1/audio/transcriptions": frozenset({"stt"}),
    "/v1/audio/translations": frozenset({"stt"}),
    "/v1/audio/speech": frozenset({"tts"}),
    "/v1/audio/voices": frozenset({"tts"}),
}

#: The endpoints whose 200 answer is a run of the loaded model (a decode, an embedding, a synthesis, a
#: transcription): a request on one that a cold load or an adoption held stands in for the readiness sentinel
#: (`hal0.slots.lease`). Counting tokens and listing voices run nothing.
INFERENCE_ENDPOINTS: frozenset[str] = frozenset(ENDPOINT_TYPES) - {"/v1/messages/count_tokens", "/v1/audio/voices"}
