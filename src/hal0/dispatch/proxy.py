"""The /v1 edge as a plain ASGI app: resolve `model`, hold through a cold boot, proxy bytes through; a model
no local slot serves goes to a peer that does.

Responses stream chunk by chunk; a client that goes away closes the upstream connection; every request
leaves one decision record.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, MutableMapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qs

from hal0.client import HttpClient, HttpError, Response, Timeout
from hal0.dispatch.backend_errors import anthropic_path as _anthropic
from hal0.dispatch.backend_errors import backend_error_bytes, error_headers
from hal0.dispatch.coalesce import BufferedResponse, Coalescer
from hal0.dispatch.decisions import Decision, DecisionLog
from hal0.dispatch.messages import HEAD_BYTES, lacks_message_start, message_start
from hal0.dispatch.resolve import find_model, resolve, resolve_remote
from hal0.dispatch.usage import AnswerMeter, Usage, usage_from_body
from hal0.errors import (
    Hal0Error,
    InsufficientMemory,
    InvalidRequest,
    ModelNotFound,
    PeerUnreachable,
    UpstreamError,
    anthropic_error_body,
    openai_error_body,
)
from hal0.kinds import ENDPOINT_TYPES, INFERENCE_ENDPOINTS
from hal0.metrics import Metrics
from hal0.peers.forward import HOP_HEADER, PeerBackend
from hal0.server.connection import DISCONNECT
from hal0.settings import Settings
from hal0.slots.manager import SlotManager
from hal0.slots.slot import Slot
from hal0.slots.state import LOADED

if TYPE_CHECKING:  # the peers' views are imported only where peers are configured (`Peers`)
    from hal0.peers.follow import Peers
    from hal0.peers.view import RemoteSlot

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: Clients mark a request as a prefetch (safe to share with identical in-flight requests) with this header.
PREFETCH_HEADER = b"x-hal0-prefetch"
#: Endpoints whose identical in-flight requests are always shared: deterministic and side-effect free.
COALESCED_ENDPOINTS = frozenset({"/v1/embeddings", "/v1/rerank", "/v1/reranking"})
_HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te", b"trailer",
    b"trailers", b"transfer-encoding", b"upgrade", b"host", b"content-length", b"authorization",
    PREFETCH_HEADER, b"x-request-id", b"expect", b"x-api-key", HOP_HEADER.lower().encode(),
})
_RESPONSE_DROP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"transfer-encoding", b"upgrade", b"trailer",
    b"date", b"server", b"x-request-id", b"access-control-allow-origin",
})
log = logging.getLogger("hal0.dispatch")
#: What a client's x-request-id may be made of (1-128 of them): kept, else hal0 makes one. Checked without a
#: regular expression, whose compiling is ~0.2 ms of every API start.
_REQUEST_ID_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-"
_JSON = [(b"content-type", b"application/json")]
_JSON_HEADERS = {"Content-Type": "application/json"}
#: The backend's token count for a stream that skipped `message_start`: one prompt tokenized, no decode.
_COUNT_TIMEOUT = Timeout(total=5)
_FILE_ENDPOINTS = frozenset({"/v1/audio/transcriptions", "/v1/audio/translations"})


def error_bytes(status: int, code: str, message: str, detail: dict[str, Any] | None = None,
                anthropic: bool = False) -> bytes:
    body = (anthropic_error_body if anthropic else openai_error_body)(status, code, message, detail)
    return json.dumps(body).encode()


#: How an OpenAI-style event stream ends: nothing follows, so the end is not held back.
SSE_DONE = b"data: [DONE]\n\n"
_HOP = HOP_HEADER.lower().encode()


class Upstream(Protocol):
    """What the relay needs of where an answer comes from: a local slot's lease or a peer."""

    @property
    def label(self) -> str: ...

    def failed(self) -> None: ...


