"""app.media: data URLs and SSRF-guarded fetching against a hostile server on 127.0.0.1.

The server is on loopback, which the default policy refuses; tests reach it through
`allowed_private_networks=("127.0.0.1/32",)`, which keeps every other private address refused.
Two guards make the suite hermetic: every TCP connect is recorded and anything but 127.0.0.1 fails
the test, and name resolution only knows the names a test plants (numeric hosts and localhost
still go through the real getaddrinfo, which is what turns `0x7f.1` into 127.0.0.1).
"""

from __future__ import annotations

import base64
import dataclasses
import io
import ipaddress
import re
import shutil
import socket

import anyio
import httpx
import pytest
from PIL import Image

from app.media import ImageFetchPolicy, is_public_address, load_image_bytes, new_image_client
from models.images import ImageLimits, decode_image
from scheduler.errors import InvalidImageError
from tests.unit._hostile_server import HostileServer, self_signed_tls

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]

LOOPBACK = ImageFetchPolicy(allowed_private_networks=("127.0.0.1/32",), timeout_s=3.0)
_NUMERIC_HOST = re.compile(r"[0-9a-fx.:\[\]]+")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 30, 30)).save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def server(png: bytes):
    with HostileServer(png) as hostile:
        yield hostile


@dataclasses.dataclass
class NetLog:
    connects: list[str]
    lookups: list[str]
    dns: dict[str, list[str]]


def _family(ip: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


@pytest.fixture(autouse=True)
def net(monkeypatch: pytest.MonkeyPatch) -> NetLog:
    log = NetLog(connects=[], lookups=[], dns={})
    real_connect, real_getaddrinfo = anyio.connect_tcp, anyio.getaddrinfo

    async def guarded_connect(remote_host, remote_port, **kwargs):
        log.connects.append(str(remote_host))
        if str(remote_host) != "127.0.0.1":
            raise AssertionError(f"a connection to {remote_host} was attempted")
        return await real_connect(remote_host, remote_port, **kwargs)

    async def planted_getaddrinfo(host, port, **kwargs):
        log.lookups.append(host)
        if host in log.dns:
            return [(_family(ip), socket.SOCK_STREAM, 6, "", (ip, port)) for ip in log.dns[host]]
        if _NUMERIC_HOST.fullmatch(host) or host == "localhost":
            return await real_getaddrinfo(host, port, **kwargs)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(anyio, "connect_tcp", guarded_connect)
    monkeypatch.setattr(anyio, "getaddrinfo", planted_getaddrinfo)
    return log


async def refused(url: str, policy: ImageFetchPolicy = LOOPBACK, **kwargs) -> str:
    with pytest.raises(InvalidImageError) as caught:
        await load_image_bytes(url, policy, **kwargs)
    return caught.value.message


# --- happy paths ---------------------------------------------------------------------------------


async def test_a_data_url_with_whitespace_around_it_is_a_data_url(png):
    """Pasted with a line break (or indented), a data URL was taken for a remote URL and refused
    as longer than a URL may be."""
    import base64

    inline = "data:image/png;base64," + base64.b64encode(png + b"\0" * 9000).decode()
    assert len(inline) > 8192
    assert await load_image_bytes(f"  {inline}\n", LOOPBACK) == png + b"\0" * 9000


async def test_fetches_png_from_the_checked_address(server, png, net):
    assert await load_image_bytes(server.url("/png"), LOOPBACK) == png
    assert set(net.connects) == {"127.0.0.1"}
    assert server.requests[-1][1]["accept-encoding"] == "identity"


async def test_name_is_resolved_once_and_sent_as_host_header(server, png, net):
    net.dns["img.example.com"] = ["127.0.0.1"]
    policy = dataclasses.replace(LOOPBACK, allowed_hosts=("*.example.com",))
    assert await load_image_bytes(server.url("/png", host="IMG.Example.com."), policy) == png
    assert net.lookups == ["img.example.com"]
    assert net.connects == ["127.0.0.1"]
    assert server.requests[-1][1]["host"] == f"img.example.com.:{server.port}"


async def test_octet_stream_content_type_is_not_trusted_either_way(server, png):
    assert await load_image_bytes(server.url("/png-as-octets"), LOOPBACK) == png


async def test_relative_redirect_is_followed(server, png):
    assert await load_image_bytes(server.url("/redirect-relative"), LOOPBACK) == png


async def test_redirect_chain_up_to_the_limit(server, png):
    assert await load_image_bytes(server.url("/chain/3"), LOOPBACK) == png
    assert "more than 3" in await refused(server.url("/chain/4"))


async def test_shared_client(server, png):
    async with new_image_client(LOOPBACK) as client:
        for _ in range(3):
            assert await load_image_bytes(server.url("/png"), LOOPBACK, client=client) == png


async def test_shared_client_must_ignore_environment_proxies(server):
    async with httpx.AsyncClient() as client:
        with pytest.raises(ValueError, match="trust_env"):
            await load_image_bytes(server.url("/png"), LOOPBACK, client=client)


async def test_request_targets_ip_with_original_host_and_sni(net):
    net.dns["img.example.com"] = ["93.184.216.34"]
    seen: list[httpx.Request] = []

    class Body(httpx.AsyncByteStream):  # a streamed body, as a real transport gives
        async def __aiter__(self):
            yield b"\x89PNG fake"

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, stream=Body(), headers={"Content-Type": "image/png"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler), trust_env=False) as client:
        await load_image_bytes("https://img.example.com/a.png?x=1", ImageFetchPolicy(), client=client)
    (request,) = seen
    assert str(request.url) == "https://93.184.216.34/a.png?x=1"
    assert request.headers["host"] == "img.example.com"
    assert request.extensions["sni_hostname"] == "img.example.com"


