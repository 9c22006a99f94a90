"""hal0's text-to-speech server: OpenAI's /v1/audio/speech and a /v1/audio/voices listing around Kokoro-82M
(ONNX, through kokoro-onnx). Run as `python -m hal0.backends.tts_server --host H --port N --model PATH`.

Speech is made sentence by sentence; wav and pcm bytes go out as each sentence is ready.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import field
from pathlib import Path
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from hal0.backends.audio import (
    MEDIA_TYPES,
    SPEECH_FORMATS,
    STREAMABLE,
    AudioError,
    Samples,
    check_speech_format,
    encode,
    pcm16,
    wav_stream_header,
)
from hal0.backends.layout import RUNTIME_EXTRAS, KokoroFiles, LayoutProblem, kokoro_files, missing_modules
from hal0.datatypes import datatype
from hal0.errors import openai_error_body
from hal0.server import Server, listen

SAMPLE_RATE = 24000
MAX_INPUT_CHARS = 4096
#: Kokoro's own limits (OpenAI allows 0.25-4.0; the model does not).
MIN_SPEED, MAX_SPEED = 0.5, 2.0
SENTENCE_GAP_S = 0.2
EXIT_LOAD_FAILED = 3

#: Kokoro voice names start with a letter naming their language (espeak-ng language codes).
VOICE_LANGUAGES = {"a": "en-us", "b": "en-gb", "e": "es", "f": "fr-fr", "h": "hi", "i": "it", "j": "ja",
                   "p": "pt-br", "z": "cmn"}
_LATIN = frozenset({"en-us", "en-gb", "es", "fr-fr", "it", "pt-br"})
_SENTENCE_END = re.compile(r"(?<=[.!?;:。！？])\s+|\n+")


#: OpenAI's voice names, each with the Kokoro voices that sound most like it (first one the model has wins)
#: and whether it is a female ("f") or male ("m") voice, the fallback for a voice pack without any of them.
OPENAI_VOICES: dict[str, tuple[str, tuple[str, ...]]] = {
    "alloy": ("f", ("af_alloy", "af_heart")), "ash": ("m", ("am_adam",)), "ballad": ("m", ("bm_fable",)),
    "coral": ("f", ("af_heart", "af_bella")), "echo": ("m", ("am_echo",)), "fable": ("m", ("bm_fable",)),
    "onyx": ("m", ("am_onyx",)), "nova": ("f", ("af_nova",)), "sage": ("f", ("af_sarah",)),
    "shimmer": ("f", ("af_bella", "af_sky")), "verse": ("m", ("am_michael",)), "marin": ("f", ("af_heart",)),
    "cedar": ("m", ("am_michael",)),
}


def voice_map(voices: Sequence[str], overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """OpenAI voice name -> one of this model's voices: the slot's overrides, else the closest Kokoro voice,
    else the model's first voice of the same gender, else its first voice."""
    out: dict[str, str] = {}
    for name, (gender, likely) in OPENAI_VOICES.items():
        same_gender = [v for v in voices if v[1:2] == gender]
        out[name] = next((v for v in likely if v in voices), same_gender[0] if same_gender else voices[0])
    out.update(overrides or {})
    return out


def voice_language(voice: str) -> str | None:
    return VOICE_LANGUAGES.get(voice[:1]) if len(voice) > 2 and voice[1:2] in ("f", "m", "_") else None


def pick_language(text: str, voice: str, explicit: str | None) -> str:
    """The phonemizer language: asked for, else the voice's, except that plain ASCII text read by a voice of
    a non-Latin language is read as English (a Japanese voice reading an English sentence)."""
    if explicit:
        return explicit
    lang = voice_language(voice)
    if lang in _LATIN:
        return lang
    if text.isascii() or lang is None:
        return "en-us"
    return lang


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


class KokoroEngine:
    def __init__(self, files: KokoroFiles) -> None:
        from kokoro_onnx import Kokoro

        self._kokoro = Kokoro(str(files.model), str(files.voices))
        # kokoro-onnx annotates its voice pack as an array; it is an NpzFile (a mapping of name to style).
        pack: Any = self._kokoro.voices
        self.voices: tuple[str, ...] = tuple(sorted(pack.keys()))

    def speak(self, text: str, voice: str, speed: float, lang: str) -> Samples:
        samples, _ = self._kokoro.create(text, voice=voice, speed=speed, lang=lang)
        return np.asarray(samples, dtype=np.float32)


