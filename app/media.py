"""Turn an OpenAI `image_url.url` into encoded image bytes, safely. Async, no PIL.

Only two kinds of URL are accepted: `data:image/*;base64,...` and `http(s)://`. For http(s) the
SSRF guard follows one rule per hop: one parse (`httpx.URL`), one resolution
(`anyio.getaddrinfo`), every resolved address checked, and the connection made to the checked IP
literal only. The original name travels as the `Host` header and as the TLS SNI / certificate
name (httpcore's `sni_hostname` request extension), so nothing re-resolves the name later and
there is no second URL parser whose opinion could differ. Numeric spellings (`2130706433`,
`0x7f.1`, `127.1`) go through the same getaddrinfo (inet_aton semantics), so what is checked is
the address actually connected to.

Decided behaviours:
- data URLs: ASCII whitespace inside the payload is removed (clients wrap base64 at 76 columns),
  then the standard alphabet is decoded with `validate=True`, its "=" padding added where it is
  missing altogether (as the web's forgiving base64, `atob`, takes it). Percent-encoded or
  non-base64 data URLs are refused. The size is checked from the encoded length first.
- `allowed_private_networks` lets an operator (or a test) reach given CIDRs, e.g. an internal
  image store, while every other private address stays refused; `allow_private` turns the address
  check off entirely. Networks match the resolved address as is: allowing 127.0.0.1/32 does not
  allow ::ffff:127.0.0.1.
- `*.example.com` matches subdomains only, not `example.com` itself (list both if wanted).
- Redirects (301/302/303/307/308) are followed by hand, each hop parsed, allow-listed, resolved
  and checked again; https -> http is allowed, any other scheme is refused.
- The body is read raw with `Accept-Encoding: identity`, so the byte cap counts wire bytes and a
  gzip bomb cannot inflate in the transport; the image decoder checks the real format.
- Without a shared client, each hop gets a fresh client, so a TLS connection verified for one
  name never carries a request for another. A shared client (see `new_image_client`) pools
  connections per (scheme, IP, port): the IP check holds, but a pooled TLS connection may serve a
  second name hosted on the same IP.
"""

from __future__ import annotations

import base64
import binascii
import functools
import http.cookiejar
import ipaddress
import logging
import re
import socket
import ssl
from dataclasses import dataclass, field

import anyio
import anyio.to_thread
import httpx

from app.setting_parsers import host_rule
from scheduler.errors import InvalidImageError

logger = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_MAX_URL_CHARS = 8192
# Decoding base64 costs ~7 ms per MB; above this many characters it runs in a worker thread so
# one large data URL does not stall every stream on the event loop.
_INLINE_DATA_URL_CHARS = 256 * 1024
_HOST_NAME = re.compile(r"[a-z0-9_.-]+")  # after IDNA encoding; IP literals are parsed separately
_ASCII_WHITESPACE = b" \t\r\n\f\v"
_NOT_IMAGE_TYPES = frozenset({"application/json", "application/xml", "application/xhtml+xml"})
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
# Ranges that Python 3.11's `is_global` still calls global but that are not the open internet.
_NOT_PUBLIC = (
    ipaddress.IPv4Network("100.64.0.0/10"),  # CGNAT
    ipaddress.IPv6Network("64:ff9b:1::/48"),  # local-use NAT64
)
_REQUEST_HEADERS = {
    "Accept": "image/*",
    "Accept-Encoding": "identity",
    "User-Agent": "docoserve-image-fetch",
}


@dataclass(frozen=True)
class ImageFetchPolicy:
    allow_remote: bool = True  # ALLOW_REMOTE_IMAGES
    allowed_hosts: tuple[str, ...] = ()  # IMAGE_URL_ALLOWED_HOSTS; "example.com" or "*.example.com"
    allow_private: bool = False  # ALLOW_PRIVATE_IMAGE_URLS: no address check at all
    allowed_private_networks: tuple[str, ...] = ()  # CIDRs reachable despite being private
    max_bytes: int = 20 * 1024 * 1024  # MAX_IMAGE_BYTES (encoded)
    timeout_s: float = 10.0  # whole fetch incl. DNS and redirects
    max_redirects: int = 3
    _host_rules: tuple[tuple[str, bool], ...] = field(init=False, repr=False, compare=False)
    _networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if self.max_bytes < 1 or self.timeout_s <= 0 or self.max_redirects < 0:
            raise ValueError("image fetch limits must be positive")
        rules = tuple(host_rule(entry) for entry in self.allowed_hosts)
        networks = tuple(ipaddress.ip_network(n.strip(), strict=False) for n in self.allowed_private_networks)
        object.__setattr__(self, "_host_rules", rules)
        object.__setattr__(self, "_networks", networks)

    def host_allowed(self, host: str) -> bool:
        """`host` is normalised (lowercase, IDNA, no trailing dot); no rules means any host."""
        if not self._host_rules:
            return True
        is_ip = _ip_literal(host) is not None
        return any(
            (host.endswith("." + base) and not is_ip) if wildcard else host == base
            for base, wildcard in self._host_rules
        )

    def address_allowed(self, address: IPAddress) -> bool:
        if self.allow_private or any(address in network for network in self._networks):
            return True
        return is_public_address(address)


