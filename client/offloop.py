"""Running the client's blocking work where it cannot stall the host's event loop.

A report's exchange (DNS, connect, TLS handshake, send, read) runs in a thread of its own,
started with ``_thread.start_new_thread`` rather than ``asyncio.to_thread``: the first
``to_thread`` in a process imports the thread-pool module and ``threading.Thread.start()``
blocks the calling (loop) thread until the new thread has run, each measured at milliseconds on
a busy machine. ``getaddrinfo``, socket I/O, the TLS handshake and OpenSSL's loading of a CA
file all release the GIL (``bench/client.py`` measures what is left). Loading certificates from
memory in chunks on the loop instead was measured too: it holds the GIL, about 2 ms per 8
certificates.

Loading the system's CA bundle whole costs 30-150 ms of CPU (145 certificates on Debian);
without the GIL, but on a machine whose cores are busy the host's loop queues for a core behind
it (measured: dense multi-millisecond stalls while it loads). So when the system's CA directory
is hashed for OpenSSL (``/etc/ssl/certs`` on Debian, Ubuntu, Alpine: the same roots as the
bundle), the context uses the directory alone and OpenSSL reads the one root a handshake needs;
only without such a directory, or when ``SSL_CERT_FILE`` names a file, is a bundle loaded,
then in a further thread at a lower priority. Only that thread is lowered, not the exchange's:
a low-priority thread that holds the GIL, even briefly, can keep the loop waiting for it.
"""

from __future__ import annotations

import _thread
import asyncio
import contextlib
import encodings.idna  # noqa: F401 - see below
import os
import ssl
import sys
import threading
from collections.abc import Callable, Mapping
from typing import TypeVar

# ``getaddrinfo`` and ``ssl`` encode a host name with the "idna" codec, whose first use imports
# three modules (~1 ms holding the GIL). Importing it here, with the package, keeps that off
# the host's running loop: a report imports nothing (tests/test_client_http.py).

T = TypeVar("T")

# TLS contexts by (CA file, CA directory) setting: built once per process, then shared.
_contexts: dict[tuple[str, str], ssl.SSLContext] = {}


def run_off_loop(function: Callable[[], T]) -> asyncio.Future[T]:
    """Call ``function`` in a new thread (a raw ``_thread``, at the host's priority); the future
    gets its result or exception. Never blocks the caller. If the future is cancelled or the loop
    closed before the thread ends, the outcome is dropped."""
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


def tls_context(environ: Mapping[str, str], timeout: float) -> ssl.SSLContext:
    """A verifying client context (hostname checked, TLS 1.2+) that trusts the system's CA
    certificates, or those named by ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` in ``environ``.

    Blocking, for at most ``timeout`` seconds (then TimeoutError): call it off the loop. The
    first call per setting loads the certificates in a low-priority thread.
    """
    paths = ssl.get_default_verify_paths()
    cafile = environ.get(paths.openssl_cafile_env, "")
    capath = environ.get(paths.openssl_capath_env) or paths.openssl_capath
    if not cafile and not _is_hashed_directory(capath):
        cafile = paths.openssl_cafile
    context = _contexts.get((cafile, capath))
    if context is not None:
        return context
    outcome: list[ssl.SSLContext | Exception] = []

    def load() -> None:
        _yield_the_cpu()
        try:
            outcome.append(_new_context(cafile, capath))
        except Exception as exc:  # noqa: BLE001 - raised below, in the waiting thread
            outcome.append(exc)

    loader = threading.Thread(target=load, name="opa-telemetry CA load", daemon=True)
    loader.start()
    loader.join(timeout)
    if not outcome:
        raise TimeoutError("loading the CA certificates took too long")
    if isinstance(outcome[0], Exception):
        raise outcome[0]
    _contexts[cafile, capath] = outcome[0]
    return outcome[0]


def _is_hashed_directory(path: str) -> bool:
    """True when ``path`` holds OpenSSL's hash links (``5ad8a5d6.0``): a directory it can look
    roots up in by subject, reading only the one it needs."""
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                stem, dot, suffix = entry.name.partition(".")
                if dot and len(stem) == 8 and suffix.isdigit() and _is_hex(stem):
                    return True
    except OSError:
        pass
    return False


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


def _new_context(cafile_setting: str, capath_setting: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
    context.set_alpn_protocols(["http/1.1"])
    cafile = cafile_setting if cafile_setting and os.path.isfile(cafile_setting) else None
    capath = capath_setting if os.path.isdir(capath_setting) else None
    if sys.platform == "win32" or not (cafile or capath):
        context.load_default_certs()  # the platform's own store
    else:
        # A CA directory is read lazily by OpenSSL, certificate by certificate, when needed.
        context.load_verify_locations(cafile=cafile, capath=capath)
    return context


def _yield_the_cpu() -> None:
    """Lower this thread's priority by 10 nice levels (Linux applies it to the calling thread
    only): the loop's wake-ups come first, and the work still gets its turn on a busy machine."""
    if sys.platform == "linux":
        with contextlib.suppress(OSError):
            niceness = os.getpriority(os.PRIO_PROCESS, 0)
            os.setpriority(os.PRIO_PROCESS, 0, min(19, niceness + 10))
