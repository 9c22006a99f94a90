"""The `hal0` command: `serve` runs the API; everything else is a thin client over its HTTP API.

Human tables by default, `--json` for machines; the CLI and the dashboard read the same routes.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from hal0.errors import Hal0Error
from hal0.instance import InstanceLock
from hal0.kinds import SLOT_TYPES
from hal0.settings import load_settings

if TYPE_CHECKING:  # argparse is imported where the parser is built: `hal0 serve` starts without it
    import argparse

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def print_table(rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    cells = [[("" if row.get(c) is None else str(row.get(c))) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


def _age(ts: float | None) -> str:
    if not ts:
        return ""
    secs = max(0, int(time.time() - ts))
    if secs < 120:
        return f"{secs}s"
    if secs < 7200:
        return f"{secs // 60}m"
    return f"{secs // 3600}h"


# -- serve ------------------------------------------------------------------------------------------------
#: `hal0 serve`'s options, for argparse (`build_parser`) and for the start's own reading of them
#: (`_serve_options`): (flag, dest, conversion or None for a switch, default, choices, help).
_SERVE_OPTIONS: tuple[tuple[str, str, Callable[[str], Any] | None, Any, tuple[str, ...] | None, str | None], ...] = (
    ("--host", "host", str, None, None, None),
    ("--port", "port", int, None, None, None),
    ("--no-demo", "no_demo", None, False, None, "do not give `primary` the generated demo model on a first run"),
    ("--log-level", "log_level", str, "info", ("debug", "info", "warning", "error", "critical"), None),
)


def _serve_options(argv: Sequence[str]) -> SimpleNamespace | None:
    """`hal0 serve`'s arguments read without argparse, whose import and parser are ~5 ms of every restart: the
    plain spellings only (`--port 8080`, `--port=8080`, `--no-demo`). Anything else (help, a bad value, an
    abbreviation, an option argparse would not take as a value) returns None, and argparse answers it."""
    by_flag = {flag: (dest, convert, choices) for flag, dest, convert, _, choices, _ in _SERVE_OPTIONS}
    values = {dest: default for _, dest, _, default, _, _ in _SERVE_OPTIONS}
    rest = iter(argv)
    for arg in rest:
        flag, eq, inline = arg.partition("=")
        if flag not in by_flag:
            return None
        dest, convert, choices = by_flag[flag]
        if convert is None:
            if eq:
                return None
            values[dest] = True
            continue
        raw = inline if eq else next(rest, None)
        if raw is None or (not eq and raw.startswith("-")):
            return None
        try:
            value = convert(raw)
        except ValueError:
            return None
        if choices is not None and value not in choices:
            return None
        values[dest] = value
    return SimpleNamespace(command="serve", url=None, json=False, func=cmd_serve, local=True, **values)


def cmd_serve(args: argparse.Namespace | SimpleNamespace) -> int:
    import dataclasses
    import gc
    import logging

    from hal0.eventloop import import_without_ssl

    import_without_ssl()  # before anything imports asyncio: ~10 ms and ~4.5 MB that `/v1` never uses
    from hal0.server import inherited_sockets, listen

    # Under systemd, hal0-api.socket holds the port and passes it: the socket is what is served, whatever the
    # settings say (they rendered it; `hal0 setup --systemd` renders it again after a change).
    try:
        socks = inherited_sockets()
    except OSError as exc:
        print(f"hal0: the socket the service manager passed cannot be served: {exc}", file=sys.stderr)
        return 1
    settings = load_settings(overrides={"host": args.host, "port": args.port})
    if socks:
        host, port = socks[0].getsockname()[:2]
        if (_LOOPBACK[0] if settings.host == "localhost" else settings.host, settings.port) != (host, port):
            print(f"hal0: serving {host}:{port}, the socket systemd passed, not {settings.host}:{settings.port} "
                  "as configured: run `hal0 setup --systemd` and restart hal0-api.socket to move it",
                  file=sys.stderr)
            settings = dataclasses.replace(settings, host=host, port=port)
    if settings.host not in _LOOPBACK and not settings.api_keys:
        print(f"hal0: refusing to bind {settings.host}: set HAL0_API_KEYS first (only loopback is open "
              "without keys)", file=sys.stderr)
        return 2
    # The lock and the listening socket come before the app starts: an API that cannot own the state folder
    # or its port must exit before adoption touches a single backend.
    lock = InstanceLock(settings.state_dir)
    try:
        lock.acquire(settings.host, settings.port)
    except Hal0Error as exc:
        print(f"hal0: {exc.message}", file=sys.stderr)
        return 1
    if not socks:
        try:
            socks = [listen(settings.host, settings.port)]
        except OSError as exc:
            print(f"hal0: cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}",
                  file=sys.stderr)
            return 1
    # Listening from here on: a client that connects while the API imports and starts waits in the socket's
    # backlog and is answered as soon as it serves, instead of being refused (a restart looks like a pause).
    # The collector is off meanwhile (what the start makes lives as long as the process, and walking it again
    # and again cost ~5 ms of every start); `serving` freezes it all and turns it back on.
    gc.disable()
    from hal0.api.app import AppOptions, create_app
    from hal0.server import Server

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    server = Server(create_app(settings, AppOptions(demo=not args.no_demo)),
                    head_timeout_s=settings.header_timeout_s, graceful_s=5)
    try:
        return server.run(socks)
    finally:
        lock.release()


# -- slots ------------------------------------------------------------------------------------------------
def _slot_row(s: dict[str, Any]) -> dict[str, Any]:
    err = s.get("error") or {}
    return {"name": s["name"], "type": s.get("type"), "state": s["state"], "model": s.get("model")
            or s.get("config", {}).get("model"), "provider": s.get("config", {}).get("provider"),
            "port": s.get("port"), "pid": s.get("pid"), "since": _age(s.get("since")),
            "note": err.get("message") or s.get("reason") or ""}


def cmd_slot_list(args: argparse.Namespace) -> int:
    data = args.client.get("/api/slots")["data"]
    if args.json:
        _print_json(data)
    else:
        print_table([_slot_row(s) for s in data],
                    ["name", "type", "state", "model", "provider", "port", "pid", "since", "note"])
    return 0


def _show(args: argparse.Namespace, slot: dict[str, Any]) -> int:
    if args.json:
        _print_json(slot)
        return 0
    row = _slot_row(slot)
    for key in ("name", "type", "state", "model", "provider", "port", "pid", "since"):
        print(f"{key:>9}: {row[key] if row[key] is not None else ''}")
    print(f"{'reason':>9}: {slot.get('reason', '')}")
    err = slot.get("error")
    if err:
        print(f"{'error':>9}: [{err['code']}] {err['message']}")
        detail = err.get("detail") or {}
        if detail.get("exit_code") is not None:
            print(f"{'exit code':>9}: {detail['exit_code']}")
        if detail.get("log_tail"):
            print("  log tail:")
            for line in detail["log_tail"][-15:]:
                print(f"    {line}")
    return 0


def cmd_slot_show(args: argparse.Namespace) -> int:
    return _show(args, args.client.get(f"/api/slots/{args.name}"))


def cmd_slot_create(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"name": args.name, "type": args.type}
    for key in ("provider", "model", "port", "ctx_size", "ttl_s", "idle_timeout_s"):
        value = getattr(args, key)
        if value is not None:
            body[key] = value
    if args.alias:
        body["aliases"] = args.alias
    if args.arg:
        body["args"] = args.arg
    return _show(args, args.client.post("/api/slots", json=body))


def cmd_slot_delete(args: argparse.Namespace) -> int:
    args.client.delete(f"/api/slots/{args.name}")
    if not args.json:
        print(f"deleted slot {args.name}")
    return 0


def cmd_slot_assign(args: argparse.Namespace) -> int:
    ref = None if args.ref in ("none", "-") else args.ref
    return _show(args, args.client.put(f"/api/slots/{args.name}/model", json={"model": ref}))


def _action(verb: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        params = {"wait": "false"} if verb == "load" and args.no_wait else None
        slot = args.client.post(f"/api/slots/{args.name}/{verb}", params=params)
        return _show(args, slot)

    return run


def cmd_slot_logs(args: argparse.Namespace) -> int:
    data = args.client.get(f"/api/slots/{args.name}/logs", params={"lines": args.lines})
    if args.json:
        _print_json(data)
    else:
        print("\n".join(data["lines"]))
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    topics = ",".join(args.topic) if args.topic else None
    for event in args.client.stream_events("/api/events", params={"topics": topics} if topics else None):
        if args.json:
            print(json.dumps(event), flush=True)
        elif event.get("topic") == "slot" and "to" in event:
            print(f"{time.strftime('%H:%M:%S', time.localtime(event['time']))}  {event['slot']:<12} "
                  f"{event['from']:>9} -> {event['to']:<9} {event.get('reason', '')}", flush=True)
        elif event.get("topic") == "slot" and event.get("event") == "changed":
            record = event.get("record") or {}
            changed = ", ".join(f"{k}={record.get(k)}" for k in event.get("changed", []))
            print(f"{time.strftime('%H:%M:%S', time.localtime(event['time']))}  {event['slot']:<12} "
                  f"{'changed':>9}    {changed}: {event.get('reason', '')}", flush=True)
        else:
            print(json.dumps(event), flush=True)
    return 0


def _decision_line(d: dict[str, Any]) -> str:
    when = time.strftime("%H:%M:%S", time.localtime(d.get("time", 0)))
    return (f"{when}  {d.get('request_id', '')[:12]:<12} {d.get('endpoint', ''):<22} model={d.get('model')} "
            f"-> {d.get('slot') or '-'} ({d.get('reason') or '-'}) status={d.get('status')} "
            f"wait={d.get('wait_ms', 0):.1f}ms took={d.get('duration_ms', 0):.1f}ms {d.get('outcome', '')}")


def cmd_logs(args: argparse.Namespace) -> int:
    params = {k: v for k, v in (("slot", args.slot), ("endpoint", args.endpoint), ("outcome", args.outcome),
                                ("limit", args.lines)) if v}
    recent = list(reversed(args.client.get("/api/decisions", params=params)["data"]))
    for d in recent:
        print(json.dumps(d) if args.json else _decision_line(d), flush=True)
    if not args.follow:
        return 0
    for event in args.client.stream_events("/api/events", params={"topics": "decision"}):
        if any(getattr(args, k) and event.get(k) != getattr(args, k) for k in ("slot", "endpoint", "outcome")):
            continue
        event.pop("topic", None)
        event.pop("id", None)
        print(json.dumps(event) if args.json else _decision_line(event), flush=True)
    return 0


def _gib(n: int | None) -> str:
    return "" if n is None else f"{n / (1 << 30):.1f} GiB"


def hardware_rows(hw: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per memory pool of /api/hardware: the host, each GPU (its GTT pool too, for amdgpu), each NPU."""
    mem = hw["memory"]
    cpu = hw.get("cpu", {})
    rows = [{"device": "host", "name": f"{cpu.get('model') or 'CPU'} ({cpu.get('cores')} cores)",
             "total": _gib(mem["total_bytes"]), "free": _gib(mem["available_bytes"]),
             "note": "cgroup memory.max" if mem.get("source") == "cgroup" else ""}]
    for g in hw.get("gpus", []):
        rows.append({"device": f"gpu{g['index']}", "name": f"{g['vendor']} {g['name']}",
                     "total": _gib(g["memory_total_bytes"]),
                     "free": _gib(g["memory_total_bytes"] - g["memory_used_bytes"]), "note": "VRAM"})
        if g.get("gtt_total_bytes"):
            rows.append({"device": f"gpu{g['index']}", "name": "GTT (system memory the GPU maps)",
                         "total": _gib(g["gtt_total_bytes"]),
                         "free": _gib(g["gtt_total_bytes"] - (g.get("gtt_used_bytes") or 0)), "note": "GTT"})
    # hal0's budget on each pool it admits loads to, and what its slots hold there.
    budgets = hw.get("budgets", {})
    for row in rows:
        key = "host" if row["device"] == "host" else f"gpu:{row['device'].removeprefix('gpu')}"
        b = budgets.get(key) if row["note"] != "GTT" else None
        held = sum(h["bytes"].get(key, 0) for h in hw.get("holdings", []))
        row["budget"] = _gib(b["budget_bytes"]) if b else ""
        row["slots"] = _gib(held) if b else ""
    rows += [{"device": "npu", "name": n, "total": "", "free": "", "note": "present"} for n in hw.get("npus", [])]
    rows += [{"device": "-", "name": f"{k} skipped", "total": "", "free": "", "note": v}
             for k, v in hw.get("skipped", {}).items()]
    return rows


