"""The two blocking things a report needs, done where they cannot stall the host's event loop:
resolving a host name, and building the TLS context (loading the CA certificates).

Each runs in a thread of its own started with ``_thread.start_new_thread``, not with
``asyncio.to_thread``: the first ``to_thread`` in a process imports the thread-pool module and
``threading.Thread.start()`` blocks the calling (loop) thread until the new thread has run,
each measured at milliseconds on a busy machine. ``getaddrinfo`` and OpenSSL's loading of a CA
file release the GIL, so the loop keeps running while they work (``bench/client.py``).
Loading certificates from memory in chunks on the loop was measured too: about 2 ms per 8
certificates, worse than one file load in a thread.
"""

from __future__ import annotations

import _thread
import asyncio
import contextlib
import encodings.idna  # noqa: F401 - see below
import os
import socket
import ssl
import sys
from collections.abc import Callable, Mapping
from typing import TypeVar

# ``getaddrinfo`` and ``ssl`` encode a host name with the "idna" codec, whose first use imports
# three modules (~1 ms holding the GIL). Importing it here, with the package, keeps that off
# the host's running loop: a report imports nothing (tests/test_client_http.py).

T = TypeVar("T")

# TLS contexts by (CA file, CA directory): built once per process and setting, then shared.
_contexts: dict[tuple[str | None, str | None], ssl.SSLContext] = {}


def run_off_loop(function: Callable[[], T]) -> asyncio.Future[T]:
    """Call ``function`` in a new daemon thread; the future gets its result or exception.

    Never blocks the caller. If the future is cancelled or the loop closed before the thread
    ends, the outcome is dropped.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(value: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is None:
            future.set_result(value)  # type: ignore[arg-type]
        else:
            future.set_exception(error)

    def work() -> None:
        value: T | None = None
        error: BaseException | None = None
        try:
            value = function()
        except Exception as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            error = exc
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
            loop.call_soon_threadsafe(settle, value, error)

    _thread.start_new_thread(work, ())
    return future


async def resolve(host: str, port: int) -> list[tuple[str, int]]:
    """The addresses to try for ``host:port``, IPv4 and IPv6; an IP address is used as is."""
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except OSError:
        pass
    else:
        return [(host, port)]
    infos = await run_off_loop(
        lambda: socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    )
    return [(str(info[4][0]), port) for info in infos]


async def tls_context(environ: Mapping[str, str]) -> ssl.SSLContext:
    """A verifying client context (hostname checked, TLS 1.2+) that trusts the system's CA
    certificates, or those named by ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` in ``environ``."""
    paths = ssl.get_default_verify_paths()
    cafile = environ.get(paths.openssl_cafile_env) or paths.openssl_cafile
    capath = environ.get(paths.openssl_capath_env) or paths.openssl_capath
    key = (cafile, capath)
    context = _contexts.get(key)
    if context is None:
        context = await run_off_loop(lambda: _new_context(cafile, capath))
        _contexts[key] = context
    return context


def _new_context(cafile_setting: str, capath_setting: str) -> ssl.SSLContext:
    _yield_the_cpu()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
    context.set_alpn_protocols(["http/1.1"])
    cafile = cafile_setting if os.path.isfile(cafile_setting) else None
    capath = capath_setting if os.path.isdir(capath_setting) else None
    if sys.platform == "win32" or not (cafile or capath):
        context.load_default_certs()  # the platform's own store
    else:
        # A CA directory is read lazily by OpenSSL, certificate by certificate, when needed.
        context.load_verify_locations(cafile=cafile, capath=capath)
    return context


def _yield_the_cpu() -> None:
    """Lower this thread's priority (Linux applies it to the calling thread only). Loading the
    system's CA bundle takes 30-100 ms of CPU; OpenSSL does it without holding the GIL, but on
    a machine whose cores are busy the host's event-loop thread would still queue for a core
    behind it. At niceness 10 the loop's wake-ups come first, and the load still gets its turn.
    """
    if sys.platform == "linux":
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, 10)