def load_engine(model_path: Path) -> KokoroEngine:
    files = kokoro_files(model_path)
    if isinstance(files, LayoutProblem):
        raise RuntimeError(files.message)
    missing = missing_modules("kokoro")
    if missing:
        raise RuntimeError(f"the Kokoro runtime is not installed (missing {', '.join(missing)}); "
                           f"install it with `pip install '{RUNTIME_EXTRAS['kokoro']}'`")
    return KokoroEngine(files)


@datatype(frozen=True, slots=True)
class SpeechRequest:
    text: str
    voice: str
    fmt: str
    speed: float
    lang: str


class BadRequest(ValueError):
    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


def parse_request(body: Any, voices: Sequence[str], aliases: Mapping[str, str] | None = None) -> SpeechRequest:
    if not isinstance(body, dict):
        raise BadRequest("expected a JSON object", "invalid_json")
    text = body.get("input")
    if not isinstance(text, str) or not text.strip():
        raise BadRequest("`input` (the text to speak) is required", "missing_input")
    if len(text) > MAX_INPUT_CHARS:
        raise BadRequest(f"`input` is longer than {MAX_INPUT_CHARS} characters", "input_too_long")
    voice = body.get("voice") or voices[0]
    if isinstance(voice, str) and voice not in voices and aliases:
        voice = aliases.get(voice.lower(), voice)
    if not isinstance(voice, str) or voice not in voices:
        raise BadRequest(f"unknown voice {str(voice)[:40]!r}; this model has: {', '.join(voices)}", "unknown_voice")
    fmt = body.get("response_format") or "mp3"
    if not isinstance(fmt, str):
        raise BadRequest("response_format must be a string", "unsupported_response_format")
    try:
        check_speech_format(fmt)
    except AudioError as exc:
        raise BadRequest(str(exc), exc.code) from None
    if body.get("stream_format") not in (None, "audio"):
        raise BadRequest("only stream_format \"audio\" is supported", "unsupported_stream_format")
    speed = body.get("speed", 1.0)
    if isinstance(speed, bool) or not isinstance(speed, int | float) or not MIN_SPEED <= speed <= MAX_SPEED:
        raise BadRequest(f"speed must be a number from {MIN_SPEED} to {MAX_SPEED} for Kokoro", "invalid_speed")
    explicit = body.get("language")
    if explicit is not None and not (isinstance(explicit, str) and re.fullmatch(r"[a-z]{2,3}(-[a-z]{2,4})?",
                                                                                explicit)):
        raise BadRequest("language must be an espeak-ng language code such as en-us or ja", "invalid_language")
    return SpeechRequest(text, voice, fmt, float(speed), pick_language(text, voice, explicit))


def error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse(openai_error_body(status, code, message), status)


@datatype
class ServerState:
    model_path: Path
    alias: str
    #: The slot's own OpenAI voice name -> model voice choices (`--voice-map alloy=jf_alpha`).
    voice_overrides: dict[str, str] = field(default_factory=dict)
    engine: KokoroEngine | None = None
    load_error: str | None = None
    loaded_in_s: float | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def build_app(state: ServerState) -> Starlette:
    async def health(request: Request) -> Response:
        if state.load_error:
            return JSONResponse({"status": "error", "message": state.load_error}, 500)
        if state.engine is None:
            return JSONResponse({"status": "loading"}, 503)
        return JSONResponse({"status": "ok", "engine": "kokoro", "loaded_in_s": state.loaded_in_s})

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": state.alias, "object": "model", "owned_by": "hal0", "engine": "kokoro",
             "path": str(state.model_path)}]})

    async def voices(request: Request) -> Response:
        if state.engine is None:
            return error(503, "loading", "the text-to-speech model is still loading")
        data = [{"id": v, "object": "voice", "language": voice_language(v)} for v in state.engine.voices]
        return JSONResponse({"object": "list", "data": data, "voices": list(state.engine.voices),
                             "openai_voices": voice_map(state.engine.voices, state.voice_overrides)})

    async def speech(request: Request) -> Response:
        engine = state.engine
        if engine is None:
            return error(503, "loading", state.load_error or "the text-to-speech model is still loading")
        try:
            body = json.loads(await request.body())
            req = parse_request(body, engine.voices, voice_map(engine.voices, state.voice_overrides))
        except json.JSONDecodeError as exc:
            return error(400, "invalid_json", f"the body is not JSON: {exc}")
        except BadRequest as exc:
            return error(400, exc.code, str(exc))
        headers = {"x-hal0-voice": req.voice, "x-hal0-language": req.lang}
        if req.fmt in STREAMABLE:
            return StreamingResponse(_stream(state, engine, req), media_type=MEDIA_TYPES[req.fmt], headers=headers)
        pieces = [piece async for piece in _synthesize(state, engine, req)]
        try:
            data = await asyncio.to_thread(encode, np.concatenate(pieces), SAMPLE_RATE, req.fmt)
        except AudioError as exc:
            return error(500, exc.code, str(exc))
        return Response(data, media_type=MEDIA_TYPES[req.fmt], headers=headers)

    return Starlette(routes=[
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/audio/voices", voices, methods=["GET"]),
        Route("/v1/audio/speech", speech, methods=["POST"]),
    ])