def cmd_hardware(args: argparse.Namespace) -> int:
    hw = args.client.get("/api/hardware")
    if args.json:
        _print_json(hw)
    else:
        print_table(hardware_rows(hw), ["device", "name", "total", "free", "budget", "slots", "note"])
    return 0


def cmd_peers(args: argparse.Namespace) -> int:
    peers = args.client.get("/api/peers")["data"]
    if args.json:
        _print_json(peers)
        return 0
    rows = [{"peer": p["url"], "status": p["status"], "since": _age(p.get("since")),
             "models": ", ".join(sorted({s["model"] for s in p["slots"] if s.get("model")})),
             "note": p.get("reason") or ""} for p in peers]
    print_table(rows, ["peer", "status", "since", "models", "note"])
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from hal0.setup_systemd import doctor_checks

    checks = doctor_checks(load_settings(), api_url=args.url)
    if args.json:
        _print_json([{"name": c.name, "ok": c.ok, "detail": c.detail} for c in checks])
    else:
        for c in checks:
            print(f"{'ok  ' if c.ok else 'FAIL'}  {c.name:<14} {c.detail}")
    return 0 if all(c.ok for c in checks) else 1


def cmd_setup(args: argparse.Namespace) -> int:
    from hal0.setup_systemd import install_units

    if not args.systemd:
        print("hal0 setup: nothing to do; `hal0 setup --systemd` installs the systemd units", file=sys.stderr)
        return 2
    paths = install_units(load_settings(), dry_run=args.dry_run)
    for path in paths:
        print(("would write " if args.dry_run else "wrote ") + str(path))
    if not args.dry_run:
        print("hal0-api.socket and hal0-api.service are enabled; start them with: systemctl start hal0-api")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The CLI's parser (`hal0 serve` with the plain spellings of its options starts without it)."""
    import argparse

    parser = argparse.ArgumentParser(prog="hal0", description="Control plane for local AI inference.")
    parser.add_argument("--url", help="API address (default: from settings, http://127.0.0.1:8080)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the API on 127.0.0.1:8080 (and re-adopt running slots)")
    for flag, dest, convert, default, choices, help_text in _SERVE_OPTIONS:
        if convert is None:
            serve.add_argument(flag, dest=dest, action="store_true", help=help_text)
        else:
            serve.add_argument(flag, dest=dest, type=convert, default=default, choices=choices, help=help_text)
    serve.set_defaults(func=cmd_serve, local=True)

    slot = sub.add_parser("slot", help="list and drive slots").add_subparsers(dest="slot_cmd", required=True)
    p = slot.add_parser("list", help="every slot and its state")
    p.set_defaults(func=cmd_slot_list)
    p = slot.add_parser("show", help="one slot, with its error if it failed")
    p.add_argument("name")
    p.set_defaults(func=cmd_slot_show)
    p = slot.add_parser("create", help="create a user slot")
    p.add_argument("name")
    p.add_argument("--type", default="chat", choices=list(SLOT_TYPES))
    p.add_argument("--provider")
    p.add_argument("--model", help="model ref")
    p.add_argument("--port", type=int)
    p.add_argument("--ctx-size", dest="ctx_size", type=int)
    p.add_argument("--ttl", dest="ttl_s", type=float, help="unload after this many seconds idle")
    p.add_argument("--idle-timeout", dest="idle_timeout_s", type=float)
    p.add_argument("--alias", action="append", help="another name clients may use (repeatable)")
    p.add_argument("--arg", action="append", help="extra backend argument (repeatable)")
    p.set_defaults(func=cmd_slot_create)
    p = slot.add_parser("delete", help="delete a user slot")
    p.add_argument("name")
    p.set_defaults(func=cmd_slot_delete)
    p = slot.add_parser("assign", help="give a slot a model ref ('none' to unassign)")
    p.add_argument("name")
    p.add_argument("ref")
    p.set_defaults(func=cmd_slot_assign)
    for verb, text in (("load", "load and wait until ready"), ("unload", "stop the backend"),
                       ("restart", "unload, then load and wait")):
        p = slot.add_parser(verb, help=text)
        p.add_argument("name")
        if verb == "load":
            p.add_argument("--no-wait", action="store_true", help="return at once")
        p.set_defaults(func=_action(verb))
    p = slot.add_parser("logs", help="the slot backend's log tail")
    p.add_argument("name")
    p.add_argument("-n", "--lines", type=int, default=100)
    p.set_defaults(func=cmd_slot_logs)

    p = sub.add_parser("logs", help="the decision log: where each request went and why")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new decisions live")
    p.add_argument("-n", "--lines", type=int, default=50)
    p.add_argument("--slot")
    p.add_argument("--endpoint")
    p.add_argument("--outcome")
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("hardware", help="CPU, host memory, GPUs (VRAM, GTT) and NPUs this machine has")
    p.set_defaults(func=cmd_hardware)

    p = sub.add_parser("peers", help="the other hal0 nodes this one follows: up or down, and their models")
    p.set_defaults(func=cmd_peers)

    p = sub.add_parser("doctor", help="check the installation: supervisor, llama-server, ports, disk, hardware, "
                                   "the API's failed writes")
    p.set_defaults(func=cmd_doctor, local=True)

    p = sub.add_parser("setup", help="install hal0 as a system service")
    p.add_argument("--systemd", action="store_true",
                   help="install hal0-api.service and the hal0-slot@.service template (needs root)")
    p.add_argument("--dry-run", action="store_true", help="show what would be written")
    p.set_defaults(func=cmd_setup, local=True)

    p = sub.add_parser("events", help="follow slot transitions and other events live")
    p.add_argument("--topic", action="append", help="slot, decision, pull or peer (repeatable)")
    p.set_defaults(func=cmd_events)

    try:
        from hal0 import cli_models
    except ImportError:
        pass
    else:
        cli_models.register(sub)
        from hal0 import cli_top

        cli_top.register(sub)
    _accept_globals_anywhere(parser)
    return parser


