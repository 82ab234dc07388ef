"""The client's trust, as Go (and so OPA) has it: ``https://`` proxies spoken to over TLS
(TLS inside TLS for an ``https://`` URL), and the CA certificates named by ``SSL_CERT_FILE``
and ``SSL_CERT_DIR``. Real servers on 127.0.0.1 (aiohttp, and a proxy written in
tests/test_client_http.py served over TLS), certificates from private CAs made with trustme.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trustme

from opa_telemetry import Reporter, RequestTimeoutError, TransportError, check_latest, offloop

from .conftest import AiohttpServer, FakeService
from .test_client_http import SERVICE_NAME, running_proxy, tls_server

# A CA private to this module: the proxy's and the servers' certificates come from it.
CA = trustme.CA()


@pytest.fixture
def ca_file(tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    CA.cert_pem.write_to_path(str(path))
    return str(path)


def proxy_tls(ca: trustme.CA = CA, name: str = "127.0.0.1") -> ssl.SSLContext:
    """The TLS an https proxy at 127.0.0.1 serves, its certificate for ``name`` from ``ca``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(name).configure_cert(context)
    return context


# --- https:// proxies ----------------------------------------------------------------------


async def test_https_url_through_an_https_proxy_is_tls_inside_tls(
    aiohttp_server: AiohttpServer, ca_file: str
) -> None:
    seen: list[Any] = []
    port = await tls_server(aiohttp_server, CA, seen, SERVICE_NAME)
    async with running_proxy(port, tls=proxy_tls()) as proxy:
        environ = {
            "HTTPS_PROXY": f"https://user:p%40ss@127.0.0.1:{proxy.port}",
            "SSL_CERT_FILE": ca_file,
        }
        latest = await check_latest(
            "MyApp", "1.0.0", url=f"https://{SERVICE_NAME}", environ=environ
        )
    assert latest.version == "9.9.9"
    [(method, target, headers)] = proxy.requests  # read by the proxy inside its own TLS
    assert (method, target) == ("CONNECT", f"{SERVICE_NAME}:443")
    assert headers["Proxy-Authorization"] == "Basic dXNlcjpwQHNz"  # user:p@ss
    # Through the tunnel the proxy saw only the client's own TLS handshake with the target...
    assert proxy.tunnelled[0][:1] == b"\x16"  # a TLS handshake record
    assert b"POST" not in proxy.tunnelled[0]
    # ...and the target got the request, verified against the same CA as the proxy.
    assert seen[0][:2] == ("POST", "/v1/version")
    assert seen[0][2]["Host"] == SERVICE_NAME
    assert "Proxy-Authorization" not in seen[0][2]


async def test_http_url_through_an_https_proxy_sends_the_absolute_url_inside_its_tls(
    fake_service: FakeService, ca_file: str
) -> None:
    upstream = int(fake_service.url.rsplit(":", 1)[1])
    async with running_proxy(upstream, tls=proxy_tls()) as proxy:
        environ = {
            "HTTP_PROXY": f"https://user:pw@127.0.0.1:{proxy.port}",
            "SSL_CERT_FILE": ca_file,
        }
        latest = await check_latest(
            "MyApp", "1.0.0", url=f"http://{SERVICE_NAME}:8080/prefix", environ=environ
        )
    assert latest.version == "1.20.2"
    [(method, target, headers)] = proxy.requests
    assert (method, target) == ("POST", f"http://{SERVICE_NAME}:8080/prefix/v1/version")
    assert headers["Host"] == f"{SERVICE_NAME}:8080"
    assert headers["Proxy-Authorization"] == "Basic dXNlcjpwdw=="  # user:pw
    assert fake_service.requests[0][2] == "/prefix/v1/version"