async def _synthesize(state: ServerState, engine: KokoroEngine, req: SpeechRequest) -> AsyncIterator[Samples]:
    """One array per sentence, silence between them; the lock is taken per sentence so requests interleave."""
    gap = np.zeros(int(SENTENCE_GAP_S * SAMPLE_RATE), np.float32)
    for n, sentence in enumerate(sentences(req.text)):
        async with state.lock:
            samples = await asyncio.to_thread(engine.speak, sentence, req.voice, req.speed, req.lang)
        yield np.concatenate([gap, samples]) if n else samples


async def _stream(state: ServerState, engine: KokoroEngine, req: SpeechRequest) -> AsyncIterator[bytes]:
    if req.fmt == "wav":
        yield wav_stream_header(SAMPLE_RATE)
    async for samples in _synthesize(state, engine, req):
        yield pcm16(samples)


async def _load(state: ServerState, server: Server) -> None:
    started = time.monotonic()
    try:
        state.engine = await asyncio.to_thread(load_engine, state.model_path)
    except Exception as exc:  # any failure of a third-party runtime ends the process with its reason
        state.load_error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, RuntimeError) else str(exc)
        print(f"error: cannot load the text-to-speech model: {state.load_error}", file=sys.stderr, flush=True)
        server.exit()
        return
    state.loaded_in_s = round(time.monotonic() - started, 3)
    print(json.dumps({"event": "loaded", "engine": "kokoro", "voices": len(state.engine.voices),
                      "seconds": state.loaded_in_s}), flush=True)


async def _serve(args: argparse.Namespace) -> int:
    try:
        sock = listen(args.host, args.port)
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    overrides = dict(item.split("=", 1) for item in args.voice_map)
    state = ServerState(Path(args.model), args.alias or Path(args.model).parent.name, overrides)
    server = Server(build_app(state), lifespan=False)
    load = asyncio.create_task(_load(state, server), name="load-model")
    try:
        await server.serve_with_signals([sock])
    finally:
        load.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await load
    return EXIT_LOAD_FAILED if state.load_error else 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m hal0.backends.tts_server", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", required=True, help="the Kokoro .onnx file; its voice pack sits beside it")
    parser.add_argument("--alias", default="", help="the model id /v1/models reports (the slot name)")
    parser.add_argument("--voice-map", action="append", default=[], type=_voice_pair, metavar="OPENAI=VOICE",
                        help="answer OpenAI's voice name OPENAI with this model's VOICE (repeatable)")
    return parser.parse_args(argv)


def _voice_pair(text: str) -> str:
    name, sep, voice = text.partition("=")
    if not sep or not name or not voice:
        raise argparse.ArgumentTypeError(f"expected OPENAI=VOICE, got {text!r}")
    return f"{name.lower()}={voice}"


def main(argv: Sequence[str] | None = None) -> int:
    return asyncio.run(_serve(parse_args(argv)))


__all__ = ["SPEECH_FORMATS", "build_app", "main", "parse_request", "pick_language", "sentences"]

if __name__ == "__main__":
    sys.exit(main())