def _accept_globals_anywhere(parser: argparse.ArgumentParser) -> None:
    """`--url` and `--json` also after the subcommand (`hal0 slot unload NAME --url URL`): every subcommand
    takes them too, defaulting to nothing, so a value given before the subcommand is kept."""
    import argparse

    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for sub in action.choices.values():
            if not any(a.dest == "url" for a in sub._actions):
                sub.add_argument("--url", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
            if not any(a.dest == "json" for a in sub._actions):
                sub.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
            _accept_globals_anywhere(sub)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args: argparse.Namespace | SimpleNamespace | None = None
    if argv[:1] == ["serve"]:
        args = _serve_options(argv[1:])
    if args is None:
        args = build_parser().parse_args(argv)
    try:
        if not getattr(args, "local", False):
            # Imported here: `hal0 serve` (local) starts without the HTTP client library.
            from hal0.cli_http import ApiClient

            settings = load_settings()
            args.client = ApiClient(args.url or settings.base_url,
                                    settings.api_keys[0] if settings.api_keys else None,
                                    timeout=settings.cold_boot_grace_s + 30)
        code: int = args.func(args)
        return code
    except Hal0Error as exc:
        if getattr(args, "json", False):
            _print_json({"error": exc.to_dict()})
        else:
            print(f"hal0: {exc.message} [{exc.code}]", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