@pytest.fixture(scope="module")
def tls_server(png: bytes, tmp_path_factory: pytest.TempPathFactory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    server_tls, client_trust = self_signed_tls(tmp_path_factory.mktemp("tls"), "img.example.com")
    with HostileServer(png, tls=server_tls) as hostile:
        yield hostile, client_trust


async def test_tls_uses_original_name_for_sni_and_certificate(tls_server, png, net):
    server, trust = tls_server
    net.dns["img.example.com"] = ["127.0.0.1"]
    net.dns["other.example.com"] = ["127.0.0.1"]
    async with httpx.AsyncClient(trust_env=False, verify=trust) as client:
        assert (
            await load_image_bytes(server.url("/png", host="img.example.com"), LOOPBACK, client=client) == png
        )
        assert server.server_names == ["img.example.com"]
        # Same IP, another name: the certificate does not cover it, so the handshake must fail.
        message = await refused(server.url("/png", host="other.example.com"), client=client)
    assert message == "could not connect to the image host"
    assert set(net.connects) == {"127.0.0.1"}


# --- deadlines and size caps ---------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/trickle", "/trickle-headers", "/slow-chain/3"])
async def test_whole_fetch_deadline(server, path):
    # Each of these stays under any per-read timeout (a byte or a hop at a time): only a deadline
    # on the whole fetch stops them, and its own message says so.
    policy = dataclasses.replace(LOOPBACK, timeout_s=0.5)  # /slow-chain: 0.3 s per hop, 4 hops
    assert "timed out after 0.5 s" in await refused(server.url(path), policy)


@pytest.mark.parametrize("path", ["/big-nolen", "/big-chunked", "/big-announced"])
async def test_byte_cap(server, path):
    policy = dataclasses.replace(LOOPBACK, max_bytes=50_000)
    assert await refused(server.url(path), policy) == "image is larger than the 50000-byte limit"


async def test_body_shorter_than_announced(server):
    assert "connection broke" in await refused(server.url("/short-body"))


# --- redirects into forbidden places -------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/redirect-private", "/redirect-metadata", "/redirect-mapped", "/redirect-decimal"]
)
async def test_redirect_to_private_address_is_refused_before_connecting(server, net, path):
    message = await refused(server.url(path))
    assert message == "image URL points to a private or reserved network address"
    assert net.connects == ["127.0.0.1"]  # only the first hop
    assert "10.0.0.1" not in message and "169.254" not in message


