"""The API on a socket its service manager holds (systemd's socket activation, as hal0-api.socket does): the socket
outlives the API's process, so a client that connects while no API runs waits in its backlog and is answered by
the next one, never refused; the backends never see it. `systemd-socket-activate` is systemd's own implementation
of the protocol; the restart tests hold the socket themselves, as systemd does across a restart.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from hal0.server import inherited_sockets
from tests.conftest import Hal0, wait_until
from tests.test_faults import chat

IN_CI = bool(os.environ.get("CI"))


@pytest.fixture
def held(hal0: Hal0) -> Iterator[socket.socket]:
    """The API's port, bound and listening in this process, as systemd's socket unit holds it."""
    sock = socket.create_server(("127.0.0.1", hal0.port), backlog=128)
    with sock:
        yield sock


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def test_no_sockets_without_the_variables_or_for_another_process() -> None:
    assert inherited_sockets({}) == []
    for env in ({"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x"},
                {"LISTEN_PID": "not-a-pid", "LISTEN_FDS": "1"}, {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "x"}):
        assert inherited_sockets(env) == []
        assert env == {}, "the variables are taken out either way: no child of the API sees them"


def test_a_descriptor_that_is_no_listening_socket_is_refused_with_why(hal0: Hal0) -> None:
    with socket.socket() as unbound:
        for redirect, fds, why in (("3</dev/null", (), "descriptor 3 is not a socket"),
                                   (f"3<&{unbound.fileno()}", (unbound.fileno(),),
                                    "descriptor 3 is not a listening TCP socket")):
            proc = subprocess.run(
                ["bash", "-c", f'LISTEN_PID=$$ LISTEN_FDS=1 exec "$@" {redirect}', "bash", sys.executable, "-m",
                 "hal0.cli", "serve", "--no-demo"], env=hal0.env, capture_output=True, text=True, timeout=60,
                stdin=subprocess.DEVNULL, pass_fds=fds)
            assert proc.returncode == 1, proc
            assert "the socket the service manager passed cannot be served" in proc.stderr, proc.stderr
            assert why in proc.stderr, proc.stderr


@pytest.mark.slow
def test_the_api_serves_the_socket_systemd_passes_and_no_backend_inherits_it(
        hal0: Hal0, model_files: dict[str, Path]) -> None:
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        if IN_CI:
            pytest.fail("systemd-socket-activate is missing in CI: run.sh installs Debian's `systemd` package")
        pytest.skip("systemd-socket-activate not installed (apt-get install systemd)")
    hal0.models.import_file("tiny", model_files["tiny"], slot_type="chat", link=True)
    hal0.write_slot_config("primary", 'type = "chat"\nmodel = "tiny"\n')
    # systemd's own tool binds the address, sets LISTEN_FDS, LISTEN_PID and LISTEN_FDNAMES, and execs the API
    # in its place with only the environment it is given (-E); `--port` names another port, which the API gives
    # up for the one it was passed.
    other = hal0.port + 1 if hal0.port < 65535 else hal0.port - 1
    passed = [f"-E{key}={value}" for key, value in hal0.env.items() if key.startswith(("HAL0_", "PYTHON", "PATH"))]
    assert any(arg.startswith("-EHAL0_HOME=") for arg in passed)
    with hal0.log.open("ab") as log:
        hal0.proc = subprocess.Popen(
            [activate, "-l", f"127.0.0.1:{hal0.port}", "--fdname", "api", *passed, sys.executable, "-m",
             "hal0.cli", "serve", "--port", str(other), "--no-demo", "--log-level", "warning"],
            env=hal0.env, stdout=log, stderr=subprocess.STDOUT)
    wait_until(lambda: _accepts(hal0.port), 30, "systemd-socket-activate to bind the port")
    answer = chat(hal0)
    assert answer.status_code == 200, answer.text
    assert f"serving 127.0.0.1:{hal0.port}, the socket systemd passed, not 127.0.0.1:{other}" in \
        hal0.log.read_text()
    backend = hal0.state("primary")["pid"]
    env = _environ(backend)
    assert not {"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} & set(env), env
    # Nothing of the backend's is the API's socket: its inode is not among the backend's descriptors.
    inode = os.stat(f"/proc/{hal0.proc.pid}/fd/3").st_ino
    for fd in os.listdir(f"/proc/{backend}/fd"):
        try:
            assert os.stat(f"/proc/{backend}/fd/{fd}").st_ino != inode, f"backend fd {fd} is the API's socket"
        except FileNotFoundError:
            continue
    # The instance lock records the address served.
    lock = json.loads((hal0.home / "state" / "api.lock").read_text())
    assert (lock["host"], lock["port"]) == ("127.0.0.1", hal0.port), lock


@pytest.mark.slow
def test_requests_sent_while_the_api_is_down_wait_on_its_held_socket_and_are_answered(
        hal0: Hal0, held: socket.socket, model_files: dict[str, Path]) -> None:
    hal0.models.import_file("tiny", model_files["tiny"], slot_type="chat", link=True)
    hal0.start(socket_fd=held.fileno())
    assert hal0.client.put("/api/slots/primary/model", json={"model": "tiny"}).status_code == 200
    assert hal0.client.post("/api/slots/primary/load").json()["state"] == "ready"
    backend = hal0.state("primary")["pid"]
    hal0.kill(signal.SIGKILL)
    with ThreadPoolExecutor(3) as pool:
        # Sent while no API process exists: connected (the backlog), not refused, and not answered yet.
        during = [pool.submit(httpx.post, f"{hal0.url}/v1/chat/completions", timeout=60, json={
            "model": "primary", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "stream": stream}) for stream in (False, True, False)]
        time.sleep(0.5)
        assert not any(f.done() for f in during), [f.result() for f in during if f.done()]
        hal0.start(socket_fd=held.fileno(), wait=False)
        answers = [f.result(timeout=60) for f in during]
    assert [a.status_code for a in answers] == [200, 200, 200], [a.text for a in answers]
    assert "data: [DONE]" in answers[1].text
    wait_until(lambda: hal0.slot("primary")["adopting"] is False, 30, "the adoption")
    assert hal0.state("primary")["pid"] == backend, "adopted: the same backend answered, no reload"
    # A graceful stop (SIGTERM, as `systemctl restart` sends) closes only the API's copy of the socket.
    hal0.stop()
    with socket.create_connection(("127.0.0.1", hal0.port), timeout=5):
        pass
    hal0.start(socket_fd=held.fileno())
    assert chat(hal0).status_code == 200
