"""Bad input at both edges: every one answered with an OpenAI-shaped error (4xx, never 5xx, never a traceback),
with no state change of any slot, and the API still up afterwards. The table in docs/reliability.md lists them.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Hal0, wait_until

LIMIT = 64 * 1024
PROMPT = [{"role": "user", "content": "hi"}]


@pytest.fixture
def loaded(hal0: Hal0, model_files: dict[str, Path]) -> Iterator[Hal0]:
    """A real API with `primary` ready on the tiny model, a 64 KiB body limit and a 2 s request timeout."""
    hal0.add_model("tiny", model_files["tiny"])
    hal0.start(env={"HAL0_MAX_BODY_BYTES": str(LIMIT), "HAL0_REQUEST_TIMEOUT_S": "2"})
    assert hal0.client.put("/api/slots/primary/model", json={"model": "tiny"}).status_code == 200
    assert hal0.client.post("/api/slots/primary/load").json()["state"] == "ready"
    yield hal0


def fingerprint(h: Hal0) -> list[tuple[str, str, int, Any]]:
    """What must not change: every slot's name, state, seq and model, from the API and from state.json."""
    slots = h.client.get("/api/slots").json()["data"]
    for s in slots:
        assert h.state(s["name"])["seq"] == s["seq"]
    return [(s["name"], s["state"], s["seq"], s["model"]) for s in slots]