async def test_redirect_loop_ends_at_the_hop_limit(server, net):
    assert await refused(server.url("/loop")) == "image URL redirected more than 3 times"
    assert len(net.connects) == 4


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/redirect-file", "must use http or https"),
        ("/redirect-userinfo", "credentials"),
        ("/redirect-no-location", "without a Location"),
    ],
)
async def test_bad_redirects(server, path, expected):
    assert expected in await refused(server.url(path))


async def test_numeric_spellings_connect_to_the_address_that_was_checked(server, png):
    for host in ("2130706433", "0x7f.1", "127.1", "017700000001"):
        assert await load_image_bytes(server.url("/png", host=host), LOOPBACK) == png
    assert await load_image_bytes(server.url("/redirect-numeric-self"), LOOPBACK) == png


# --- responses that are not images ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/html", "image URL returned a non-image content type"),
        ("/status/404", "image URL returned HTTP 404"),
        ("/status/500", "image URL returned HTTP 500"),
        ("/empty", "image URL returned an empty body"),
    ],
)
async def test_non_image_responses(server, path, expected):
    message = await refused(server.url(path))
    assert message == expected
    assert "SECRET" not in message


async def test_truncated_png_fetches_but_does_not_decode(server, png):
    data = await load_image_bytes(server.url("/truncated"), LOOPBACK)
    assert data == png[: len(png) // 2]
    with pytest.raises(InvalidImageError, match=r"truncated or malformed PNG data"):
        decode_image(data, ImageLimits())


# --- refusals before any connection --------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://2130706433/",
        "http://0177.0.0.1/",
        "http://0x7f.1/",
        "http://127.1/",
        "http://[::ffff:127.0.0.1]/",
        "http://[::1]/",
        "http://localhost/",
        "http://10.0.0.1/",
        "http://169.254.169.254/latest/meta-data/",
        "http://[64:ff9b::a9fe:a9fe]/",  # NAT64 of 169.254.169.254
        "http://[2002:a9fe:a9fe::]/",  # 6to4 of 169.254.169.254
        "http://100.64.0.1/",
        "http://0.0.0.0/",
    ],
)
async def test_loopback_and_private_spellings_refused(net, url):
    await refused(url, ImageFetchPolicy())
    assert net.connects == []


async def test_resolved_private_address_refuses_the_name_without_echoing_it(net):
    net.dns["img.example.com"] = ["93.184.216.34", "10.1.2.3"]
    message = await refused("http://img.example.com/a.png", ImageFetchPolicy())
    assert message == "image URL points to a private or reserved network address"
    assert "10.1.2.3" not in message and net.connects == []


async def test_unresolvable_host(net):
    assert (
        await refused("http://nowhere.invalid/a.png", ImageFetchPolicy())
        == "image host could not be resolved"
    )


@pytest.mark.parametrize(
    "url",
    ["file:///etc/passwd", "ftp://example.com/a.png", "gopher://example.com/", "javascript:alert(1)",
     "example.com/a.png", "//example.com/a.png", "", "http://", "http:///a.png", "http://a b/"],
)  # fmt: skip
async def test_scheme_and_shape_refusals(net, url):
    message = await refused(url, ImageFetchPolicy())
    assert "/etc" not in message and net.connects == [] and net.lookups == []


@pytest.mark.parametrize("url", ["http://user@example.com/a.png", "http://user:pw@127.0.0.1/a.png"])
async def test_userinfo_refused(net, url):
    assert "credentials" in await refused(url, LOOPBACK)
    assert net.connects == [] and net.lookups == []


async def test_remote_disabled(net):
    policy = ImageFetchPolicy(allow_remote=False)
    assert "remote image URLs are disabled on this server" in await refused(
        "https://example.com/a.png", policy
    )
    assert net.lookups == []


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("example.com", True),
        ("EXAMPLE.com.", True),
        ("evil-example.com", False),
        ("example.com.evil.net", False),
        ("a.example.com", False),
        ("cdn.images.org", True),
        ("a.b.images.org", True),
        ("images.org", False),  # "*." means subdomains only
        ("evilimages.org", False),
        ("bücher.de", True),
    ],
)
async def test_allowlist(net, host, allowed):
    net.dns[httpx.URL(f"http://{host}/").raw_host.decode().lower().rstrip(".")] = ["93.184.216.34"]
    policy = ImageFetchPolicy(allowed_hosts=("example.com", "*.images.org", "xn--bcher-kva.de"), timeout_s=1)
    url = f"http://{host}/a.png"
    if allowed:
        # Allowed hosts go on to resolution and connection (which the test guard stops).
        with pytest.raises(AssertionError, match="connection to 93.184.216.34"):
            await load_image_bytes(url, policy)
    else:
        assert await refused(url, policy) == "image URL host is not allowed on this server"
        assert net.lookups == []


