"""`hal0 model …` and `hal0 loadout …`: thin clients over /api/models, /api/catalog and /api/loadouts.

Human tables by default, `--json` for machines; `pull` follows the pull's SSE stream with a progress bar.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from hal0.errors import Hal0Error
from hal0.kinds import SLOT_TYPES

if TYPE_CHECKING:
    from hal0.cli_http import ApiClient

_SUFFIXES = ("B", "KB", "MB", "GB", "TB")


def human_bytes(n: int | float | None) -> str:
    if n is None:
        return "?"
    value = float(n)
    for suffix in _SUFFIXES:
        if value < 1000 or suffix == _SUFFIXES[-1]:
            return f"{value:.0f} {suffix}" if suffix == "B" else f"{value:.1f} {suffix}"
        value /= 1000
    return f"{value:.1f} TB"


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def _table(rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    cells = [[("" if row.get(c) is None else str(row.get(c))) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


class ProgressBar:
    """One line redrawn in place on a terminal; plain lines, at most one a second, otherwise."""

    def __init__(self, out: TextIO = sys.stderr, width: int = 30) -> None:
        self._out = out
        self._width = width
        self._tty = out.isatty()
        self._last_line = 0.0
        self._drawn = False

    def update(self, event: dict[str, Any]) -> None:
        done, total = int(event.get("bytes_done") or 0), event.get("total")
        name = event.get("file") or event.get("ref") or ""
        count = int(event.get("file_count") or 0)
        prefix = f"[{int(event.get('file_index') or 0) + 1}/{count}] " if count > 1 else ""
        rate = f"{human_bytes(event.get('rate_bps') or 0)}/s"
        if total:
            frac = min(done / total, 1.0)
            filled = int(frac * self._width)
            bar = "#" * filled + "-" * (self._width - filled)
            amount = f"{human_bytes(done)}/{human_bytes(total)}"
            line = f"{prefix}{name} [{bar}] {frac * 100:5.1f}% {amount} {rate}"
        else:
            line = f"{prefix}{name} {human_bytes(done)} {rate}"
        now = time.monotonic()
        if self._tty:
            self._out.write("\r" + line[:200].ljust(80))
            self._drawn = True
        elif now - self._last_line >= 1.0 or (total and done >= total):
            self._out.write(line + "\n")
            self._last_line = now
        self._out.flush()

    def close(self) -> None:
        if self._drawn:
            self._out.write("\n")
            self._out.flush()
            self._drawn = False


def follow_pull(client: ApiClient, ref: str, quiet: bool = False) -> dict[str, Any]:
    """Follow the pull of `ref` to its end; return the manifest, or raise the pull's error."""
    bar = None if quiet else ProgressBar()
    try:
        for event in client.stream_events(f"/api/models/{ref}/pull"):
            kind = event.get("kind")
            if kind == "progress" and bar is not None:
                bar.update(event)
            elif kind == "done":
                manifest: dict[str, Any] = event.get("manifest") or {}
                return manifest
            elif kind == "error":
                err = event.get("error") or {}
                raise Hal0Error(str(err.get("message", "pull failed")),
                                code=str(err.get("code", "pull_failed")), detail=err.get("detail") or None)
    finally:
        if bar is not None:
            bar.close()
    raise Hal0Error(f"the event stream of the pull of {ref!r} ended early", code="stream_ended")


# -- model ------------------------------------------------------------------------------------------------
def _model_row(m: dict[str, Any]) -> dict[str, Any]:
    meta = m.get("metadata") or {}
    return {"ref": m["ref"], "type": m.get("slot_type"), "format": m.get("format"),
            "size": human_bytes(m.get("size")), "arch": meta.get("architecture"),
            "quant": meta.get("file_type"), "slots": ",".join(m.get("slots") or []),
            "source": m.get("source")}


def cmd_model_list(args: argparse.Namespace) -> int:
    data = args.client.get("/api/models")
    if args.json:
        _print_json(data)
        return 0
    _table([_model_row(m) for m in data["models"]],
           ["ref", "type", "format", "size", "arch", "quant", "slots", "source"])
    if data.get("pulling"):
        print(f"\npulling: {', '.join(data['pulling'])}")
    return 0