class Dispatcher:
    def __init__(self, settings: Settings, manager: SlotManager, client: HttpClient,
                 decisions: DecisionLog, metrics: Metrics | None = None, peers: Peers | None = None) -> None:
        self.settings = settings
        self.manager = manager
        self.peers = peers
        self.client = client
        self.decisions = decisions
        self.metrics = metrics or Metrics()
        self.coalescer = Coalescer()
        # sock_read bounds each wait for the next byte, not the whole answer: a long stream is fine, a hung
        # (e.g. SIGSTOPped) backend is not.
        self._timeout = Timeout(connect=10, read=settings.request_timeout_s)
        self._stream_batch_s = settings.stream_batch_ms / 1000

    async def close(self) -> None:
        await self.coalescer.close()

    # -- entry ------------------------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        headers = scope["headers"]
        request_id = b""
        prefetch = False
        for key, value in headers:
            if key == b"x-request-id" and 0 < len(value) <= 128 and not value.translate(None, _REQUEST_ID_CHARS):
                request_id = value
            elif key == PREFETCH_HEADER and value.strip().lower() in (b"1", b"true", b"yes"):
                prefetch = True
        rid = request_id or os.urandom(16).hex().encode()
        if path == "/v1/models" and method in ("GET", "HEAD"):
            await self._send_json(send, 200, self.models_listing(), rid)
            return
        if path.startswith("/v1/models/") and method in ("GET", "HEAD"):
            wanted = path[len("/v1/models/"):]
            try:
                entry = _model_entry(find_model(self.manager.slots.values(), wanted))
            except ModelNotFound as exc:
                remote = next((s for s in self._remote_listed() if wanted in (s.model, s.name, *s.aliases)), None)
                if remote is None:
                    await self._send_error(send, exc.status, exc.code, exc.message, rid, exc.detail or None)
                    return
                entry = _remote_entry(remote)
            except Hal0Error as exc:
                await self._send_error(send, exc.status, exc.code, exc.message, rid, exc.detail or None)
                return
            await self._send_json(send, 200, entry, rid)
            return
        if path not in ENDPOINT_TYPES:
            await self._send_error(send, 404, "unknown_endpoint", f"no endpoint {method} {path[:200]}", rid)
            return
        if method != "POST" and not (path == "/v1/audio/voices" and method == "GET"):
            await self._send_error(send, 405, "method_not_allowed", f"{path} takes POST, not {method}", rid)
            return
        decision = Decision(request_id=rid.decode(), endpoint=path, model=None)
        started = time.perf_counter()
        try:
            await self._dispatch(scope, receive, send, decision, rid, prefetch)
        except Hal0Error as exc:
            decision.status = exc.status
            decision.outcome = f"rejected:{exc.code}"
            decision.error = {"code": exc.code, "message": exc.message}
            if not decision.candidates and isinstance(exc.detail.get("candidates"), list):
                decision.candidates = exc.detail["candidates"]
            await self._send_error(send, exc.status, exc.code, exc.message, rid, exc.detail or None,
                                   _anthropic(path))
        finally:
            decision.duration_ms = round((time.perf_counter() - started) * 1000, 3)
            self.decisions.record(decision)

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send, decision: Decision, rid: bytes,
                        prefetch: bool) -> None:
        path: str = scope["path"]
        body = await self._read_body(scope, receive)
        content_type = _header(scope, b"content-type")
        payload: dict[str, Any] | None = None
        if scope["method"] == "GET":
            model = _query_model(scope)
        elif content_type.startswith(b"multipart/form-data"):
            model = await _form_model(scope, body)
        else:
            model, payload = _json_model(body)
        decision.model = model
        try:
            res = resolve(self.manager.slots.values(), model, path)
        except ModelNotFound as exc:
            await self._forward(scope, receive, send, body, model, decision, rid, exc)
            return
        slot = res.slot
        decision.candidates = [c.to_dict() for c in res.candidates]
        decision.slot = slot.name
        decision.reason = res.reason
        coalesced = prefetch or path in COALESCED_ENDPOINTS
        cold = not slot.settled
        if cold:
            decision.reason += ",cold-load" if slot.state not in LOADED else ",adopting"
        upstream_headers = _forward_headers(scope, rid)
        stream = payload is not None and payload.get("stream") is True
        if stream:
            # llama-server closes the connection after an event stream without a `Connection: close`, and the
            # pool would hand the dead connection to the next request the moment the stream's last byte arrives.
            upstream_headers.append((b"connection", b"close"))
        query = scope.get("query_string", b"")
        target = path + (f"?{query.decode('latin-1')}" if query else "")
        grace = self.settings.cold_boot_grace_s
        if coalesced:
            if cold:
                started = time.perf_counter()
                try:
                    with self.metrics.hold(slot.name):
                        await slot.ensure_loaded(grace)
                except InsufficientMemory as exc:
                    await self._forward(scope, receive, send, body, model, decision, rid, exc)
                    return
                decision.wait_ms = round((time.perf_counter() - started) * 1000, 3)
            # The key is the request's meaning, not its bytes: key order and spacing do not matter.
            canonical = body if payload is None else json.dumps(payload, sort_keys=True,
                                                                separators=(",", ":")).encode()
            key = (slot.name, path, query, canonical)
            buffered, joined = await self.coalescer.run(
                key, lambda: self._fetch(slot, scope["method"], target, body, upstream_headers))
            if joined:
                decision.reason += ",coalesced"
            else:  # the backend did the work once, for the first of the requests that share it
                _count_tokens(decision, usage_from_body(buffered.body))
            decision.status = buffered.status
            decision.outcome = "ok" if buffered.status < 400 else "upstream_error"
            out, out_headers = buffered.body, list(buffered.headers)
            if buffered.status >= 400:
                out = backend_error_bytes(buffered.status, out, _anthropic(path))
                out_headers = error_headers(out_headers, out)
            await send({"type": "http.response.start", "status": buffered.status,
                        "headers": [*out_headers, (b"x-request-id", rid)]})
            await send({"type": "http.response.body", "body": out})
            return
        try:
            await self._proxy(slot, scope, receive, send, target, body, upstream_headers, decision, rid,
                              path in INFERENCE_ENDPOINTS)
        except InsufficientMemory as exc:
            await self._forward(scope, receive, send, body, model, decision, rid, exc)

    async def _forward(self, scope: Scope, receive: Receive, send: Send, body: bytes, model: str,
                       decision: Decision, rid: bytes, why: Hal0Error) -> None:
        """No local slot can take the request (`why`: none serves the model, or, once memory admission refuses
        a load with `insufficient_memory`, none can fit it): send it to a peer that serves the model, the best
        one first (see `resolve_remote`), the next one when a peer refuses the connection. A request that was
        forwarded to this node is never forwarded again: `why` is its answer."""
        path: str = scope["path"]
        if self.peers is None or _header(scope, _HOP):
            raise why
        picks = resolve_remote(self.peers.remote_slots(), model, path, self.peers.avoided())
        decision.candidates += [c.to_dict() for c in picks]
        if not picks:
            raise why
        query = scope.get("query_string", b"")
        target = path + (f"?{query.decode('latin-1')}" if query else "")
        headers = _forward_headers(scope, rid)
        refused: list[dict[str, str]] = []
        async with _ClientCanCancel(scope, receive, decision):
            for pick in picks:
                view = self.peers.views[pick.slot.node]
                backend = PeerBackend(self.client, view.config, pick.slot, self._timeout)
                decision.peer = pick.slot.node
                decision.slot = pick.slot.name
                decision.reason = f"forwarded: no local slot ({why.code}); {pick.why}" + (
                    f"; after {', '.join(r['peer'] for r in refused)} did not take the connection" if refused else "")
                try:
                    resp = await backend.open(scope["method"], target, body, headers)
                except PeerUnreachable as exc:
                    refused.append({"peer": pick.slot.node, "error": exc.message})
                    view.note_unreachable()
                    continue
                view.note_reachable()
                await self._relay(backend, resp, send, decision, rid)
                return
            decision.peer = decision.slot = None
            raise PeerUnreachable(
                f"model {model[:200]!r} is served by peer(s) {', '.join(sorted({p.slot.node for p in picks}))}, "
                "and none of them took the connection", detail={"refused": refused})

    # -- upstream ---------------------------------------------------------------------------------------
    async def _fetch(self, slot: Slot, method: str, target: str, body: bytes,
                     headers: list[tuple[bytes, bytes]]) -> BufferedResponse:
        async with slot.lease(self._timeout, grace_s=self.settings.cold_boot_grace_s) as backend:
            resp = await backend.open(method, target, body, headers)
            try:
                data = await resp.read()
            except HttpError as exc:
                backend.failed()
                raise UpstreamError(f"backend of slot {slot.name} failed mid-response: {exc}",
                                    code="backend_failed") from exc
            finally:
                resp.release()
            return BufferedResponse(resp.status, tuple(_response_headers(resp)), data)

    async def _proxy(self, slot: Slot, scope: Scope, receive: Receive, send: Send, target: str, body: bytes,
                     headers: list[tuple[bytes, bytes]], decision: Decision, rid: bytes, stand_in: bool) -> None:
        """Lease the slot's backend (a cold one is loaded, and the request may ride its readiness probe, one that
        runs the model (`stand_in`) in the sentinel's place: see `Lease`), send the request and relay the answer.
        From the moment the body is read, a client that goes away cancels everything: the wait for a cold load,
        the wait for a backend that has not answered yet (a non-streamed generation sends nothing until it is
        done), and the relay."""
        held = None if slot.settled else self.metrics.hold(slot.name)
        try:
            async with (_ClientCanCancel(scope, receive, decision),
                        slot.lease(self._timeout, grace_s=self.settings.cold_boot_grace_s, early=True,
                                   stand_in=stand_in) as backend):
                resp = await backend.open(scope["method"], target, body, headers)
                if held is not None:
                    held.release()
                if backend.cold is not None:
                    decision.wait_ms = backend.cold.waited_ms()
                if backend.sent_early:
                    decision.reason += ",sent-early"
                prelude = None
                if decision.endpoint == "/v1/messages" and resp.status == 200:
                    async def prelude() -> bytes:
                        return await self._message_start(backend.base_url, body, decision.model or slot.name, rid)
                await self._relay(backend, resp, send, decision, rid, prelude)
        finally:
            if held is not None:
                held.release()

    async def _message_start(self, base_url: str, body: bytes, model: str, rid: bytes) -> bytes:
        """The `message_start` a backend's stream skipped (see `hal0.dispatch.messages`), its prompt counted by
        the backend; 0 tokens, logged, where the count fails."""
        tokens = 0
        try:
            async with self.client.post(f"{base_url}/v1/messages/count_tokens", body=body, headers=_JSON_HEADERS,
                                        timeout=_COUNT_TIMEOUT) as resp:
                if resp.status == 200:
                    tokens = int((await resp.json())["input_tokens"])
        except (HttpError, OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("counting the prompt of a stream without message_start failed: %s", exc)
        return message_start(f"msg_{rid.decode()}", model, tokens)

    async def _relay(self, backend: Upstream, resp: Response, send: Send, decision: Decision,
                     rid: bytes, prelude: Callable[[], Awaitable[bytes]] | None = None) -> None:
        """Forward an upstream answer to the client. Closing (not releasing) the connection of an answer that
        did not end well is what tells the backend to stop generating. `prelude` gives what an Anthropic
        stream that skipped its `message_start` is sent first."""
        decision.status = resp.status
        content_type = resp.header(b"content-type") or ""
        is_sse = content_type.startswith("text/event-stream")
        meter = AnswerMeter(content_type)
        out_headers = _response_headers(resp)
        if is_sse:
            out_headers = [(k, v) for k, v in out_headers if k != b"content-length"]
        out_headers.append((b"x-request-id", rid))
        failure: BaseException | None = None
        # Only event streams are batched, and only while tokens come faster than the window: an event that
        # follows a pause (the first token after the prompt, every token of a slow model) leaves at once.
        batch = self._stream_batch_s if is_sse else 0.0

        async def relay_error() -> None:
            try:
                data = await resp.read()  # an error answer: one small JSON body
            except HttpError as exc:
                backend.failed()
                raise UpstreamError(f"{backend.label} failed mid-response: {exc}",
                                    code="backend_failed") from exc
            body = backend_error_bytes(resp.status, data, _anthropic(decision.endpoint))
            await send({"type": "http.response.start", "status": resp.status,
                        "headers": error_headers(out_headers, body)})
            await send({"type": "http.response.body", "body": body, "more_body": False})

        async def pump() -> BaseException | None:
            await send({"type": "http.response.start", "status": resp.status, "headers": out_headers})
            failure: BaseException | None = None
            try:
                loop = asyncio.get_running_loop()
                chunks = 0
                waited_from = loop.time()
                async for chunk in resp.chunks():
                    flowing = chunks > 0 and loop.time() - waited_from < batch
                    if chunks == 0 and prelude is not None and is_sse:
                        while len(chunk) < HEAD_BYTES and not resp.at_eof():
                            chunk += await resp.read_some()
                        if lacks_message_start(chunk):
                            chunk = await prelude() + chunk
                    chunks += 1
                    meter.feed(chunk)
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    if flowing and not chunk.endswith(SSE_DONE) and not resp.ended:
                        await resp.gather(batch)
                    waited_from = loop.time()
            except HttpError as exc:
                failure = exc
                backend.failed()
            tail = b""
            if failure is not None and is_sse:
                tail = b"data: " + error_bytes(
                    502, "backend_failed", f"{backend.label} failed mid-stream: "
                    f"{type(failure).__name__}: {failure}") + b"\n\n"
            await send({"type": "http.response.body", "body": tail, "more_body": False})
            return failure

        try:
            if resp.status >= 400 and not is_sse:
                await relay_error()
            else:
                failure = await pump()
            decision.outcome = "backend_failed" if failure is not None else (
                "ok" if resp.status < 400 else "upstream_error")
            # Read after the client has the whole answer, so it never waits for this.
            if is_sse and meter.first_at is not None:
                decision.ttft_ms = round((meter.first_at - decision.time) * 1000, 3)
            _count_tokens(decision, meter.usage())
        finally:
            if decision.outcome == "ok":
                resp.release()
            else:
                resp.close()

    # -- helpers ---------------------------------------------------------------------------------------
    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        limit = self.settings.max_body_bytes
        declared = _header(scope, b"content-length")
        if declared.isdigit() and int(declared) > limit:
            raise InvalidRequest(f"request body of {int(declared)} bytes exceeds the limit of {limit}",
                                 code="body_too_large", status=413)
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                async with asyncio.timeout(self.settings.request_timeout_s):
                    message = await receive()
            except TimeoutError:
                raise InvalidRequest(f"client sent no body bytes for {self.settings.request_timeout_s:g}s",
                                     code="body_timeout", status=408) from None
            if message["type"] == "http.disconnect":
                raise InvalidRequest("client went away while sending the body", code="client_disconnected")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise InvalidRequest(f"request body exceeds the limit of {limit} bytes", code="body_too_large",
                                     status=413)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def models_listing(self) -> dict[str, Any]:
        local = [_model_entry(s) for s in self.manager.ordered() if s.config.model]
        return {"object": "list", "data": local + [_remote_entry(s) for s in self._remote_listed()]}

    def _remote_listed(self) -> list[RemoteSlot]:
        """The peers' models this node offers: one entry per model and peer, none that a local slot serves
        (a request for it stays here)."""
        if self.peers is None:
            return []
        local = {s.config.model for s in self.manager.slots.values() if s.config.model}
        seen: set[tuple[str, str]] = set()
        out: list[RemoteSlot] = []
        for remote in self.peers.remote_slots():
            if remote.model is None or remote.model in local or (remote.node, remote.model) in seen:
                continue
            seen.add((remote.node, remote.model))
            out.append(remote)
        return out

    async def _send_json(self, send: Send, status: int, data: Any, rid: bytes) -> None:
        body = json.dumps(data).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [*_JSON, (b"x-request-id", rid)]})
        await send({"type": "http.response.body", "body": body})

    async def _send_error(self, send: Send, status: int, code: str, message: str, rid: bytes,
                          detail: dict[str, Any] | None = None, anthropic: bool = False) -> None:
        with contextlib.suppress(Exception):  # the client may be gone already
            await send({"type": "http.response.start", "status": status,
                        "headers": [*_JSON, (b"x-request-id", rid)]})
            await send({"type": "http.response.body",
                        "body": error_bytes(status, code, message, detail, anthropic)})


