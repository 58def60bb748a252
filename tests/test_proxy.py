"""The environment a company network sets: a forward proxy (HTTP_PROXY, NO_PROXY) and a private CA
(SSL_CERT_FILE), each real on 127.0.0.1: proxy.py as the proxy, trustme's CA for a TLS server."""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
import trustme

from batchrun.client import ChatClient, tls_context
from batchrun.errors import EndpointDown
from batchrun.simulator import RunningSimulator
from tests.conftest import TEST_KEY, article_rows, invoke, read_output, write_job
from tests.stub_server import Reply, Request, StubServer, completion, serve_stub

MODELS = Reply(200, {"object": "list", "data": [{"id": "grok-4.3", "object": "model"}]})
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "SSL_CERT_FILE", "SSL_CERT_DIR")


@pytest.fixture(autouse=True)
def no_proxy_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only what each test sets: the developer's own proxy must not carry these requests."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def proxy() -> Iterator[str]:
    """A real forward proxy (proxy.py) on loopback; it marks what it forwards with `Via: 1.1 proxy.py`."""
    port = free_port()
    cmd = [sys.executable, "-m", "proxy", "--hostname", "127.0.0.1", "--port", str(port)]
    cmd += ["--num-workers", "1", "--num-acceptors", "1"]
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:  # ready once it accepts a connection
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, "proxy.py did not start"
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


def gateway(request: Request) -> Reply:
    """The target. Not the simulator: proxy.py adds a second `Content-Length` to a POST on a reused
    connection when the client wrote the name in lower case (as httpx does), and the simulator's
    strict parser refuses that; this stub keeps one of the two."""
    return MODELS if request.path.endswith("/models") else Reply(200, completion("Via the proxy."))


def run_through(tmp_path: Path) -> list[Request]:
    """A 3-row run against the stub; the chat requests it received."""
    with serve_stub(gateway) as stub:
        job = write_job(tmp_path, article_rows(3), stub.base_url)
        result = invoke("run", str(job))
        assert result.exit_code == 0, result.stderr
        assert read_output(job)["content"].to_list() == ["Via the proxy."] * 3
        return stub.chat_requests()


def test_requests_go_through_the_proxy_that_http_proxy_names(
    tmp_path: Path, proxy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loopback too: only NO_PROXY exempts a host (as curl and httpx do)."""
    monkeypatch.setenv("HTTP_PROXY", proxy)

    requests = run_through(tmp_path)

    assert [r.headers.get("via", "").startswith("1.1 proxy.py") for r in requests] == [True] * 3


def test_no_proxy_exempts_a_host(tmp_path: Path, proxy: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", proxy)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")

    requests = run_through(tmp_path)

    assert [r.headers.get("via") for r in requests] == [None] * 3


def test_a_proxy_that_is_down_says_so(simulator: RunningSimulator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")

    async def attempt() -> None:
        async with ChatClient(
            simulator.base_url, TEST_KEY, 5, max_connections=1, max_response_mb=32
        ) as client:
            await client.complete({"model": "grok-4.3", "messages": [{"role": "user", "content": "hi"}]})

    with pytest.raises(EndpointDown) as caught:
        asyncio.run(attempt())
    assert str(caught.value).startswith("connection: to the proxy failed (")


async def complete_over_tls(ca: trustme.CA) -> str | None:
    """One request to a TLS server on loopback whose certificate `ca` signed; the answer's content."""
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_tls)
    stub = StubServer(lambda request: Reply(200, completion("Over TLS.")))
    server = await asyncio.start_server(stub._serve_connection, "127.0.0.1", 0, ssl=server_tls)
    base_url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
    async with server, ChatClient(base_url, TEST_KEY, 5, max_connections=1, max_response_mb=32) as client:
        result = await client.complete({"model": "m", "messages": []})
    return result.content


def test_ssl_cert_file_names_the_ca_to_trust(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ca = trustme.CA()
    with pytest.raises(EndpointDown) as caught:
        asyncio.run(complete_over_tls(ca))
    assert caught.value.kind == "tls"

    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
    assert asyncio.run(complete_over_tls(ca)) == "Over TLS."


def test_the_cas_are_loaded_once_for_https_and_not_for_plain_http(
    simulator: RunningSimulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
    tls_context.cache_clear()

    async def over_http() -> str | None:
        async with ChatClient(simulator.base_url, TEST_KEY, 5, 1, max_response_mb=32) as client:
            return (
                await client.complete({"model": "grok-4.3", "messages": [{"role": "user", "content": "Hi."}]})
            ).content

    assert asyncio.run(over_http())
    assert tls_context.cache_info().currsize == 0
    assert [asyncio.run(complete_over_tls(ca)) for _ in range(2)] == ["Over TLS."] * 2
    assert (tls_context.cache_info().misses, tls_context.cache_info().hits) == (1, 1)


def test_a_client_the_user_passes_is_used_and_left_open() -> None:
    """Custom auth, proxies or mTLS come in through `http_client=`; here a MockTransport answers."""
    seen: list[httpx2.Request] = []

    def answer(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        return httpx2.Response(200, json=completion("Mocked."))

    async def attempt() -> tuple[str | None, bool]:
        async with httpx2.AsyncClient(transport=httpx2.MockTransport(answer)) as http:
            async with ChatClient(
                "http://api.test/v1", TEST_KEY, 5, 1, max_response_mb=32, http_client=http
            ) as client:
                result = await client.complete({"model": "m", "messages": []})
            return result.content, http.is_closed

    assert asyncio.run(attempt()) == ("Mocked.", False)
    assert [str(r.url) for r in seen] == ["http://api.test/v1/chat/completions"]
    assert seen[0].headers["authorization"] == f"Bearer {TEST_KEY}"


def test_a_netrc_entry_for_the_endpoint_leaves_the_key_in_charge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A developer's ~/.netrc naming the endpoint's host must neither replace the API key nor
    clash with it (aiohttp's trust_env read it for every request and refused the pair)."""
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login someone password secret\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))

    requests = run_through(tmp_path)

    assert [r.headers["authorization"] for r in requests] == [f"Bearer {TEST_KEY}"] * 3
