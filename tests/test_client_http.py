"""The client's own HTTP: TLS, proxies, redirects, codings and framing, against local servers
(a CA and certificates made here with trustme; a proxy written here that forwards to 127.0.0.1).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import os
import ssl
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web

from opa_telemetry import (
    AnswerError,
    Reporter,
    ServiceError,
    TransportError,
    check_latest,
)
from opa_telemetry.cli import main as client_main
from opa_telemetry.errors import RequestTimeoutError
from opa_telemetry.proxies import Proxy, parse_proxy, proxy_for, uses_proxy
from opa_telemetry.wire import (
    MAX_ANSWER_BYTES,
    Head,
    body_framing,
    chunk_size,
    decode_content,
    parse_head,
)

from .conftest import AiohttpServer, FakeService

ANSWER = {
    "latest": {
        "download": "https://example.test/opa",
        "release_notes": "https://example.test/notes",
        "latest_release": "v9.9.9",
        "opa_up_to_date": False,
    }
}
SERVICE_NAME = "telemetry.example"  # never resolved: only a proxy or the CA knows it


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def answering_app(seen: list[tuple[str, str, dict[str, str], bytes]]) -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        seen.append((request.method, request.path, dict(request.headers), await request.read()))
        return web.json_response(ANSWER)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def tls_server(
    aiohttp_server: AiohttpServer, ca: trustme.CA, seen: list[Any], *names: str
) -> int:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*(names or ("127.0.0.1", "localhost"))).configure_cert(context)
    server = await aiohttp_server(answering_app(seen), host="127.0.0.1", ssl=context)
    assert server.port is not None
    return server.port


# --- TLS ---------------------------------------------------------------------------------


async def test_https_is_verified_against_ssl_cert_file(
    aiohttp_server: AiohttpServer, ca: trustme.CA, ca_file: str
) -> None:
    seen: list[Any] = []
    port = await tls_server(aiohttp_server, ca, seen)
    latest = await check_latest(
        "MyApp", "1.0.0", url=f"https://localhost:{port}", environ={"SSL_CERT_FILE": ca_file}
    )
    assert latest.version == "9.9.9"
    assert seen[0][:2] == ("POST", "/v1/version")


async def test_https_refuses_a_certificate_the_system_roots_do_not_trust(
    aiohttp_server: AiohttpServer, ca: trustme.CA
) -> None:
    port = await tls_server(aiohttp_server, ca, [])
    with pytest.raises(TransportError, match="certificate not trusted") as caught:
        await check_latest("MyApp", "1.0.0", url=f"https://localhost:{port}", environ={})
    assert str(caught.value).startswith(f"cannot connect to localhost:{port}: TLS")


async def test_https_checks_the_host_name(
    aiohttp_server: AiohttpServer, ca: trustme.CA, ca_file: str
) -> None:
    port = await tls_server(aiohttp_server, ca, [], "someone-else.example")
    with pytest.raises(TransportError, match="certificate not trusted"):
        await check_latest(
            "MyApp", "1.0.0", url=f"https://localhost:{port}", environ={"SSL_CERT_FILE": ca_file}
        )


async def test_reporter_reports_over_https_with_ssl_cert_file_from_the_environment(
    aiohttp_server: AiohttpServer,
    ca: trustme.CA,
    ca_file: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", ca_file)
    seen: list[Any] = []
    port = await tls_server(aiohttp_server, ca, seen)
    done = asyncio.Event()
    async with Reporter(
        "MyApp", "1.0.0", url=f"https://127.0.0.1:{port}", on_latest=lambda _: done.set()
    ):
        await asyncio.wait_for(done.wait(), 10)
    assert len(seen) == 1


# --- proxies -----------------------------------------------------------------------------


class FakeProxy:
    """An HTTP proxy on 127.0.0.1 that sends everything to ``upstream_port`` on 127.0.0.1,
    whatever host the request names (so no name is ever resolved). It records each request
    line and its headers, and the first bytes the client sent through each tunnel;
    ``refuse`` (a status, e.g. 403) answers that to everything. Served over TLS, it is an
    ``https://`` proxy."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.tunnelled: list[bytes] = []
        self.refuse = 0
        self.port = 0
        self.handlers: set[asyncio.Task[Any]] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        up_writer: asyncio.StreamWriter | None = None
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            line, *fields = head.decode("latin-1").split("\r\n")
            method, target, version = line.split(" ")
            headers = dict(f.split(": ", 1) for f in fields if f)
            self.requests.append((method, target, headers))
            if self.refuse:
                writer.write(b"HTTP/1.1 %d Refused\r\nContent-Length: 0\r\n\r\n" % self.refuse)
                return
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            if method == "CONNECT":
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                first = await reader.read(65536)
                self.tunnelled.append(first)
                up_writer.write(first)
            else:  # absolute-form -> origin-form for the server
                path = "/" + target.split("://", 1)[1].split("/", 1)[1]
                up_writer.write(
                    f"{method} {path} {version}\r\n".encode() + head.split(b"\r\n", 1)[1]
                )
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            writers = [each for each in (writer, up_writer) if each is not None]
            for each in writers:
                each.close()
            for each in writers:
                with contextlib.suppress(OSError):
                    await each.wait_closed()


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            if writer.can_write_eof():
                writer.write_eof()
            else:  # TLS cannot half-close: the whole connection ends
                writer.close()


