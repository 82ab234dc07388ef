"""The baseline for ``make bench``: a bare aiohttp app doing only what any handler must.

``POST /v1/version`` reads the body, parses it as JSON and answers a static JSON object of the
same size as the real server's answer; ``GET /repos/.../releases/latest`` answers a static
object. No validation, no storage: the ceiling the real server is measured against, on the same
event loop and JSON library, in the same number of processes (SO_REUSEPORT).

``--await-batch`` adds only the skeleton of a durable acknowledgement: each report request
goes through the real server's ingest queue (``opa_telemetry_server.services.ingest.Ingest``:
queue a future, wait; one writer task takes what is queued and resolves the batch), whose
"commit" is one round trip to a worker thread that does nothing. Still no validation and no
storage: it shows what waiting for a commit costs by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import signal
import sys
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

from aiohttp import web

from opa_telemetry_server.services.ingest import Ingest
from opa_telemetry_server.storage import Storage

ANSWER = {
    "latest": {
        "download": "https://openpolicyagent.org/downloads/v1.20.2/opa_linux_amd64",
        "release_notes": "https://github.com/open-policy-agent/opa/releases/tag/v1.20.2",
        "latest_release": "v1.20.2",
        "opa_up_to_date": False,
    }
}


def _std_dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


class NoopStorage:
    """Stands in for the database under the project's own ingest queue: each batch makes one
    round trip to a thread that does nothing, where the real server's runs SQL."""

    def __init__(self) -> None:
        self._thread = ThreadPoolExecutor(1)

    async def write_batch(self, reports: Sequence[Any], checks: Iterable[str], now: float) -> None:
        await asyncio.get_running_loop().run_in_executor(self._thread, len, reports)

    def close(self) -> None:
        self._thread.shutdown()


INGEST = web.AppKey("ingest", Ingest)


async def skeleton_ingest(app: web.Application) -> AsyncIterator[None]:
    """The real server's :class:`Ingest` (queue, batching, wake-ups) over :class:`NoopStorage`."""
    storage = NoopStorage()
    app[INGEST] = ingest = Ingest(cast(Storage, storage), queue_size=10000, batch_size=1024)
    writer = asyncio.create_task(ingest.run())
    yield
    await ingest.stop()
    await writer
    storage.close()


def make_app(fast: bool, await_batch: bool = False) -> web.Application:
    loads: Callable[[bytes], Any] = json.loads
    dumps: Callable[[Any], bytes] = _std_dumps
    if fast:
        import orjson

        loads, dumps = orjson.loads, orjson.dumps
    answer = dumps(ANSWER)
    check = dumps({"tag_name": "v1.20.2", "html_url": ANSWER["latest"]["release_notes"]})

    async def post_version(request: web.Request) -> web.Response:
        loads(await request.read())
        if await_batch:
            await request.app[INGEST].submit("opa")
        return web.Response(body=answer, content_type="application/json")

    async def get_latest(request: web.Request) -> web.Response:
        return web.Response(body=check, content_type="application/json")

    app = web.Application(client_max_size=8192)
    app.router.add_post("/v1/version", post_version)
    app.router.add_get("/repos/{owner}/{repo}/releases/latest", get_latest)
    if await_batch:
        app.cleanup_ctx.append(skeleton_ingest)
    return app


async def serve(host: str, port: int, fast: bool, reuse_port: bool, await_batch: bool) -> None:
    runner = web.AppRunner(make_app(fast, await_batch), access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port, reuse_port=reuse_port).start()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    await stop.wait()
    await runner.cleanup()


def run_worker(host: str, port: int, fast: bool, reuse_port: bool, await_batch: bool) -> None:
    if fast:
        import uvloop

        uvloop.run(serve(host, port, fast, reuse_port, await_batch))
    else:
        asyncio.run(serve(host, port, fast, reuse_port, await_batch))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--no-fast", dest="fast", action="store_false")
    parser.add_argument(
        "--await-batch",
        action="store_true",
        help="wait for a no-op batch commit before answering (see above)",
    )
    args = parser.parse_args()
    if args.workers == 1:
        run_worker(args.host, args.port, args.fast, False, args.await_batch)
        return 0
    context = multiprocessing.get_context("spawn")
    worker_args = (args.host, args.port, args.fast, True, args.await_batch)
    workers = [context.Process(target=run_worker, args=worker_args)
               for _ in range(args.workers)]  # fmt: skip
    for worker in workers:
        worker.start()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    signal.sigwait({signal.SIGINT, signal.SIGTERM})
    for worker in workers:
        worker.terminate()
    for worker in workers:
        worker.join(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