def cmd_model_search(args: argparse.Namespace) -> int:
    params = {"q": " ".join(args.query)}
    if args.type:
        params["type"] = args.type
    data = args.client.get("/api/catalog", params=params)
    if args.json:
        _print_json(data)
        return 0
    _table([{"ref": e["ref"], "type": e["slot_type"], "provider": e["provider"],
             "size": human_bytes(e.get("size")), "installed": "yes" if e.get("installed") else "",
             "description": e.get("description")} for e in data["catalog"]],
           ["ref", "type", "provider", "size", "installed", "description"])
    return 0


def cmd_model_show(args: argparse.Namespace) -> int:
    m = args.client.get(f"/api/models/{args.ref}")
    if args.json:
        _print_json(m)
        return 0
    print(f"ref:       {m['ref']}")
    print(f"source:    {m['source']}")
    print(f"format:    {m['format']}   provider: {m.get('provider') or '-'}   "
          f"type: {m.get('slot_type') or '-'}")
    print(f"size:      {human_bytes(m.get('size'))}")
    print(f"slots:     {', '.join(m.get('slots') or []) or '-'}")
    for key, value in sorted((m.get("metadata") or {}).items()):
        print(f"  {key}: {value}")
    print("files:")
    for f in m["files"]:
        print(f"  {f['name']}  {human_bytes(f['size'])}  sha256:{f['sha256']}")
    return 0


def cmd_model_pull(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"ref": args.ref}
    for key in ("source", "sha256", "slot_type", "provider"):
        if getattr(args, key, None):
            body[key] = getattr(args, key)
    started = args.client.post("/api/models/pull", json=body)
    if started.get("status") == "installed":
        manifest = started["manifest"]
    else:
        manifest = follow_pull(args.client, args.ref, quiet=args.json)
    if args.json:
        _print_json(manifest)
    else:
        print(f"pulled {manifest.get('ref', args.ref)} ({human_bytes(manifest.get('size'))})")
    return 0


def cmd_model_import(args: argparse.Namespace) -> int:
    path = Path(args.path).expanduser().resolve()
    body: dict[str, Any] = {"ref": args.ref, "path": str(path), "link": args.link}
    if args.slot_type:
        body["slot_type"] = args.slot_type
    if args.provider:
        body["provider"] = args.provider
    manifest = args.client.post("/api/models/import", json=body, timeout=None)
    if args.json:
        _print_json(manifest)
    else:
        print(f"imported {manifest['ref']} ({human_bytes(manifest.get('size'))}, {manifest['format']})")
    return 0


def cmd_model_rm(args: argparse.Namespace) -> int:
    data = args.client.delete(f"/api/models/{args.ref}")
    if args.json:
        _print_json(data)
    else:
        print(f"removed {data['removed']} (freed {human_bytes(data.get('freed_bytes'))})")
    return 0


def cmd_model_verify(args: argparse.Namespace) -> int:
    data = args.client.post(f"/api/models/{args.ref}/verify", timeout=None)
    if args.json:
        _print_json(data)
    else:
        for f in data["files"]:
            print(f"{'ok' if f['ok'] else 'BAD':4} {f['name']}" + ("" if f["ok"] else f"  ({f['problem']})"))
        print(f"{data['ref']}: " + ("intact" if data["ok"] else "does not match its manifest; import or pull it "
                                                                   "again"))
    return 0 if data["ok"] else 1


# -- loadout ----------------------------------------------------------------------------------------------
def cmd_loadout_list(args: argparse.Namespace) -> int:
    data = args.client.get("/api/loadouts")
    if args.json:
        _print_json(data)
        return 0
    _table([{"name": lo["name"], "tier": lo["tier"],
             "slots": ", ".join(f"{s['slot']}={s['ref']}" for s in lo["slots"])} for lo in data["loadouts"]],
           ["name", "tier", "slots"])
    return 0


def _print_plan(plan: dict[str, Any]) -> None:
    lo = plan["loadout"]
    print(f"{lo['name']}: {lo['description']} ({lo['tier']})")
    _table([{"slot": s["slot"], "ref": s["ref"], "installed": "yes" if s["installed"] else "no",
             "file": human_bytes(s.get("file_bytes")), "context": human_bytes(s["context_bytes"])}
            for s in plan["slots"]], ["slot", "ref", "installed", "file", "context"])
    mem = plan["memory"]
    print(f"estimate: {human_bytes(plan['estimate_bytes'])}; memory: {human_bytes(mem['available'])} "
          f"available of {human_bytes(mem['total'])}")
    for warning in plan.get("warnings") or []:
        print(f"warning: {warning}")