@contextlib.asynccontextmanager
async def running_proxy(
    upstream_port: int, tls: ssl.SSLContext | None = None
) -> AsyncIterator[FakeProxy]:
    proxy = FakeProxy(upstream_port)
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", 0, ssl=tls)
    proxy.port = server.sockets[0].getsockname()[1]
    async with server:
        yield proxy
        server.close()
        if proxy.handlers:  # every connection it served is closed before the test ends
            await asyncio.wait(proxy.handlers, timeout=10)


async def test_http_url_goes_through_http_proxy_in_absolute_form(
    fake_service: FakeService,
) -> None:
    upstream = int(fake_service.url.rsplit(":", 1)[1])
    async with running_proxy(upstream) as proxy:
        environ = {"HTTP_PROXY": f"http://user:p%40ss@127.0.0.1:{proxy.port}"}
        latest = await check_latest(
            "MyApp", "1.0.0", url=f"http://{SERVICE_NAME}:8080/prefix", environ=environ
        )
    assert latest.version == "1.20.2"
    [(method, target, headers)] = proxy.requests
    assert (method, target) == ("POST", f"http://{SERVICE_NAME}:8080/prefix/v1/version")
    assert headers["Host"] == f"{SERVICE_NAME}:8080"
    assert headers["Proxy-Authorization"] == "Basic dXNlcjpwQHNz"  # user:p@ss
    assert fake_service.requests[0][2] == "/prefix/v1/version"


async def test_https_url_goes_through_a_connect_tunnel_and_verifies_the_target(
    aiohttp_server: AiohttpServer, ca: trustme.CA, ca_file: str
) -> None:
    seen: list[Any] = []
    port = await tls_server(aiohttp_server, ca, seen, SERVICE_NAME)
    async with running_proxy(port) as proxy:
        environ = {"HTTPS_PROXY": f"127.0.0.1:{proxy.port}", "SSL_CERT_FILE": ca_file}
        latest = await check_latest(
            "MyApp", "1.0.0", url=f"https://{SERVICE_NAME}", environ=environ
        )
    assert latest.version == "9.9.9"
    assert [(m, t) for m, t, _ in proxy.requests] == [("CONNECT", f"{SERVICE_NAME}:443")]
    assert seen[0][2]["Host"] == SERVICE_NAME  # the server saw the request itself, over TLS


async def test_a_proxy_that_refuses_the_tunnel_is_a_transport_error(
    aiohttp_server: AiohttpServer, ca: trustme.CA
) -> None:
    port = await tls_server(aiohttp_server, ca, [], SERVICE_NAME)
    async with running_proxy(port) as proxy:
        proxy.refuse = 403
        with pytest.raises(TransportError, match=r"refused the tunnel .*: HTTP 403$"):
            await check_latest(
                "MyApp",
                "1.0.0",
                url=f"https://{SERVICE_NAME}",
                environ={"https_proxy": f"http://127.0.0.1:{proxy.port}"},
            )
        # 407: the proxy wants credentials, and the message says where they go.
        proxy.refuse = 407
        for setting, hint in (
            (f"http://127.0.0.1:{proxy.port}", "give them in the proxy URL"),
            (f"http://u:wrong@127.0.0.1:{proxy.port}", "refused the credentials"),
        ):
            with pytest.raises(TransportError) as raised:
                await check_latest(
                    "MyApp", "1.0.0", url=f"https://{SERVICE_NAME}",
                    environ={"https_proxy": setting},
                )  # fmt: skip
            assert "HTTP 407" in str(raised.value) and hint in str(raised.value)
            assert "wrong" not in str(raised.value)