async def test_an_https_proxy_that_refuses_the_tunnel_is_one_clear_line(
    aiohttp_server: AiohttpServer, ca_file: str
) -> None:
    port = await tls_server(aiohttp_server, CA, [], SERVICE_NAME)
    async with running_proxy(port, tls=proxy_tls()) as proxy:
        proxy.refuse = 403
        environ = {"HTTPS_PROXY": f"https://127.0.0.1:{proxy.port}", "SSL_CERT_FILE": ca_file}
        with pytest.raises(TransportError) as caught:
            await check_latest("MyApp", "1.0.0", url=f"https://{SERVICE_NAME}", environ=environ)
    assert str(caught.value) == (
        f"proxy 127.0.0.1:{proxy.port} refused the tunnel to {SERVICE_NAME}:443: HTTP 403"
    )
    assert [(m, t) for m, t, _ in proxy.requests] == [("CONNECT", f"{SERVICE_NAME}:443")]


@pytest.mark.parametrize(
    ("issuer", "name", "reason"),
    [
        (trustme.CA(), "127.0.0.1", "unable to get local issuer certificate"),
        (CA, "someone-else.example", "IP address mismatch"),
    ],
    ids=["unknown-ca", "wrong-name"],
)
async def test_an_https_proxy_with_a_certificate_not_trusted_gets_nothing(
    aiohttp_server: AiohttpServer, ca_file: str, issuer: trustme.CA, name: str, reason: str
) -> None:
    """The proxy's certificate is checked as a target's is, against the same CA settings:
    neither the CONNECT (and its credentials) nor a plain request is sent to a proxy that
    fails."""
    port = await tls_server(aiohttp_server, CA, [], SERVICE_NAME)
    async with running_proxy(port, tls=proxy_tls(issuer, name)) as proxy:
        for scheme, variable in (("https", "HTTPS_PROXY"), ("http", "HTTP_PROXY")):
            environ = {
                variable: f"https://u:secret@127.0.0.1:{proxy.port}",
                "SSL_CERT_FILE": ca_file,
            }
            with pytest.raises(TransportError) as caught:
                await check_latest(
                    "MyApp", "1.0.0", url=f"{scheme}://{SERVICE_NAME}", environ=environ
                )
            assert str(caught.value).startswith(
                f"cannot connect to proxy 127.0.0.1:{proxy.port}: TLS certificate not trusted: "
            )
            assert reason in str(caught.value)
            assert "\n" not in str(caught.value)
    assert proxy.requests == []


@pytest.mark.parametrize(
    ("issuer", "name", "reason"),
    [
        (trustme.CA(), SERVICE_NAME, "unable to get local issuer certificate"),
        (CA, "someone-else.example", "Hostname mismatch"),
    ],
    ids=["unknown-ca", "wrong-name"],
)
async def test_a_target_not_trusted_behind_a_trusted_https_proxy_gets_nothing(
    aiohttp_server: AiohttpServer, ca_file: str, issuer: trustme.CA, name: str, reason: str
) -> None:
    """The inner TLS, to the target through the proxy's TLS, is verified as the outer one is:
    a target whose certificate fails is sent no request."""
    seen: list[Any] = []
    port = await tls_server(aiohttp_server, issuer, seen, name)
    async with running_proxy(port, tls=proxy_tls()) as proxy:
        environ = {"HTTPS_PROXY": f"https://127.0.0.1:{proxy.port}", "SSL_CERT_FILE": ca_file}
        with pytest.raises(TransportError) as caught:
            await check_latest("MyApp", "1.0.0", url=f"https://{SERVICE_NAME}", environ=environ)
    assert str(caught.value).startswith(
        f"cannot connect to {SERVICE_NAME}:443: TLS certificate not trusted: "
    )
    assert reason in str(caught.value)
    assert seen == []


