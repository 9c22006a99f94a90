"""A slot whose catalog model is not installed yet pulls it on load: offline -> pulling -> starting -> ready.

A loopback stand-in for Hugging Face (HF_ENDPOINT) serves a generated GGUF under the catalog's path.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Hal0

REF = "qwen2.5-0.5b-instruct-q4_k_m"


@pytest.fixture
def fake_hub(model_files: dict[str, Path]) -> Iterator[tuple[str, list[str]]]:
    data = model_files["tiny"].read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.path)
            if "/resolve/" not in self.path:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("X-Linked-ETag", f'"{digest}"')
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()
    server.server_close()


@pytest.mark.slow
def test_request_to_a_slot_with_an_unpulled_catalog_model_pulls_then_serves(
        hal0: Hal0, fake_hub: tuple[str, list[str]]) -> None:
    url, seen = fake_hub
    hal0.start(env={"HF_ENDPOINT": url})
    assert hal0.client.put("/api/slots/primary/model", json={"model": REF}).status_code == 200
    transitions: list[str] = []
    with httpx.Client(base_url=hal0.url, timeout=60) as sse, \
            sse.stream("GET", "/api/events", params={"topics": "slot,pull"}) as events:
        client = openai.OpenAI(base_url=f"{hal0.url}/v1", api_key="x", max_retries=0)
        reply = client.chat.completions.create(model=REF, messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=4)
        assert reply.choices[0].message is not None
        pulls = 0
        for line in events.iter_lines():
            if not line.startswith("data:"):
                continue
            event = json.loads(line[5:])
            if event["topic"] == "pull":
                pulls += 1
            elif "to" in event and event["to"] != event.get("from"):
                transitions.append(event["to"])
            if transitions[-1:] == ["ready"] or "serving" in transitions:
                break
    assert transitions[:4] == ["pulling", "starting", "warming", "ready"]
    assert pulls >= 2  # start ... done
    assert len([p for p in seen if "/resolve/" in p]) == 1
    manifest = hal0.models.get(REF)
    assert manifest.files[0].sha256 == hashlib.sha256(hal0.models.file_path(REF, manifest.files[0].name)
                                                      .read_bytes()).hexdigest()


def test_assigning_an_unknown_uninstalled_ref_is_refused(hal0: Hal0) -> None:
    hal0.start()
    resp = hal0.client.put("/api/slots/primary/model", json={"model": "no-such-model"})
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "model_not_found"
    assert hal0.slot("primary")["config"]["model"] is None