def assert_error(resp: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, f"{resp.status_code} {resp.text[:500]}"
    assert resp.headers["content-type"].startswith("application/json")
    assert "Traceback" not in resp.text and 'File "' not in resp.text
    err: dict[str, Any] = resp.json()["error"]
    assert isinstance(err["message"], str) and err["message"] and len(err["message"]) < 2000
    assert err["type"] in ("invalid_request_error", "not_found_error", "authentication_error")
    if code is not None:
        assert err["code"] == code, err
    return err


HUGE = "x" * 60_000
# (description, method, path, httpx keyword arguments, status, code)
V1_CASES: list[tuple[str, str, str, dict[str, Any], int, str]] = [
    ("invalid JSON", "POST", "/v1/chat/completions",
     {"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "invalid_json"),
    ("JSON that is not an object", "POST", "/v1/chat/completions", {"json": ["primary"]}, 400, "invalid_json"),
    ("body that is not UTF-8", "POST", "/v1/chat/completions", {"content": b"\xff\xfe{\x00"}, 400, "invalid_json"),
    ("JSON nested 20k deep", "POST", "/v1/chat/completions",
     {"content": b'{"model": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"}, 400, "invalid_json"),
    ("empty body", "POST", "/v1/chat/completions", {"content": b""}, 400, "missing_model"),
    ("model missing", "POST", "/v1/chat/completions", {"json": {"messages": PROMPT}}, 400, "missing_model"),
    ("model of the wrong type", "POST", "/v1/chat/completions", {"json": {"model": ["primary"]}}, 400,
     "invalid_model"),
    ("unknown model", "POST", "/v1/chat/completions", {"json": {"model": "gpt-9", "messages": PROMPT}}, 404,
     "model_not_found"),
    ("model ref with path traversal", "POST", "/v1/chat/completions",
     {"json": {"model": "../../../etc/passwd", "messages": PROMPT}}, 404, "model_not_found"),
    ("model with control characters", "POST", "/v1/chat/completions",
     {"json": {"model": "prim\x00ary\r\nX-Evil: 1", "messages": PROMPT}}, 404, "model_not_found"),
    ("model of 60k characters", "POST", "/v1/chat/completions", {"json": {"model": HUGE}}, 404,
     "model_not_found"),
    ("body over HAL0_MAX_BODY_BYTES (declared)", "POST", "/v1/chat/completions",
     {"json": {"model": "primary", "messages": [{"role": "user", "content": "x" * LIMIT}]}}, 413,
     "body_too_large"),
    ("body over HAL0_MAX_BODY_BYTES (chunked)", "POST", "/v1/embeddings",
     {"content": iter([b'{"model":"primary","input":"', *[b"y" * 8192] * 10, b'"}'])}, 413, "body_too_large"),
    ("wrong endpoint for the slot's type", "POST", "/v1/embeddings", {"json": {"model": "primary", "input": "x"}},
     400, "wrong_slot_type"),
    ("multipart without a file", "POST", "/v1/audio/transcriptions", {"data": {"model": "primary"},
                                                                       "files": {"x": ("x", b"")}}, 400,
     "missing_file"),
    ("multipart with a broken boundary", "POST", "/v1/audio/transcriptions",
     {"content": b"--nope\r\nContent-Disposition: form-data; name=model\r\n\r\nstt",
      "headers": {"content-type": "multipart/form-data; boundary=zzz"}}, 400, "invalid_multipart"),
    ("endpoint with path traversal", "POST", "/v1/..%2f..%2fapi/slots", {"json": {"model": "primary"}}, 404,
     "unknown_endpoint"),
    ("wrong method", "GET", "/v1/chat/completions", {}, 405, "method_not_allowed"),
]

API_CASES: list[tuple[str, str, str, dict[str, Any], int, str | None]] = [
    ("invalid JSON", "POST", "/api/slots", {"content": b"{", "headers": {"content-type": "application/json"}},
     400, "invalid_request"),
    ("slot name with path traversal", "POST", "/api/slots", {"json": {"name": "../../etc"}}, 400,
     "invalid_slot_name"),
    ("slot name with control characters", "POST", "/api/slots", {"json": {"name": "a\x00b\n"}}, 400,
     "invalid_slot_name"),
    ("slot name of 10k characters", "POST", "/api/slots", {"json": {"name": "a" * 10_000}}, 400,
     "invalid_request"),
    ("port of the wrong type", "POST", "/api/slots", {"json": {"name": "u1", "port": "eighty"}}, 400,
     "invalid_request"),
    ("port out of range", "POST", "/api/slots", {"json": {"name": "u1", "port": 22}}, 400, "invalid_port"),
    ("backend argument with a newline", "POST", "/api/slots", {"json": {"name": "u1", "args": ["--x\n--y"]}},
     400, "invalid_arg"),
    ("env key that is not a variable name", "POST", "/api/slots",
     {"json": {"name": "u1", "env": {"A=B; rm -rf /": "1"}}}, 400, "invalid_env"),
    ("unknown slot field", "POST", "/api/slots", {"json": {"name": "u1", "shell": "sh"}}, 400, "invalid_request"),
    ("unknown slot type", "POST", "/api/slots", {"json": {"name": "u1", "type": "video"}}, 400,
     "invalid_slot_type"),
    ("model ref with path traversal", "PUT", "/api/slots/primary/model", {"json": {"model": "../../etc/passwd"}},
     400, "invalid_ref"),
    ("model ref with control characters", "PUT", "/api/slots/primary/model", {"json": {"model": "a\x00b"}}, 400,
     "invalid_ref"),
    ("model ref of the wrong type", "PUT", "/api/slots/primary/model", {"json": {"model": 5}}, 400,
     "invalid_request"),
    ("unknown model ref", "PUT", "/api/slots/primary/model", {"json": {"model": "no-such-model"}}, 404,
     "model_not_found"),
    ("slot path with traversal", "GET", "/api/slots/..%2F..%2Fetc%2Fpasswd", {}, 404, "not_found"),
    ("slot path of 10k characters", "POST", "/api/slots/" + "s" * 10_000 + "/load", {}, 404, "slot_not_found"),
    ("slot path with control characters", "POST", "/api/slots/a%00%0d%0ab/unload", {}, 404, "slot_not_found"),
    ("log lines out of range", "GET", "/api/slots/primary/logs?lines=-5", {}, 400, "invalid_request"),
    ("pull with a hostile ref", "POST", "/api/models/pull", {"json": {"ref": "../x", "source": "/etc/passwd"}},
     400, "invalid_ref"),
    ("body over HAL0_MAX_BODY_BYTES", "POST", "/api/slots", {"json": {"name": "u1", "aliases": ["a"] * LIMIT}},
     413, "body_too_large"),
    ("delete a built-in slot", "DELETE", "/api/slots/primary", {}, 409, "builtin_slot"),
]


def test_bad_v1_requests_get_openai_errors_and_change_nothing(loaded: Hal0) -> None:
    before = fingerprint(loaded)
    for what, method, path, kwargs, status, code in V1_CASES:
        resp = loaded.client.request(method, path, **kwargs)
        err = assert_error(resp, status)
        assert err["code"] == code, (what, err)
        assert HUGE not in resp.text, what
    assert fingerprint(loaded) == before
    assert "Traceback" not in loaded.log.read_text()
    ok = loaded.client.post("/v1/chat/completions", json={"model": "primary", "messages": PROMPT, "max_tokens": 2})
    assert ok.status_code == 200, ok.text


def test_bad_management_requests_get_errors_and_change_nothing(loaded: Hal0) -> None:
    before = fingerprint(loaded)
    config_files = sorted(p.name for p in (loaded.home / "config" / "slots").glob("*"))
    for what, method, path, kwargs, status, code in API_CASES:
        resp = loaded.client.request(method, path, **kwargs)
        if status == 409:
            assert resp.status_code == 409 and resp.json()["error"]["code"] == code, (what, resp.text)
            continue
        err = assert_error(resp, status)
        assert code is None or err["code"] == code, (what, err)
    assert fingerprint(loaded) == before
    assert sorted(p.name for p in (loaded.home / "config" / "slots").glob("*")) == config_files
    assert not list(loaded.home.rglob("passwd"))
    assert "Traceback" not in loaded.log.read_text()


def raw_request(h: Hal0, head: bytes, body: bytes = b"", timeout: float = 10) -> bytes:
    """Send bytes as they are (no client-side validation) and read the whole answer."""
    with socket.create_connection(("127.0.0.1", h.port), timeout=timeout) as sock:
        sock.sendall(head + body)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
        return out


def test_header_injection_is_refused_or_neutralised(loaded: Hal0) -> None:
    before = fingerprint(loaded)
    body = json.dumps({"model": "gpt-9"}).encode()
    # A request id that tries to smuggle a response header is replaced, never echoed.
    answer = raw_request(loaded, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                         b"X-Request-Id: ok%0d%0aSet-Cookie:%20evil=1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n", body)
    head = answer.split(b"\r\n\r\n", 1)[0].lower()
    assert head.startswith(b"http/1.1 404") and b"set-cookie" not in head and b"evil" not in head
    # Bare CR / obs-fold / NUL inside header values: the HTTP parser refuses the request outright.
    for bad in (b"X-Request-Id: a\rSet-Cookie: evil=1\r\n", b"X-Request-Id: a\r\n Set-Cookie: evil=1\r\n",
                b"X-Api-Key: a\x00b\r\n"):
        answer = raw_request(loaded, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + bad + b"\r\n")
        head = answer.split(b"\r\n\r\n", 1)[0].lower()
        assert head.startswith(b"http/1.1 400") or b"set-cookie" not in head, answer[:300]
        assert b"set-cookie: evil" not in head
    assert fingerprint(loaded) == before
    assert loaded.client.get("/api/health").status_code == 200


def test_a_client_that_sends_its_body_slowly_and_stops_is_timed_out_and_harms_nothing(loaded: Hal0) -> None:
    before = [(name, state, model) for name, state, _, model in fingerprint(loaded)]
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"X-Request-Id: slow-stalled\r\nContent-Length: 5000\r\n\r\n")
    with socket.create_connection(("127.0.0.1", loaded.port), timeout=20) as stalled:
        stalled.sendall(head + b'{"model": "primary", ')
        # While it stalls, everyone else is served.
        ok = loaded.client.post("/v1/chat/completions",
                                json={"model": "primary", "messages": PROMPT, "max_tokens": 2})
        assert ok.status_code == 200
        started = time.monotonic()
        answer = b""
        while chunk := stalled.recv(65536):
            answer += chunk
            if b"}}" in answer:
                break
        assert time.monotonic() - started < 15
    assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
    assert b'"code": "body_timeout"' in answer

    # A client that goes away half-way leaves only a decision record behind.
    with socket.create_connection(("127.0.0.1", loaded.port), timeout=20) as gone:
        gone.sendall(head.replace(b"slow-stalled", b"slow-gone") + b'{"model": ')
    wait_until(lambda: any(d["request_id"] == "slow-gone" for d in
                           loaded.client.get("/api/decisions").json()["data"]), 10, "the decision record")
    outcomes = {d["request_id"]: d["outcome"] for d in loaded.client.get("/api/decisions").json()["data"]}
    assert outcomes["slow-stalled"] == "rejected:body_timeout"
    assert outcomes["slow-gone"] == "rejected:client_disconnected"
    # The one real request moved primary ready -> serving -> ready; nothing else changed.
    assert [(name, state, model) for name, state, _, model in fingerprint(loaded)] == before


# -- secrets never leak; no shell ever -------------------------------------------------------------------------
SECRETS = ("sk-hal0-api-key-0123", "hf_env_token_4567", "hf_slot_env_token_89", "hf_arg_token_1011")


def test_keys_and_tokens_never_appear_in_events_decisions_logs_or_state(hal0: Hal0, model_files: dict[str, Path]
                                                                        ) -> None:
    api_key, hf_token, slot_token, arg_token = SECRETS
    hal0.add_model("tiny", model_files["tiny"])
    hal0.write_slot_config("secretive", 'type = "chat"\nmodel = "tiny"\n'
                           f'args = ["--hf-token", "{arg_token}"]\nenv = {{ HF_TOKEN = "{slot_token}" }}\n')
    hal0.start(env={"HAL0_API_KEYS": api_key, "HF_TOKEN": hf_token})
    auth = {"Authorization": f"Bearer {api_key}"}
    http = httpx.Client(base_url=hal0.url, timeout=60, headers=auth)
    assert http.post("/api/slots/secretive/load").json()["state"] == "ready"
    ok = http.post("/v1/chat/completions", json={"model": "secretive", "messages": PROMPT, "max_tokens": 2},
                   headers={"x-api-key": api_key})
    assert ok.status_code == 200
    backend_pid = hal0.state("secretive")["pid"]
    http.post("/api/slots/secretive/unload")
    # Everything an operator or a dashboard can read:
    with http.stream("GET", "/api/events", headers={"Last-Event-ID": "0"}) as resp:
        events = ""
        for line in resp.iter_lines():
            events += line + "\n"
            if '"to":"offline"' in line and '"slot":"secretive"' in line:
                break
    seen = {
        "/api/events": events,
        "/api/decisions": http.get("/api/decisions").text,
        "/api/slots": http.get("/api/slots").text,
        "/api/slots/secretive": http.get("/api/slots/secretive").text,
        "/api/slots/secretive/logs": http.get("/api/slots/secretive/logs", params={"lines": 5000}).text,
    }
    # Files hal0 writes (config/ is the operator's own, where the secrets were put on purpose).
    for path in [*(hal0.home / "state").rglob("*"), *(hal0.home / "logs").rglob("*")]:
        if path.is_file() and path.suffix != ".gguf":
            seen[str(path.relative_to(hal0.home))] = path.read_text(errors="replace")
    assert any(p.endswith("state.json") for p in seen) and any(p.endswith("decisions.jsonl") for p in seen)
    for where, text in seen.items():
        for secret in SECRETS:
            assert secret not in text, f"{secret} leaked in {where}"
    shown = json.loads(seen["/api/slots/secretive"])["config"]
    assert shown["env"] == {"HF_TOKEN": "***"} and shown["args"] == ["--hf-token", "***"]
    # hal0's own keys are not handed to backends.
    environ = Path(f"/proc/{backend_pid}/environ")
    assert not environ.exists() or api_key.encode() not in environ.read_bytes()
    http.close()


def test_no_shell_is_ever_spawned_and_backend_argv_comes_from_validated_fields() -> None:
    src = Path(__file__).parent.parent / "src" / "hal0"
    for path in src.rglob("*.py"):
        text = path.read_text()
        for banned in ("shell=True", "os.system(", "os.popen(", "create_subprocess_shell", "pty.spawn"):
            assert banned not in text, f"{banned} in {path}"
    from hal0.slots.config import SlotConfig

    for hostile in ({"args": ["--x\n--y"]}, {"args": ["a\x00b"]}, {"args": ["z" * 600]},
                    {"env": {"LD_PRELOAD;": "x"}}, {"env": {"OK": "a\x00b"}}, {"aliases": ["../x"]}):
        with pytest.raises(Exception) as err:
            SlotConfig.from_mapping({"name": "s", **hostile})
        assert getattr(err.value, "status", None) == 400, hostile
