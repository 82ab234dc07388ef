"""What embedding the client costs its host: event-loop stalls after ``Reporter.start()``, the
time ``start()`` takes, and what ``import opa_telemetry`` adds. Before/after in one run.

    python bench/client.py                         # this tree, 20 processes per scenario
    python bench/client.py --baseline fd6adb5      # side by side with the client at a commit
    python bench/client.py --processes 5 --only https  # a quick look at some scenarios

Each sample is a fresh Python process (a host app): it optionally imports aiohttp first (a host
that already uses it), imports ``opa_telemetry``, runs a loop (asyncio or uvloop) with a ticker
that sleeps 1 ms and records how late each wake-up is, watches ``--quiet`` seconds with no
client (the machine's own noise), calls ``Reporter.start()`` (timed) and watches ``--window``
seconds more (0.4 s each). A stall is the lateness of the worst wake-up; the CPU columns are
what the client added in the window, on the loop's thread and in the whole process. Scenarios:
``http://`` and ``https://``; aiohttp imported by the host or not; asyncio and uvloop; a local
server that answers, one that refuses (no listener) and one that accepts and never answers
(after the TLS handshake for https). The https servers' certificate comes from a CA made here
(trustme), trusted next to the system's roots (``--ca``). With ``--baseline REV`` the client of
that commit runs the same processes, interleaved one for one with this tree's, so that a shared
machine's drift hits both alike. ``--nice -10`` (as root) shields the host processes from the
rest of a shared machine; both trees get the same.

The import cost is ``python -X importtime -c "import asyncio, logging; import opa_telemetry"``
(the cumulative microseconds of the ``opa_telemetry`` line), median and minimum of
``--processes`` runs per tree. Servers listen on 127.0.0.1 only; every process is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ANSWER = b'{"latest":{"latest_release":"v1.20.2","opa_up_to_date":true}}'

CHILD = r"""
import json, sys, time
scheme, url, preload, loop_name, quiet, window = sys.argv[1:7]
if preload == "aiohttp":
    import aiohttp  # a host that already uses aiohttp
import asyncio, logging
began = time.perf_counter()
import opa_telemetry
import_ms = (time.perf_counter() - began) * 1e3

async def main():
    worst = 0.0
    ticks = 0
    stop = False

    async def ticker():
        nonlocal worst, ticks
        while not stop:
            before = time.perf_counter()
            await asyncio.sleep(0.001)
            worst = max(worst, time.perf_counter() - before - 0.001)
            ticks += 1

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.05)  # the ticker settles
    worst = 0.0
    loop_cpu, all_cpu, ticks = time.thread_time(), time.process_time(), 0
    await asyncio.sleep(float(quiet))
    tick_loop = (time.thread_time() - loop_cpu) / max(ticks, 1)  # the ticker's own CPU per tick
    tick_all = (time.process_time() - all_cpu) / max(ticks, 1)
    quiet_worst, worst = worst, 0.0
    reporter = opa_telemetry.Reporter("Bench", "1.0.0", url=url, timeout=5.0, close_timeout=1.0)
    loop_cpu, all_cpu, ticks = time.thread_time(), time.process_time(), 0
    began = time.perf_counter()
    reporter.start()
    start_us = (time.perf_counter() - began) * 1e6
    await asyncio.sleep(float(window))
    loop_ms = (time.thread_time() - loop_cpu - ticks * tick_loop) * 1e3
    all_ms = (time.process_time() - all_cpu - ticks * tick_all) * 1e3
    after_worst = worst
    stop = True
    await task
    await reporter.aclose()
    print(json.dumps({"quiet_ms": quiet_worst * 1e3, "stall_ms": after_worst * 1e3,
                      "start_us": start_us, "import_ms": import_ms, "loop_cpu_ms": loop_ms,
                      "all_cpu_ms": all_ms, "sent": reporter.reports_sent}))

if loop_name == "uvloop":
    import uvloop
    uvloop.run(main())
else:
    asyncio.run(main())