def test_invalid_allowlist_entry_is_a_config_error():
    with pytest.raises(ValueError):
        ImageFetchPolicy(allowed_hosts=("*.*.example.com",))


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True), ("2606:4700:4700::1111", True), ("::ffff:8.8.8.8", True),
        ("64:ff9b::808:808", True), ("2002:808:808::1", True),
        ("127.0.0.1", False), ("10.0.0.1", False), ("172.16.0.1", False), ("192.168.1.1", False),
        ("169.254.169.254", False), ("100.64.0.1", False), ("0.0.0.0", False), ("224.0.0.1", False),
        ("240.0.0.1", False), ("255.255.255.255", False), ("::1", False), ("::", False), ("fe80::1", False),
        ("fc00::1", False), ("fec0::1", False), ("ff02::1", False), ("::ffff:10.0.0.1", False),
        ("64:ff9b::a00:1", False), ("64:ff9b:1::1", False), ("2002:7f00:1::", False), ("::127.0.0.1", False),
        ("::ffff:0:7f00:1", False), ("2001:db8::1", False),
    ],
)  # fmt: skip
def test_public_address_table(address, public):
    assert is_public_address(ipaddress.ip_address(address)) is public


# --- data URLs -----------------------------------------------------------------------------------


def data_url(payload: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(payload).decode()}"


async def test_data_url(png, net):
    assert await load_image_bytes(data_url(png), ImageFetchPolicy(allow_remote=False)) == png
    wrapped = "\r\n".join(re.findall(".{1,76}", base64.b64encode(png).decode()))
    assert await load_image_bytes(f"DATA:Image/PNG;base64,\n{wrapped}\n", ImageFetchPolicy()) == png
    large = png + bytes(range(256)) * 2048  # decoded in a worker thread
    assert await load_image_bytes(data_url(large), ImageFetchPolicy()) == large
    assert net.connects == [] and net.lookups == []


async def test_base64_without_its_padding_is_mended_as_browsers_do():
    # The forgiving base64 of the web platform (atob) takes it; so does this server now.
    assert (
        await load_image_bytes("data:image/png;base64,iVBORw0KGgo", ImageFetchPolicy())
        == b"\x89PNG\r\n\x1a\n"
    )


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("data:image/png;base64,iVBORw0KGgo*", "not valid base64"),
        ("data:image/png;base64,iVBORw0KG", "not valid base64"),  # a length no padding can mend
        ("data:image/png;base64,-_-_", "not valid base64"),  # url-safe alphabet
        ("data:image/png;base64,aGVsbG8=é", "not valid base64"),
        ("data:image/png;base64,", "empty"),
        ("data:text/plain;base64,aGVsbG8=", "media type must be image/*"),
        ("data:;base64,aGVsbG8=", "media type must be image/*"),
        ("data:image/svg+xml,<svg/>", "must be base64-encoded"),
        ("data:image/png;base64", "no comma"),
    ],
)
async def test_bad_data_urls(url, expected):
    assert expected in await refused(url, ImageFetchPolicy())


async def test_oversized_data_url_refused_without_decoding(monkeypatch):
    def must_not_decode(*args, **kwargs):
        raise AssertionError("decoded an oversized payload")

    monkeypatch.setattr(base64, "b64decode", must_not_decode)
    url = data_url(b"\x00" * 1001)
    assert "larger than the 1000-byte limit" in await refused(url, ImageFetchPolicy(max_bytes=1000))


async def test_data_url_exactly_at_the_limit():
    for size in (998, 999, 1000):  # every padding length
        assert len(await load_image_bytes(data_url(b"\x01" * size), ImageFetchPolicy(max_bytes=1000))) == size