def is_public_address(address: IPAddress) -> bool:
    """True for an address on the open internet; wrapped IPv4 is judged by the embedded address."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFF_FFFF)
        if embedded is not None:
            return is_public_address(embedded)
        if address.is_site_local:
            return False
    return address.is_global and not (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
        or any(address in network for network in _NOT_PUBLIC)
    )


def _ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


@dataclass(frozen=True)
class _Target:
    url: httpx.URL  # as the client wrote it (after one parse); used for Host, SNI and joins
    host: str  # lowercase, IDNA-encoded, no brackets, no trailing dot
    port: int


async def load_image_bytes(
    url: str, policy: ImageFetchPolicy, *, client: httpx.AsyncClient | None = None
) -> bytes:
    """The encoded bytes behind an `image_url.url`; raises `InvalidImageError` for anything refused."""
    # Whitespace around the URL (a data URL pasted with its line break) is no part of it: kept,
    # a data URL was taken for a remote one and refused as too long.
    url = url.strip()
    if url[:5].lower() == "data:":
        if len(url) <= _INLINE_DATA_URL_CHARS:
            return _decode_data_url(url, policy.max_bytes)
        return await anyio.to_thread.run_sync(_decode_data_url, url, policy.max_bytes)
    if not policy.allow_remote:
        raise InvalidImageError(
            "remote image URLs are disabled on this server; send the image as a base64 data URL"
        )
    if client is not None and client.trust_env:
        raise ValueError("the image client must be built with trust_env=False (see new_image_client)")
    target = _parse(url, policy)
    try:
        with anyio.fail_after(policy.timeout_s):
            for hop in range(policy.max_redirects + 1):
                addresses = await _resolve_checked(target, policy)
                result = await _fetch_hop(target, addresses, policy, client)
                if isinstance(result, bytes):
                    return result
                if hop == policy.max_redirects:
                    break
                target = _parse(result, policy)
    except TimeoutError:
        raise InvalidImageError(f"image fetch timed out after {policy.timeout_s:g} s") from None
    raise InvalidImageError(f"image URL redirected more than {policy.max_redirects} times")


def new_image_client(policy: ImageFetchPolicy, *, max_connections: int = 32) -> httpx.AsyncClient:
    """A client fit for `load_image_bytes`: no environment proxies, no redirects, no cookie memory."""
    return httpx.AsyncClient(
        trust_env=False,
        follow_redirects=False,
        verify=_tls_context(),
        timeout=policy.timeout_s,
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        cookies=http.cookiejar.CookieJar(http.cookiejar.DefaultCookiePolicy(allowed_domains=[])),
    )


@functools.cache
def _tls_context() -> ssl.SSLContext:
    # Loading the CA bundle costs tens of milliseconds; do it once, not per fetch on the loop.
    return httpx.create_ssl_context(trust_env=False)


def _decode_data_url(url: str, max_bytes: int) -> bytes:
    header, comma, payload = url[5:].partition(",")
    if not comma:
        raise InvalidImageError("malformed data URL: no comma before the payload")
    params = [p.strip().lower() for p in header.split(";")]
    if len(params) < 2 or params[-1] != "base64":
        raise InvalidImageError("data URLs must be base64-encoded (data:image/<type>;base64,...)")
    if not params[0].startswith("image/"):
        raise InvalidImageError("data URL media type must be image/*")
    try:
        encoded = payload.encode("ascii").translate(None, _ASCII_WHITESPACE)
    except UnicodeEncodeError:
        raise InvalidImageError("data URL payload is not valid base64") from None
    missing = -len(encoded) % 4
    if missing and not encoded.endswith(b"="):
        # Base64 without its "=" padding (base64url-style encoders drop it): the length says how
        # much is missing, so it is added rather than the image refused.
        encoded += b"=" * missing
    padding = min(2, len(encoded) - len(encoded.rstrip(b"=")))
    if (len(encoded) - padding) * 3 // 4 > max_bytes:
        raise InvalidImageError(f"image is larger than the {max_bytes}-byte limit")
    try:
        data = base64.b64decode(encoded, validate=True)
    except binascii.Error:
        raise InvalidImageError("data URL payload is not valid base64") from None
    if not data:
        raise InvalidImageError("data URL payload is empty")
    return data


def _parse(url: str | httpx.URL, policy: ImageFetchPolicy) -> _Target:
    if len(str(url)) > _MAX_URL_CHARS:
        raise InvalidImageError(f"image URL is longer than {_MAX_URL_CHARS} characters")
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        raise InvalidImageError("image URL is not a valid URL") from None
    if parsed.scheme not in ("http", "https"):
        raise InvalidImageError("image URL must use http or https, or be a base64 data URL")
    if parsed.userinfo:
        raise InvalidImageError("image URLs with credentials (user@host) are not accepted")
    host = parsed.raw_host.decode("ascii").lower().rstrip(".")
    if not host:
        raise InvalidImageError("image URL has no host")
    if _ip_literal(host) is None and not _HOST_NAME.fullmatch(host):
        raise InvalidImageError("image URL host is not a valid host name")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    if not 1 <= port <= 65535:
        raise InvalidImageError("image URL port is out of range")
    if not policy.host_allowed(host):
        raise InvalidImageError("image URL host is not allowed on this server")
    return _Target(url=parsed, host=host, port=port)


async def _resolve_checked(target: _Target, policy: ImageFetchPolicy) -> list[IPAddress]:
    literal = _ip_literal(target.host)
    if literal is not None:
        addresses = [literal]
    else:
        try:
            infos = await anyio.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            logger.debug("resolving image host %r failed: %s", target.host, exc)
            raise InvalidImageError("image host could not be resolved") from None
        addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))
    if not addresses:
        raise InvalidImageError("image host could not be resolved")
    refused = [a for a in addresses if not policy.address_allowed(a)]
    if refused:
        # One bad address refuses the name: a later connect could pick any of them.
        logger.debug("image host %r refused: non-public addresses %s", target.host, refused)
        raise InvalidImageError("image URL points to a private or reserved network address")
    return addresses


async def _fetch_hop(
    target: _Target, addresses: list[IPAddress], policy: ImageFetchPolicy, client: httpx.AsyncClient | None
) -> bytes | httpx.URL:
    """Body bytes, or the absolute URL of a redirect; tries the checked addresses in order."""
    for address in addresses:
        try:
            if client is not None:
                return await _request(client, target, address, policy)
            async with new_image_client(policy, max_connections=1) as own_client:
                return await _request(own_client, target, address, policy)
        except httpx.ConnectError as exc:
            logger.debug("connecting to %s for %r failed: %s", address, target.host, exc)
        except httpx.TimeoutException:
            raise InvalidImageError(f"image fetch timed out after {policy.timeout_s:g} s") from None
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            logger.debug("fetching image from %r failed: %r", target.host, exc)
            raise InvalidImageError(
                "image fetch failed: the connection broke or the reply was malformed"
            ) from None
    raise InvalidImageError("could not connect to the image host")


async def _request(
    client: httpx.AsyncClient, target: _Target, address: IPAddress, policy: ImageFetchPolicy
) -> bytes | httpx.URL:
    extensions = {}
    if target.url.scheme == "https" and _ip_literal(target.host) is None:
        extensions["sni_hostname"] = target.host  # TLS name and certificate check: the original host
    request = client.build_request(
        "GET",
        target.url.copy_with(host=str(address)),  # connect to the checked address, nothing else
        headers={**_REQUEST_HEADERS, "Host": target.url.netloc.decode("ascii")},
        extensions=extensions,
    )
    response = await client.send(request, stream=True, follow_redirects=False)
    try:
        return await _read_response(response, target, policy)
    finally:
        await response.aclose()


async def _read_response(
    response: httpx.Response, target: _Target, policy: ImageFetchPolicy
) -> bytes | httpx.URL:
    status = response.status_code
    if status in _REDIRECT_STATUSES:
        location = response.headers.get("location")
        if not location:
            raise InvalidImageError(f"image URL returned HTTP {status} without a Location")
        try:
            return target.url.join(location)
        except httpx.InvalidURL:
            raise InvalidImageError("image URL redirected to an invalid URL") from None
    if not 200 <= status < 300:
        raise InvalidImageError(f"image URL returned HTTP {status}")
    media_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type.startswith("text/") or media_type in _NOT_IMAGE_TYPES:
        raise InvalidImageError("image URL returned a non-image content type")
    announced = response.headers.get("content-length", "")
    if announced.isdigit() and int(announced) > policy.max_bytes:
        raise InvalidImageError(f"image is larger than the {policy.max_bytes}-byte limit")
    body = bytearray()
    async for chunk in response.aiter_raw():
        body += chunk
        if len(body) > policy.max_bytes:  # Content-Length can lie or be absent
            raise InvalidImageError(f"image is larger than the {policy.max_bytes}-byte limit")
    if not body:
        raise InvalidImageError("image URL returned an empty body")
    return bytes(body)
