"""TLS only where it is used: the real API serves `/v1` (a cold load included) without `ssl` in its process,
and still pulls a model from an https hub, loading `ssl` then."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import Hal0, SlowHub
from tests.test_faults import chat
from tests.test_lifecycle_faults import REF


def ssl_mapped(h: Hal0) -> list[str]:
    """The API's mapped files of OpenSSL and of Python's `_ssl`."""
    assert h.proc is not None
    maps = Path(f"/proc/{h.proc.pid}/maps").read_text().splitlines()
    return sorted({line.split()[-1] for line in maps if "libssl" in line or "_ssl." in line})


@pytest.mark.slow
def test_the_api_serves_v1_without_ssl_and_loads_it_for_an_https_pull(
        hal0: Hal0, model_files: dict[str, Path], https_hub: tuple[SlowHub, Path]) -> None:
    hub, ca = https_hub
    hal0.models.import_file("tiny", model_files["tiny"], slot_type="chat", link=True)
    hal0.write_slot_config("primary", 'model = "tiny"\n')
    hal0.start(env={"HF_ENDPOINT": hub.url, "SSL_CERT_FILE": str(ca)})
    resp = chat(hal0)  # a cold load through /v1, and the answer
    assert resp.status_code == 200, resp.text
    assert ssl_mapped(hal0) == []

    resp = hal0.client.post("/api/models/pull", json={"ref": REF, "wait": True}, timeout=60)
    assert resp.status_code == 200, resp.text
    assert hal0.models.exists(REF)
    assert hub.ranges == [None]  # one request to the hub, whole
    assert ssl_mapped(hal0) != []