"""


# --- local servers (in a thread of this process) ------------------------------------------


class Servers:
    """An answering and a hanging server for http and https, and a port that refuses."""

    def __init__(self, tls: ssl.SSLContext) -> None:
        self.tls = tls
        self.ports: dict[tuple[str, str], int] = {}
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> Servers:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    async def _start(self) -> None:
        self.servers = []
        for scheme in ("http", "https"):
            for mode in ("answer", "hang"):
                server = await asyncio.start_server(
                    self._answer if mode == "answer" else self._hang,
                    "127.0.0.1",
                    0,
                    ssl=self.tls if scheme == "https" else None,
                )
                self.servers.append(server)
                self.ports[scheme, mode] = server.sockets[0].getsockname()[1]
        with socket.socket() as reserved:  # bound then closed: nothing listens there
            reserved.bind(("127.0.0.1", 0))
            refused = reserved.getsockname()[1]
        self.ports["http", "refuse"] = self.ports["https", "refuse"] = refused

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            head = (
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(ANSWER)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + ANSWER)
            await writer.drain()
        writer.close()

    async def _hang(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(reader.read(), 30)  # until the client gives up
        writer.close()


def tls_material(directory: Path, ca_setting: str) -> tuple[ssl.SSLContext, dict[str, str]]:
    """A server context with a certificate for 127.0.0.1 from a fresh CA, and the environment
    that makes the client trust it along with the system's roots, as the system does it:

    - ``dir``: ``SSL_CERT_DIR`` is a copy of the system's hashed CA directory (links) plus that
      CA's hash link (made with the ``openssl`` command); the system's bundle file stays the
      default file. What a client on Debian sees with no setting at all.
    - ``bundle``: ``SSL_CERT_FILE`` is the system's bundle followed by that CA (so loading it
      costs what loading the system's roots costs).
    """
    import trustme

    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    paths = ssl.get_default_verify_paths()
    if ca_setting == "bundle":
        bundle = directory / "bundle.pem"
        roots = Path(paths.cafile).read_bytes() if paths.cafile else b""
        bundle.write_bytes(roots + b"\n" + ca.cert_pem.bytes())
        return context, {"SSL_CERT_FILE": str(bundle)}
    hashed = directory / "certs"
    hashed.mkdir()
    for entry in Path(paths.capath or "/etc/ssl/certs").iterdir():
        (hashed / entry.name).symlink_to(entry.resolve())
    ca_file = directory / "bench-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    subject_hash = subprocess.run(
        ["openssl", "x509", "-hash", "-noout", "-in", str(ca_file)],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.strip()
    (hashed / f"{subject_hash}.0").symlink_to(ca_file)
    return context, {"SSL_CERT_DIR": str(hashed)}


# --- the client trees ---------------------------------------------------------------------


def client_tree(directory: Path, revision: str | None) -> Path:
    """A directory holding an ``opa_telemetry`` package: this tree's ``client/``, or the one of
    ``revision``; it goes on PYTHONPATH, ahead of any installed copy."""
    target = directory / (revision or "current")
    package = target / "opa_telemetry"
    if revision is None:
        shutil.copytree(REPO / "client", package, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", revision, "client"],
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
        target.mkdir(parents=True)
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True, timeout=60)
        (target / "client").rename(package)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(package)], check=True, timeout=60)
    return target


def run_child(tree: Path, args: list[str], trust: dict[str, str], nice: int) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSL_CERT_")}
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "DO_NOT_TRACK"):
        env.pop(name, None)
    env.update(trust, PYTHONPATH=str(tree))
    command = [sys.executable, "-c", CHILD, *args]
    if nice:
        command = ["nice", "-n", str(nice), *command]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    if result.returncode != 0 or result.stderr:
        raise RuntimeError(f"child failed ({result.returncode}): {result.stderr[-2000:]}")
    values: dict[str, float] = json.loads(result.stdout)
    return values


def import_cost_us(tree: Path) -> int:
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import asyncio, logging; import opa_telemetry"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(tree)},
        timeout=60,
        check=True,
    )
    for line in result.stderr.splitlines():
        fields = [field.strip() for field in line.split("|")]
        if len(fields) == 3 and fields[2] == "opa_telemetry":
            return int(fields[1])
    raise RuntimeError("opa_telemetry not in the import times")


def scenarios(only: str) -> Iterator[tuple[str, str, str, str]]:
    for scheme in ("http", "https"):
        for preload in ("none", "aiohttp"):
            for loop in ("asyncio", "uvloop"):
                for server in ("answer", "refuse", "hang"):
                    name = f"{scheme} {preload} {loop} {server}"
                    if all(word in name.split() for word in only.split(",") if word):
                        yield scheme, preload, loop, server


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=20, help="per scenario and tree")
    parser.add_argument("--baseline", metavar="REV", help="also run the client of this commit")
    parser.add_argument(
        "--quiet",
        type=float,
        default=0.4,
        help="seconds watched before start (as long as --window by default: both windows then "
        "have the same chance to catch the machine's own hiccups)",
    )
    parser.add_argument("--window", type=float, default=0.4, help="seconds watched after start")
    parser.add_argument("--only", default="", help="comma-separated words a scenario must have")
    parser.add_argument(
        "--ca",
        choices=["dir", "bundle"],
        default="dir",
        help="how the https server's CA is trusted: added to a copy of the system's hashed CA "
        "directory (SSL_CERT_DIR, the system's default way), or to a copy of its bundle "
        "(SSL_CERT_FILE, which the client must then load whole)",
    )
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="run the host processes at this niceness (-10 as root shields them from other "
        "work on a shared machine; the client's own threads keep their offset from the host)",
    )
    args = parser.parse_args()
    if not (1 <= args.processes <= 200 and 0 < args.window <= 5 and 0 < args.quiet <= 5):
        parser.error("--processes in [1, 200], --window and --quiet in (0, 5]")
    with tempfile.TemporaryDirectory(prefix="opa-telemetry-client-bench-") as tmp:
        directory = Path(tmp)
        trees = {"after": client_tree(directory, None)}
        if args.baseline:
            trees = {"before": client_tree(directory, args.baseline), **trees}
        context, trust = tls_material(directory, args.ca)
        names = list(trees)
        print(
            f"{args.processes} fresh processes per scenario and tree (niceness {args.nice}, "
            f"CA by {args.ca}); stall = worst lateness of a 1 ms sleep in the {args.window:g} s "
            f"after start(); quiet = the same in the {args.quiet:g} s before (the machine's "
            "noise); ms, median / max. CPU: ms the client added in that window, on the "
            "loop's thread and in the whole process (medians, the ticker's CPU taken out)."
        )
        columns = [f"{n} stall" for n in names] + [f"{n} quiet" for n in names]
        columns += [f"{n} loop CPU" for n in names] + [f"{n} all CPU" for n in names]
        print("| scenario | " + " | ".join(columns) + " | sent |")
        print("|---" * (2 + len(columns)) + "|")
        starts: dict[str, list[float]] = {name: [] for name in names}
        worst: dict[str, float] = dict.fromkeys(names, 0.0)
        with Servers(context) as servers:
            for scheme, preload, loop, server in scenarios(args.only):
                url = f"{scheme}://127.0.0.1:{servers.ports[scheme, server]}"
                child_args = [scheme, url, preload, loop, str(args.quiet), str(args.window)]
                samples: dict[str, list[dict[str, float]]] = {name: [] for name in names}
                for _ in range(args.processes):
                    for name in names:
                        samples[name].append(run_child(trees[name], child_args, trust, args.nice))
                cells, quiet_cells, loop_cells, all_cells, sent = [], [], [], [], []
                for name in names:
                    stalls = [s["stall_ms"] for s in samples[name]]
                    quiets = [s["quiet_ms"] for s in samples[name]]
                    starts[name] += [s["start_us"] for s in samples[name]]
                    worst[name] = max(worst[name], max(stalls))
                    cells.append(f"{statistics.median(stalls):.2f} / {max(stalls):.2f}")
                    quiet_cells.append(f"{statistics.median(quiets):.2f} / {max(quiets):.2f}")
                    loop_cells.append(
                        f"{statistics.median(s['loop_cpu_ms'] for s in samples[name]):.1f}"
                    )
                    all_cells.append(
                        f"{statistics.median(s['all_cpu_ms'] for s in samples[name]):.1f}"
                    )
                    sent.append(str(sum(int(s["sent"]) for s in samples[name])))
                scenario = f"{scheme} {preload} {loop} {server}"
                row = [scenario, *cells, *quiet_cells, *loop_cells, *all_cells, "/".join(sent)]
                print("| " + " | ".join(row) + " |", flush=True)
        print()
        for name in names:
            values = starts[name]
            median, top = statistics.median(values), max(values)
            print(f"{name}: worst stall {worst[name]:.2f} ms; start() median {median:.1f} µs, "
                  f"max {top:.1f} µs")  # fmt: skip
        imports: dict[str, list[int]] = {name: [] for name in names}
        for _ in range(args.processes):
            for name in names:
                imports[name].append(import_cost_us(trees[name]))
        for name in names:
            values = [v / 1000 for v in imports[name]]
            print(f"{name}: import opa_telemetry over asyncio+logging (-X importtime): median "
                  f"{statistics.median(values):.1f} ms, min {min(values):.1f} ms")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
