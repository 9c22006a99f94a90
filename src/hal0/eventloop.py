"""The event loop's modules (asyncio, uvloop) imported without `ssl`, and TLS on that loop for the connections
that need it.

`ssl` is ~10 ms of a restart's imports on a 2-core VM and ~4.5 MB of the API's memory (libssl and libcrypto
mapped, their objects), and nothing on the `/v1` path speaks TLS: backends are on loopback, and a node that has
no https peer never needs it. asyncio imports it only to offer TLS, so it is imported with `ssl` blocked;
uvloop reads a dozen of `ssl`'s names when its module starts, so it gets a stand-in that has them. Neither
keeps the block: `import ssl` loads the real module from then on (a pull's httpx, an https peer). uvloop's
own TLS is the stand-in's for good, so TLS is made with asyncio's TLS protocol over a plain connection
(`tls_protocol`), on any loop.
"""

from __future__ import annotations

import functools
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncio
    import ssl

#: The values of `ssl`'s constants that uvloop reads (OpenSSL's, the same on every platform).
_UVLOOP_INTS = {"SSL_ERROR_WANT_READ": 2, "SSL_ERROR_WANT_WRITE": 3, "SSL_ERROR_SYSCALL": 5}
_UVLOOP_ERRORS = ("SSLError", "SSLWantReadError", "SSLSyscallError", "SSLZeroReturnError", "CertificateError")


class UvloopTLSUnavailable(RuntimeError):
    """uvloop was imported without `ssl`: its own TLS is off in this process (use `tls_protocol`)."""


def _no_uvloop_tls(*_args: Any, **_kwargs: Any) -> Any:
    raise UvloopTLSUnavailable("uvloop was imported without ssl in this process: make TLS connections with "
                               "hal0.eventloop.tls_protocol")


class _StandIn(types.ModuleType):
    """What uvloop reads of `ssl` when it starts; its TLS is off in this process."""


def _uvloop_stand_in() -> types.ModuleType:
    mod = _StandIn("ssl")
    for name, value in _UVLOOP_INTS.items():
        setattr(mod, name, value)
    for name in _UVLOOP_ERRORS:
        setattr(mod, name, type(name, (OSError,), {"__module__": __name__}))
    # No context is an instance of this class; uvloop's `ssl=` ends in MemoryBIO or create_default_context.
    mod.SSLContext = type("SSLContext", (), {"__module__": __name__})  # type: ignore[attr-defined]
    mod.MemoryBIO = _no_uvloop_tls  # type: ignore[attr-defined]
    mod.create_default_context = _no_uvloop_tls  # type: ignore[attr-defined]
    return mod


def import_without_ssl() -> bool:
    """Import asyncio and uvloop (when installed) without `ssl`; call before anything imports asyncio. Whether
    `ssl` stayed out: False where asyncio or ssl was imported already (nothing is done then), or where uvloop
    would not start with the stand-in (it is imported with `ssl` then)."""
    if "asyncio" in sys.modules or "ssl" in sys.modules:
        return False
    try:
        sys.modules["ssl"] = None  # type: ignore[assignment]  # `import ssl` raises ImportError
        import asyncio  # noqa: F401

        sys.modules["ssl"] = _uvloop_stand_in()
        try:
            import uvloop
        except Exception:  # not installed, or a uvloop that reads more of ssl: once more, with ssl
            for name in [n for n in sys.modules if n == "uvloop" or n.startswith("uvloop.")]:
                del sys.modules[name]
            del sys.modules["ssl"]
            try:
                import uvloop  # noqa: F401
            except ImportError:  # not installed: asyncio's own loop serves
                pass
    finally:
        if sys.modules.get("ssl") is None or isinstance(sys.modules["ssl"], _StandIn):
            sys.modules.pop("ssl", None)
    return "ssl" not in sys.modules


@functools.cache
def _asyncio_with_ssl() -> Any:
    """asyncio's TLS protocol module, with the real `ssl` in the asyncio modules that were imported without it."""
    import asyncio.sslproto
    import importlib
    import ssl

    for name, mod in list(sys.modules.items()):
        if name.startswith("asyncio.") and mod is not None and getattr(mod, "ssl", ssl) is None:
            if name == "asyncio.sslproto":  # names it builds from ssl's at import (SSLAgainErrors, ...)
                importlib.reload(mod)
            else:
                mod.__dict__["ssl"] = ssl
    return asyncio.sslproto


def tls_protocol(loop: asyncio.AbstractEventLoop, protocol: asyncio.BaseProtocol, context: ssl.SSLContext,
                 server_hostname: str, waiter: asyncio.Future[None]) -> asyncio.BaseProtocol:
    """The protocol to open a plain connection with (`loop.create_connection(lambda: it, host, port)`) for TLS
    to `server_hostname`: `protocol` gets the connection once the handshake is done, and `waiter` its outcome."""
    sslproto = _asyncio_with_ssl()
    tls: asyncio.BaseProtocol = sslproto.SSLProtocol(loop, protocol, context, waiter, server_side=False,
                                                     server_hostname=server_hostname)
    return tls