async def test_loopback_targets_never_use_the_proxy(
    fake_service: FakeService, unused_tcp_port: int
) -> None:
    environ = {"HTTP_PROXY": f"http://127.0.0.1:{unused_tcp_port}"}  # nothing listens there
    latest = await check_latest("MyApp", "1.0.0", url=fake_service.url, environ=environ)
    assert latest.version == "1.20.2"


async def test_an_unreachable_proxy_is_named_in_the_error(unused_tcp_port: int) -> None:
    environ = {"HTTP_PROXY": f"http://127.0.0.1:{unused_tcp_port}"}
    with pytest.raises(TransportError) as caught:
        await check_latest("MyApp", "1.0.0", url=f"http://{SERVICE_NAME}", environ=environ)
    assert str(caught.value) == (
        f"cannot connect to proxy 127.0.0.1:{unused_tcp_port}: connection refused"
    )


@pytest.mark.parametrize(
    ("host", "port", "no_proxy", "proxied"),
    [
        ("example.com", 80, "", True),
        ("localhost", 80, "", False),
        ("127.0.0.5", 80, "", False),
        ("::1", 80, "", False),
        ("example.com", 80, "*", False),
        ("example.com", 80, "example.com", False),
        ("api.example.com", 80, "example.com", False),
        ("notexample.com", 80, "example.com", True),
        ("example.com", 80, ".example.com", True),  # Go: the leading-dot form: subdomains
        ("api.example.com", 80, ".example.com", False),
        ("api.example.com", 80, "*.example.com", False),
        ("example.com", 80, "example.com:8080", True),  # a port must match
        ("example.com", 8080, " Example.COM:8080 ", False),
        ("10.1.2.3", 80, "10.0.0.0/8", False),
        ("11.1.2.3", 80, "10.0.0.0/8", True),
        ("10.1.2.3", 80, "10.1.2.3", False),
        ("10.1.2.3", 443, "10.1.2.3:80", True),
        ("2001:db8::1", 80, "2001:db8::/32", False),
        ("2001:db8::1", 80, "[2001:db8::1]:80", False),
        ("example.com", 80, "nonsense/99, ,other.org", True),
    ],
)
def test_no_proxy_is_read_as_go_reads_it(
    host: str, port: int, no_proxy: str, proxied: bool
) -> None:
    assert uses_proxy(host, port, no_proxy) is proxied


def test_proxy_settings_are_read_as_go_reads_them() -> None:
    env = {"HTTP_PROXY": "proxy:3128", "http_proxy": "http://lower:1", "https_proxy": "h:9"}
    assert proxy_for("http", "example.com", 80, env) == Proxy("http", "proxy", 3128)
    assert proxy_for("https", "example.com", 443, env) == Proxy("http", "h", 9)
    assert proxy_for("http", "example.com", 80, {**env, "NO_PROXY": "example.com"}) is None
    assert proxy_for("https", "example.com", 443, {"HTTP_PROXY": "p:1"}) is None
    assert parse_proxy("p").port == 80
    assert parse_proxy("HTTPS://u:p@p") == Proxy("https", "p", 443, "Basic dTpw")  # u:p
    assert parse_proxy("https://p:3129").port == 3129
    with pytest.raises(TransportError, match="CGI"):
        proxy_for("http", "example.com", 80, {"HTTP_PROXY": "p:1", "REQUEST_METHOD": "GET"})
    with pytest.raises(TransportError) as caught:
        parse_proxy("socks5://p:1080")
    assert str(caught.value) == (
        "unsupported proxy scheme 'socks5' (http:// and https:// proxies are)"
    )


# --- redirects, codings, framing -----------------------------------------------------------


async def serve(aiohttp_server: AiohttpServer, handler: Callable[..., Any]) -> str:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    server = await aiohttp_server(app, host="127.0.0.1")
    return str(server.make_url("")).rstrip("/")