def _count_tokens(decision: Decision, usage: Usage | None) -> None:
    if usage is not None:
        decision.prompt_tokens, decision.completion_tokens = usage.prompt_tokens, usage.completion_tokens


def _model_entry(slot: Slot) -> dict[str, Any]:
    """One model in OpenAI's shape (`id`, `object`, `created`, `owned_by`), with its slot and live state."""
    return {"id": slot.config.model, "object": "model", "created": int(slot.record.since), "owned_by": "hal0",
            "slot": slot.name, "type": slot.config.type, "state": slot.state.value,
            "aliases": [slot.name, *slot.config.aliases]}


def _remote_entry(remote: RemoteSlot) -> dict[str, Any]:
    """A peer's model in the listing: `owned_by` and `node` name the peer that serves it."""
    return {"id": remote.model, "object": "model", "created": 0, "owned_by": remote.node, "node": remote.node,
            "slot": remote.name, "type": remote.type, "state": remote.state,
            "aliases": [remote.name, *remote.aliases]}


def _header(scope: Scope, name: bytes) -> bytes:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return b""


def _forward_headers(scope: Scope, rid: bytes) -> list[tuple[bytes, bytes]]:
    out = [(key, value) for key, value in scope["headers"] if key not in _HOP_BY_HOP]
    out.append((b"x-request-id", rid))
    return out