def cmd_loadout_show(args: argparse.Namespace) -> int:
    plan = args.client.get(f"/api/loadouts/{args.name}")
    if args.json:
        _print_json(plan)
    else:
        _print_plan(plan)
    return 0


def cmd_loadout_apply(args: argparse.Namespace) -> int:
    plan = args.client.get(f"/api/loadouts/{args.name}")
    if not plan["fits"] and not args.force:
        if not args.json:
            _print_plan(plan)
        raise Hal0Error(f"loadout {args.name!r} does not fit this machine; use --force to apply anyway",
                        code="insufficient_memory")
    # Pull first, one at a time with a progress bar each; apply then finds everything installed.
    for ref in plan["missing"]:
        started = args.client.post("/api/models/pull", json={"ref": ref})
        if started.get("status") != "installed":
            if not args.json:
                print(f"pulling {ref}", file=sys.stderr)
            follow_pull(args.client, ref, quiet=args.json)
    report = args.client.post(f"/api/loadouts/{args.name}/apply", json={"force": args.force}, timeout=None)
    report["pulled"] = sorted(set(report.get("pulled") or []) | set(plan["missing"]))
    if args.json:
        _print_json(report)
        return 0
    for warning in report.get("warnings") or []:
        print(f"warning: {warning}")
    if report["pulled"]:
        print(f"pulled: {', '.join(report['pulled'])}")
    for slot, ref in report["assigned"].items():
        print(f"assigned {slot} = {ref}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    json_flag: dict[str, Any] = {"action": "store_true", "default": argparse.SUPPRESS,
                                 "help": "print JSON instead of tables"}

    model = sub.add_parser("model", help="installed models, the catalog, pulls")
    msub = model.add_subparsers(dest="model_cmd", required=True)
    p = msub.add_parser("list", help="installed models")
    p.add_argument("--json", **json_flag)
    p.set_defaults(func=cmd_model_list)
    p = msub.add_parser("search", help="search the built-in catalog")
    p.add_argument("query", nargs="*")
    p.add_argument("--type", choices=list(SLOT_TYPES))
    p.add_argument("--json", **json_flag)
    p.set_defaults(func=cmd_model_search)
    p = msub.add_parser("show", help="one model's manifest")
    p.add_argument("ref")
    p.add_argument("--json", **json_flag)
    p.set_defaults(func=cmd_model_show)
    p = msub.add_parser("pull", help="pull a catalog ref, or REF from --source")
    p.add_argument("ref")
    p.add_argument("--source", help="hf:owner/repo/path/file.gguf, an https URL, or a file path")
    p.add_argument("--sha256", help="expected sha256 of the file")
    p.add_argument("--type", dest="slot_type", choices=list(SLOT_TYPES))
    p.add_argument("--provider")
    p.add_argument("--json", **json_flag)
    p.set_defaults(func=cmd_model_pull)
    p = msub.add_parser("import", help="install a local file as REF")
    p.add_argument("ref")
    p.add_argument("path")
    p.add_argument("--link", action="store_true", help="hard-link instead of copying")
    p.add_argument("--type", dest="slot_type", choices=list(SLOT_TYPES))
    p.add_argument("--provider")
    p.add_argument("--json", **json_flag)
    p.set_defaults(func=cmd_model_import)
    p = msub.add_parser("rm", help="remove a model (refused while a slot uses it)")
    p.add_argument("ref")
    p.add_argument("--json", **json_flag)
    p.set_defaults(func=cmd_model_rm)
    p = msub.add_parser("verify", help="check every file of REF against its manifest's sha256")
    p.add_argument("ref")
    p.add_argument("--json", **json_flag)
    p.set_defaults(func=cmd_model_verify)

    loadout = sub.add_parser("loadout", help="recommended model-per-slot sets by hardware tier")
    lsub = loadout.add_subparsers(dest="loadout_cmd", required=True)
    p = lsub.add_parser("list", help="every loadout")
    p.add_argument("--json", **json_flag)
    p.set_defaults(func=cmd_loadout_list)
    p = lsub.add_parser("show", help="a loadout with its memory estimate for this machine")
    p.add_argument("name")
    p.add_argument("--json", **json_flag)
    p.set_defaults(func=cmd_loadout_show)
    p = lsub.add_parser("apply", help="pull what is missing and assign every slot")
    p.add_argument("name")
    p.add_argument("--force", action="store_true", help="apply even if it does not fit in memory")
    p.add_argument("--json", **json_flag)
    p.set_defaults(func=cmd_loadout_apply)