@pytest.mark.parametrize(("status", "method"), [(307, "POST"), (308, "POST"), (302, "GET")])
async def test_redirects_are_followed_as_go_follows_them(
    aiohttp_server: AiohttpServer, status: int, method: str
) -> None:
    seen: list[tuple[str, str, bytes]] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        seen.append((request.method, request.path, await request.read()))
        if request.path == "/old/v1/version":
            return web.Response(status=status, headers={"Location": "/new/v1/version"})
        return web.json_response(ANSWER)

    url = await serve(aiohttp_server, handle)
    latest = await check_latest("MyApp", "1.0.0", url=url + "/old")
    assert latest.version == "9.9.9"
    assert [(m, p) for m, p, _ in seen] == [
        ("POST", "/old/v1/version"),
        (method, "/new/v1/version"),
    ]
    assert (seen[1][2] == seen[0][2]) is (method == "POST")


async def test_gzip_and_chunked_answers_are_read(aiohttp_server: AiohttpServer) -> None:
    async def handle(request: web.Request) -> web.StreamResponse:
        assert request.headers["Accept-Encoding"] == "gzip"
        response = web.StreamResponse(
            headers={"Content-Type": "application/json", "Content-Encoding": "gzip"}
        )
        response.enable_chunked_encoding()
        await response.prepare(request)
        data = gzip.compress(json.dumps(ANSWER).encode())
        for start in range(0, len(data), 10):
            await response.write(data[start : start + 10])
        await response.write_eof()
        return response

    latest = await check_latest("MyApp", "1.0.0", url=await serve(aiohttp_server, handle))
    assert latest.version == "9.9.9"


async def test_a_gzip_bomb_is_refused_past_the_cap(aiohttp_server: AiohttpServer) -> None:
    bomb = gzip.compress(b" " * (10 * MAX_ANSWER_BYTES))  # ~640 KiB of JSON whitespace, 1 KiB

    async def handle(request: web.Request) -> web.Response:
        return web.Response(body=bomb, headers={"Content-Encoding": "gzip"})

    with pytest.raises(AnswerError, match="larger than 65536"):
        await check_latest("MyApp", "1.0.0", url=await serve(aiohttp_server, handle))


async def test_service_error_details_are_kept_and_printed_by_check(
    aiohttp_server: AiohttpServer, capsys: pytest.CaptureFixture[str]
) -> None:
    async def handle(request: web.Request) -> web.Response:
        body = {"error": "invalid report", "details": ["version: must be a string", "id: empty"]}
        return web.json_response(body, status=400)

    url = await serve(aiohttp_server, handle)
    with pytest.raises(ServiceError) as caught:
        await check_latest("MyApp", "1.0.0", url=url)
    assert caught.value.details == ("version: must be a string", "id: empty")
    code = await asyncio.to_thread(client_main, ["check", "--url", url])
    assert code == 1
    assert capsys.readouterr() == (
        "",
        "error: service answered HTTP 400: invalid report (version: must be a string; id: empty)\n",
    )