async def test_one_deadline_bounds_a_target_that_hangs_inside_the_https_proxy(
    ca_file: str,
) -> None:
    """The target behind the tunnel accepts and never says a word: the inner handshake's reads
    through the outer TLS are bounded by the exchange's one deadline."""
    accepted = asyncio.Event()

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set()
        await reader.read()
        writer.close()

    target = await asyncio.start_server(hang, "127.0.0.1", 0)
    async with target:
        port = target.sockets[0].getsockname()[1]
        async with running_proxy(port, tls=proxy_tls()) as proxy:
            environ = {"HTTPS_PROXY": f"https://127.0.0.1:{proxy.port}", "SSL_CERT_FILE": ca_file}
            with pytest.raises(RequestTimeoutError, match=r"within 0\.5s"):
                await check_latest(
                    "MyApp", "1.0.0", url=f"https://{SERVICE_NAME}", timeout=0.5, environ=environ
                )
        assert accepted.is_set()


# --- SSL_CERT_FILE and SSL_CERT_DIR ---------------------------------------------------------


def hashed_directory(directory: Path, *cas: trustme.CA) -> Path:
    """``directory`` holding each CA's certificate under OpenSSL's subject-hash name
    (``5ad8a5d6.0``), made as ``c_rehash`` makes it."""
    if shutil.which("openssl") is None:
        pytest.fail(
            "the openssl command is not installed: these tests name CA files by their "
            "subject hash, as `openssl rehash` (c_rehash) does, and only openssl computes it"
        )
    directory.mkdir()
    for number, ca in enumerate(cas):
        ca.cert_pem.write_to_path(str(directory / f"private-ca-{number}.pem"))
    rehash = subprocess.run(
        ["openssl", "rehash", str(directory)], capture_output=True, text=True, timeout=30
    )
    if rehash.returncode != 0:  # an OpenSSL before 1.1.0 has no rehash: link by hand
        for number in range(len(cas)):
            pem = directory / f"private-ca-{number}.pem"
            subject_hash = subprocess.run(
                ["openssl", "x509", "-hash", "-noout", "-in", str(pem)],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout.strip()
            (directory / f"{subject_hash}.0").symlink_to(pem.name)
    links = [p.name for p in directory.iterdir() if re.fullmatch(r"[0-9a-f]{8}\.\d+", p.name)]
    assert len(links) == len(cas), sorted(p.name for p in directory.iterdir())
    return directory


def plain_directory(directory: Path, ca: trustme.CA) -> Path:
    """A directory with the CA's PEM under an ordinary name, and a file that is no PEM."""
    directory.mkdir()
    ca.cert_pem.write_to_path(str(directory / "private-ca.pem"))
    (directory / "README").write_text("not a certificate\n")
    return directory


def trust_settings(tmp_path: Path, ca: trustme.CA) -> dict[str, dict[str, str]]:
    ca.cert_pem.write_to_path(str(tmp_path / "private-ca.pem"))
    hashed = str(hashed_directory(tmp_path / "hashed", ca))
    return {
        "file": {"SSL_CERT_FILE": str(tmp_path / "private-ca.pem")},
        "hashed-dir": {"SSL_CERT_DIR": hashed},
        # Go and OpenSSL read SSL_CERT_DIR as a ":"-separated list.
        "dir-list": {"SSL_CERT_DIR": f"{tmp_path / 'missing'}:{tmp_path / 'empty'}:{hashed}"},
        # Go reads every file of SSL_CERT_DIR, hash-named or not.
        "plain-dir": {"SSL_CERT_DIR": str(plain_directory(tmp_path / "plain", ca))},
    }


@pytest.mark.parametrize("setting", ["file", "hashed-dir", "dir-list", "plain-dir"])
async def test_a_private_ca_is_trusted_when_the_environment_names_it(
    aiohttp_server: AiohttpServer, tmp_path: Path, setting: str
) -> None:
    private = trustme.CA()
    (tmp_path / "empty").mkdir()
    environ = trust_settings(tmp_path, private)[setting]
    seen: list[Any] = []
    port = await tls_server(aiohttp_server, private, seen, "localhost")
    url = f"https://localhost:{port}"

    latest = await check_latest("MyApp", "1.0.0", url=url, environ=environ)
    assert latest.version == "9.9.9"
    assert len(seen) == 1

    with pytest.raises(TransportError) as caught:  # the same server, without the setting
        await check_latest("MyApp", "1.0.0", url=url, environ={})
    assert str(caught.value) == (
        f"cannot connect to localhost:{port}: TLS certificate not trusted: "
        "unable to get local issuer certificate"
    )
    assert len(seen) == 1


async def test_ssl_cert_file_and_ssl_cert_dir_are_trusted_together(
    aiohttp_server: AiohttpServer, tmp_path: Path
) -> None:
    """As OpenSSL's default paths and Go's system pool: the file and the directories add up."""
    in_file, in_dir = trustme.CA(), trustme.CA()
    in_file.cert_pem.write_to_path(str(tmp_path / "file-ca.pem"))
    directory = hashed_directory(tmp_path / "hashed", in_dir)
    environ = {"SSL_CERT_FILE": str(tmp_path / "file-ca.pem"), "SSL_CERT_DIR": str(directory)}
    for ca in (in_file, in_dir):
        port = await tls_server(aiohttp_server, ca, [], "localhost")
        latest = await check_latest(
            "MyApp", "1.0.0", url=f"https://localhost:{port}", environ=environ
        )
        assert latest.version == "9.9.9"


def test_ca_locations_keep_the_system_roots_next_to_the_named_ones(tmp_path: Path) -> None:
    """SSL_CERT_DIR adds to the system's bundle, SSL_CERT_FILE to the system's directory (as
    OpenSSL and Go read them); a hashed system directory stands in for the bundle, which is
    then never parsed whole."""
    paths = ssl.get_default_verify_paths()
    hashed = str(hashed_directory(tmp_path / "hashed", trustme.CA()))
    plain = plain_directory(tmp_path / "plain", trustme.CA())
    system = offloop.ca_locations("", "")
    with_dir = offloop.ca_locations("", f"{hashed}:{plain}")
    with_file = offloop.ca_locations(str(tmp_path / "ca.pem"), "")
    if system.directories == [paths.openssl_capath]:  # Debian, Ubuntu, Alpine...
        assert system.file == ""
        assert (with_dir.file, with_dir.directories) == ("", [paths.openssl_capath, hashed])
        assert with_file.directories == [paths.openssl_capath]
    else:  # no hashed system directory: the bundle it is
        assert (system.file, system.directories) == (paths.openssl_cafile, [])
        assert (with_dir.file, with_dir.directories) == (paths.openssl_cafile, [hashed])
        assert with_file.directories == []
    assert with_dir.directory_files == [str(plain / "README"), str(plain / "private-ca.pem")]
    assert with_file.file == str(tmp_path / "ca.pem")
    assert system.directory_files == with_file.directory_files == []


async def test_closing_a_reporter_mid_handshake_inside_the_https_proxy_ends_it_at_once(
    ca_file: str,
) -> None:
    """Cancelling the report shuts the outer (proxy's) socket, so the thread's blocked read
    in the inner handshake returns at once (its deadline is a minute away here)."""
    accepted, closed = asyncio.Event(), asyncio.Event()

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set()
        await reader.read()  # until the proxy passes on the client's end
        closed.set()
        writer.close()

    target = await asyncio.start_server(hang, "127.0.0.1", 0)
    async with target:
        port = target.sockets[0].getsockname()[1]
        async with running_proxy(port, tls=proxy_tls()) as proxy:
            environ = {"HTTPS_PROXY": f"https://127.0.0.1:{proxy.port}", "SSL_CERT_FILE": ca_file}
            reporter = Reporter(
                "MyApp", "1.0.0", url=f"https://{SERVICE_NAME}", timeout=60.0, environ=environ
            )
            reporter.start()
            await asyncio.wait_for(accepted.wait(), 10)
            await reporter.aclose()
            await asyncio.wait_for(closed.wait(), 10)