def _response_headers(resp: Response) -> list[tuple[bytes, bytes]]:
    return [(k, v) for k, v in resp.headers if k not in _RESPONSE_DROP]


class _ClientCanCancel:
    """From here on a client that goes away cancels what the block waits for (a cold load, a backend or peer that
    has not answered yet, the relay): the cancellation ends the block quietly as `client_disconnected`. hal0's
    server says when the client goes (its `DISCONNECT` extension); under another server a task waits on `receive`
    for `http.disconnect`."""

    def __init__(self, scope: Scope, receive: Receive, decision: Decision) -> None:
        self._receive = receive
        self._decision = decision
        self._extension: dict[str, Callable[[Callable[[], None]], None]] | None = scope.get(
            "extensions", {}).get(DISCONNECT)
        self._handler: asyncio.Task[Any] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._gone = False

    async def __aenter__(self) -> None:
        self._handler = asyncio.current_task()
        if self._extension is not None:
            self._extension["watch"](self._went)
        else:
            self._watcher = asyncio.ensure_future(self._wait_for_disconnect())

    def _went(self) -> None:
        self._gone = True
        assert self._handler is not None
        self._handler.cancel()

    async def _wait_for_disconnect(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self._went()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> bool:
        swallow = exc_type is asyncio.CancelledError and self._gone
        if swallow:
            assert self._handler is not None
            self._handler.uncancel()
            self._decision.outcome = "client_disconnected"
        if self._extension is not None:
            self._extension["unwatch"](self._went)
        elif self._watcher is not None and not self._watcher.done():
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        return swallow


def _query_model(scope: Scope) -> str:
    """`model` of a GET request (e.g. /v1/audio/voices?model=tts), from its query string."""
    query: bytes = scope.get("query_string", b"")
    values = parse_qs(query.decode("latin-1")).get("model")
    if not values or not values[0]:
        raise InvalidRequest("the `model` query parameter is required (a slot name, model ref or alias)",
                             code="missing_model")
    return values[0]


def _json_model(body: bytes) -> tuple[str, dict[str, Any]]:
    """The request's `model` and its parsed body."""
    if not body.strip():
        raise InvalidRequest("request body is empty; expected a JSON object with a `model` field",
                             code="missing_model")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        raise InvalidRequest("request body nests JSON too deeply", code="invalid_json") from None
    if not isinstance(data, dict):
        raise InvalidRequest("request body must be a JSON object", code="invalid_json")
    model = data.get("model")
    if model is None or model == "":
        raise InvalidRequest("the `model` field is required (a slot name, model ref or alias)",
                             code="missing_model")
    if not isinstance(model, str):
        raise InvalidRequest("the `model` field must be a string", code="invalid_model")
    return model, data


async def _form_model(scope: Scope, body: bytes) -> str:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    # Starlette's form parser (python-multipart), imported by the first form request: most edges never see one.
    from starlette.requests import Request

    try:
        form = await Request(scope, replay).form()
    except Exception as exc:
        raise InvalidRequest(f"malformed multipart body: {exc}", code="invalid_multipart") from None
    try:
        model = form.get("model")
        if not isinstance(model, str) or not model:
            raise InvalidRequest("the `model` form field is required (a slot name, model ref or alias)",
                                 code="missing_model")
        if scope["path"] in _FILE_ENDPOINTS and (form.get("file") is None or isinstance(form.get("file"), str)):
            raise InvalidRequest(f"{scope['path']} needs the audio as a `file` form part", code="missing_file")
        return model
    finally:
        await form.close()
