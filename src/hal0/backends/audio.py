"""Audio in and out for the speech servers: decode uploads to mono float32, resample, encode responses.

libsndfile (through soundfile) reads and writes wav, flac, ogg/opus and mp3 in-process; PyAV, when installed,
decodes the container formats libsndfile does not know (m4a, webm, mp4). No shell call, no system binary.
"""

from __future__ import annotations

import io
import struct

import numpy as np
from numpy.typing import NDArray

from hal0.datatypes import datatype

Samples = NDArray[np.float32]

#: Response formats of /v1/audio/speech and how each is written (libsndfile format, subtype).
SPEECH_FORMATS: dict[str, tuple[str, str]] = {
    "mp3": ("MP3", "MPEG_LAYER_III"),
    "opus": ("OGG", "OPUS"),
    "flac": ("FLAC", "PCM_16"),
    "wav": ("WAV", "PCM_16"),
    "pcm": ("RAW", "PCM_16"),
}
MEDIA_TYPES = {"mp3": "audio/mpeg", "opus": "audio/ogg; codecs=opus", "flac": "audio/flac", "wav": "audio/wav",
               "pcm": "audio/pcm"}
#: Formats whose bytes can be sent as each piece of audio is produced (the others need the whole clip).
STREAMABLE = frozenset({"wav", "pcm"})


class AudioError(ValueError):
    """An upload that cannot be decoded, or a format that cannot be written."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


@datatype(frozen=True, slots=True)
class Decoded:
    samples: Samples
    sample_rate: int

    @property
    def duration(self) -> float:
        return len(self.samples) / self.sample_rate if self.sample_rate else 0.0


def decode(data: bytes) -> Decoded:
    """Any common audio file as mono float32 at its own sample rate."""
    if not data:
        raise AudioError("the uploaded audio file is empty", "empty_audio")
    import soundfile as sf

    try:
        frames, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        return Decoded(np.ascontiguousarray(frames.mean(axis=1), dtype=np.float32), int(rate))
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        first_error = str(exc)
    return _decode_with_av(data, first_error)


def _decode_with_av(data: bytes, first_error: str) -> Decoded:
    try:
        import av
    except ImportError:
        raise AudioError(
            f"cannot decode the audio ({first_error}); wav, flac, ogg and mp3 are read directly, other "
            "formats need PyAV (`pip install av`)", "unsupported_audio") from None
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            stream = container.streams.audio[0]
            rate = int(stream.rate or 16000)
            resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
            chunks = [
                out.to_ndarray().reshape(-1)
                for frame in container.decode(stream)
                for out in resampler.resample(frame)
            ]
            chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]
    except (av.error.FFmpegError, IndexError, ValueError) as exc:
        raise AudioError(f"cannot decode the audio: {exc}", "unsupported_audio") from None
    samples = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    return Decoded(samples, rate)


def resample(samples: Samples, src_rate: int, dst_rate: int) -> Samples:
    """Band-limited resampling in the frequency domain (what scipy.signal.resample does)."""
    if src_rate == dst_rate or len(samples) == 0:
        return samples
    n_out = max(1, round(len(samples) * dst_rate / src_rate))
    spectrum = np.fft.rfft(samples)
    keep = n_out // 2 + 1
    if keep <= len(spectrum):
        spectrum = spectrum[:keep]
    else:
        spectrum = np.concatenate([spectrum, np.zeros(keep - len(spectrum), spectrum.dtype)])
    out = np.fft.irfft(spectrum, n_out) * (n_out / len(samples))
    return out.astype(np.float32)


def check_speech_format(fmt: str) -> str:
    if fmt not in SPEECH_FORMATS:
        raise AudioError(f"response_format {fmt!r} is not supported; use one of {', '.join(SPEECH_FORMATS)}",
                         "unsupported_response_format")
    return fmt


def pcm16(samples: Samples) -> bytes:
    """Little-endian signed 16-bit mono: OpenAI's `pcm` format."""
    clipped = np.clip(samples, -1.0, 1.0)
    return (clipped * 32767.0).astype("<i2").tobytes()


def wav_stream_header(sample_rate: int) -> bytes:
    """A WAV header for a stream of unknown length (sizes set to the maximum, as streaming servers do)."""
    unknown = 0xFFFFFFFF
    return (b"RIFF" + struct.pack("<I", unknown) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16)
            + b"data" + struct.pack("<I", unknown))


def encode(samples: Samples, sample_rate: int, fmt: str) -> bytes:
    """The whole clip in one of SPEECH_FORMATS."""
    check_speech_format(fmt)
    if fmt == "pcm":
        return pcm16(samples)
    import soundfile as sf

    container, subtype = SPEECH_FORMATS[fmt]
    buf = io.BytesIO()
    try:
        sf.write(buf, np.clip(samples, -1.0, 1.0), sample_rate, format=container, subtype=subtype)
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        raise AudioError(f"cannot encode {fmt}: {exc}", "encode_failed") from exc
    return buf.getvalue()