async def test_check_words_a_refused_connection_plainly(
    unused_tcp_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{unused_tcp_port}"
    code = await asyncio.to_thread(client_main, ["check", "--url", url])
    assert code == 1
    assert capsys.readouterr() == (
        "",
        f"error: cannot connect to 127.0.0.1:{unused_tcp_port}: connection refused\n",
    )


async def test_a_server_that_accepts_and_says_nothing_times_out(
    aiohttp_server: AiohttpServer,
) -> None:
    async def handle(request: web.Request) -> web.Response:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    with pytest.raises(RequestTimeoutError, match=r"within 0\.2s"):
        await check_latest("MyApp", "1.0.0", url=await serve(aiohttp_server, handle), timeout=0.2)


def test_answer_heads_are_parsed_strictly() -> None:
    head = parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\nx-a: 2\r\n\r\n")
    assert (head.status, head.headers) == (200, {"content-length": "5", "x-a": "1, 2"})
    assert body_framing(head, "POST").length == 5
    for bad in (b"SSH-2.0\r\n\r\n", b"HTTP/1.1 2x0 OK\r\n\r\n", b"HTTP/1.1 200 OK\r\n no\r\n\r\n"):
        with pytest.raises(TransportError):
            parse_head(bad)
    with pytest.raises(TransportError, match="Content-Length"):
        body_framing(Head(200, {"content-length": "5, 6"}), "POST")
    assert body_framing(Head(200, {"transfer-encoding": "gzip, chunked"}), "POST").kind == (
        "chunked"
    )
    assert body_framing(Head(204, {"content-length": "9"}), "POST").kind == "none"
    assert body_framing(Head(200, {}), "POST").kind == "close"
    assert chunk_size(b"1A;ext=1\r\n") == 26
    with pytest.raises(TransportError):
        chunk_size(b"zz\r\n")
    assert decode_content(gzip.compress(b"{}"), "GZIP") == b"{}"
    with pytest.raises(AnswerError, match="corrupt"):
        decode_content(gzip.compress(b"{}")[:-4], "gzip")
    with pytest.raises(AnswerError, match="unsupported"):
        decode_content(b"x", "br")


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_report_imports_nothing_and_starts_no_thread_pool(
    scheme: str, ca: trustme.CA, tmp_path: Path
) -> None:
    """Everything the transport needs is imported with the package: a report on a host's loop
    imports no module (an import there would hold the GIL and stall the loop), and leaves no
    default executor behind (its first use blocks the loop while its thread starts)."""
    import subprocess

    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    ca.issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(
        str(tmp_path / "server.pem")
    )
    code = (
        "import asyncio, ssl, sys, opa_telemetry\n"
        "async def main():\n"
        "    tls = None\n"
        f"    if {scheme == 'https'}:\n"
        "        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)\n"
        f"        tls.load_cert_chain({str(tmp_path / 'server.pem')!r})\n"
        "    server = await asyncio.start_server(answer, '127.0.0.1', 0, ssl=tls)\n"
        "    port = server.sockets[0].getsockname()[1]\n"
        "    before = set(sys.modules)\n"
        "    done = asyncio.Event()\n"
        f"    r = opa_telemetry.Reporter('MyApp', '1.0.0', url=f'{scheme}://localhost:{{port}}',\n"
        "                               on_latest=lambda _: done.set())\n"
        "    r.start()\n"
        "    await asyncio.wait_for(done.wait(), 20)\n"
        "    await r.aclose()\n"
        "    server.close()\n"
        "    await server.wait_closed()\n"
        "    print(sorted(set(sys.modules) - before))\n"
        "    print(asyncio.get_running_loop()._default_executor)\n"
        "async def answer(reader, writer):\n"
        "    await reader.readuntil(b'\\r\\n\\r\\n')\n"
        '    body = b\'{"latest": {"opa_up_to_date": true}}\'\n'
        "    head = b'HTTP/1.1 200 OK\\r\\nContent-Length: %d\\r\\n\\r\\n' % len(body)\n"
        "    writer.write(head + body)\n"
        "    writer.close()\n"
        "asyncio.run(main())\n"
    )
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SSL_CERT_FILE": str(tmp_path / "ca.pem")},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["[]", "None"]


async def test_closing_a_reporter_mid_request_closes_its_connection_at_once() -> None:
    """The exchange runs in a thread: cancelling its await must also end the thread's blocked
    read (its deadline is a minute away here), or the connection would outlive the reporter."""
    accepted, closed = asyncio.Event(), asyncio.Event()

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set()
        await reader.read()  # until the client closes its side
        closed.set()
        writer.close()

    server = await asyncio.start_server(hang, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        reporter = Reporter("MyApp", "1.0.0", url=f"http://127.0.0.1:{port}", timeout=60.0)
        reporter.start()
        await asyncio.wait_for(accepted.wait(), 10)
        await reporter.aclose()
        await asyncio.wait_for(closed.wait(), 10)


def test_system_roots_come_from_the_hashed_directory_without_parsing_the_bundle(
    tmp_path: Path,
) -> None:
    """Where the system's CA directory is hashed for OpenSSL, the context looks roots up there
    one by one instead of parsing the whole bundle (30-150 ms of CPU); a named SSL_CERT_FILE
    is still loaded whole, and a directory without hash links is not taken for one."""
    from opa_telemetry import offloop

    (tmp_path / "README").write_text("no hash links here")
    assert not offloop._is_hashed_directory(str(tmp_path))
    (tmp_path / "5ad8a5d6.0").write_text("")
    assert offloop._is_hashed_directory(str(tmp_path))

    system_dir = ssl.get_default_verify_paths().openssl_capath
    loaded = offloop.tls_context({}, 30).cert_store_stats()["x509_ca"]
    if offloop._is_hashed_directory(system_dir):
        assert loaded == 0  # nothing parsed up front: OpenSSL reads the one root it needs
    else:
        assert loaded > 0  # no such directory: the bundle it is
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    named = offloop.tls_context({"SSL_CERT_FILE": str(tmp_path / "ca.pem")}, 30)
    assert named.cert_store_stats()["x509_ca"] == 1
