"""Running the client's blocking work where it cannot stall the host's event loop.

A report's exchange (DNS, connect, TLS handshake, send, read) runs in a thread of its own,
started with ``_thread.start_new_thread`` rather than ``asyncio.to_thread``: the first
``to_thread`` in a process imports the thread-pool module and ``threading.Thread.start()``
blocks the calling (loop) thread until the new thread has run, each measured at milliseconds on
a busy machine. ``getaddrinfo``, socket I/O, the TLS handshake and OpenSSL's loading of a CA
file all release the GIL (``bench/client.py`` measures what is left). Loading certificates from
memory in chunks on the loop instead was measured too: it holds the GIL, about 2 ms per 8
certificates.

Which CA certificates are trusted is read as OpenSSL's default paths and Go's
``crypto/x509`` read it: a file (``SSL_CERT_FILE``, else the system's bundle) and directories
(``SSL_CERT_DIR``, a ``:``-separated list, else the system's directory), all of them together.
A directory hashed for OpenSSL (``c_rehash``/``openssl rehash`` names, ``5ad8a5d6.0``) is
searched by OpenSSL itself; in one without such names every file is read, as Go does.

Loading the system's CA bundle whole costs 30-150 ms of CPU (145 certificates on Debian);
without the GIL, but on a machine whose cores are busy the host's loop queues for a core behind
it (measured: dense multi-millisecond stalls while it loads). So when the system's CA directory
is hashed (``/etc/ssl/certs`` on Debian, Ubuntu, Alpine: the same roots as the bundle), it
stands in for the bundle and OpenSSL reads the one root a handshake needs; only without such a
directory, or when ``SSL_CERT_FILE`` names a file, is a bundle loaded, then in a further thread
at a lower priority. Only that thread is lowered, not the exchange's: a low-priority thread
that holds the GIL, even briefly, can keep the loop waiting for it.
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

CERT_FILE_ENV = "SSL_CERT_FILE"
CERT_DIR_ENV = "SSL_CERT_DIR"

# TLS contexts by (SSL_CERT_FILE, SSL_CERT_DIR) setting: built once per process, then shared.
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
    """A verifying client context (hostname checked, TLS 1.2+) that trusts the CA certificates
    OpenSSL and Go would for the ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` in ``environ``
    (:func:`ca_locations`): the system's when neither is set.

    Blocking, for at most ``timeout`` seconds (then TimeoutError): call it off the loop. The
    first call per setting loads the certificates in a low-priority thread.
    """
    setting = (environ.get(CERT_FILE_ENV, ""), environ.get(CERT_DIR_ENV, ""))
    context = _contexts.get(setting)
    if context is not None:
        return context
    outcome: list[ssl.SSLContext | Exception] = []

    def load() -> None:
        _yield_the_cpu()
        try:
            outcome.append(_new_context(ca_locations(*setting)))
        except Exception as exc:  # noqa: BLE001 - raised below, in the waiting thread
            outcome.append(exc)

    loader = threading.Thread(target=load, name="opa-telemetry CA load", daemon=True)
    loader.start()
    loader.join(timeout)
    if not outcome:
        raise TimeoutError("loading the CA certificates took too long")
    if isinstance(outcome[0], Exception):
        raise outcome[0]
    _contexts[setting] = outcome[0]
    return outcome[0]


class CaLocations:
    """Where trusted CA certificates are: a ``file`` loaded whole ("" for none), the files of
    unhashed directories (each loaded if it holds certificates), and ``directories`` hashed for
    OpenSSL, which it searches when a handshake needs a root."""

    __slots__ = ("directories", "directory_files", "file")

    def __init__(self, file: str, directory_files: list[str], directories: list[str]) -> None:
        self.file = file
        self.directory_files = directory_files
        self.directories = directories


def ca_locations(cert_file: str, cert_dir: str) -> CaLocations:
    """What to trust for these ``SSL_CERT_FILE`` and ``SSL_CERT_DIR`` values ("" when unset).

    As OpenSSL and Go do: ``cert_file`` replaces the system's bundle, the ``:``-separated
    ``cert_dir`` the system's directory, and the file and the directories are trusted together.
    The system's hashed directory stands in for its bundle (the same roots, read lazily). A
    named directory without hash links has each of its files read, as Go reads them.
    """
    paths = ssl.get_default_verify_paths()
    system_dir = paths.openssl_capath
    system_hashed = _is_hashed_directory(system_dir)
    file = cert_file
    directories: list[str] = []
    directory_files: list[str] = []
    if not cert_file and system_hashed:
        directories.append(system_dir)  # in place of the bundle
    elif not cert_file:
        file = paths.openssl_cafile
    for directory in cert_dir.split(":") if cert_dir else [system_dir]:
        if not directory or directory in directories:
            continue
        if _is_hashed_directory(directory):
            directories.append(directory)
        elif cert_dir:
            directory_files.extend(_files_in(directory))
    return CaLocations(file, directory_files, directories)


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


def _files_in(directory: str) -> list[str]:
    """The regular files in ``directory`` (links followed), sorted; none if it cannot be read."""
    try:
        with os.scandir(directory) as entries:
            return sorted(entry.path for entry in entries if entry.is_file())
    except OSError:
        return []


def _new_context(where: CaLocations) -> ssl.SSLContext:
    """A verifying client context trusting what ``where`` names. A named file that exists
    but holds no certificate is an error (the TLS failure says so); a directory's file that
    holds none is passed over, as Go passes it over."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
    context.set_alpn_protocols(["http/1.1"])
    file = where.file if where.file and os.path.isfile(where.file) else ""
    directories = [path for path in where.directories if os.path.isdir(path)]
    if sys.platform == "win32" or not (file or where.directory_files or directories):
        context.load_default_certs()  # the platform's own store
        return context
    if file:
        context.load_verify_locations(cafile=file)
    for path in where.directory_files:
        with contextlib.suppress(ssl.SSLError, OSError):
            context.load_verify_locations(cafile=path)
    if directories:
        # Read lazily by OpenSSL, certificate by certificate, when a handshake needs one; it
        # splits the list at ":" as it splits SSL_CERT_DIR.
        context.load_verify_locations(capath=":".join(directories))
    return context


def _yield_the_cpu() -> None:
    """Lower this thread's priority by 10 nice levels (Linux applies it to the calling thread
    only): the loop's wake-ups come first, and the work still gets its turn on a busy machine."""
    if sys.platform == "linux":
        with contextlib.suppress(OSError):
            niceness = os.getpriority(os.PRIO_PROCESS, 0)
            os.setpriority(os.PRIO_PROCESS, 0, min(19, niceness + 10))
