"""Parsers for setting values: each turns the stripped raw string into a value or raises
ValueError with a message that starts with the offending value. `expected` says what is accepted;
the CLI help and the README table show it, so no help text restates a range."""

from __future__ import annotations

import ipaddress
import math
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx


def show(raw: str) -> str:
    return repr(raw if len(raw) <= 60 else raw[:57] + "...")


@dataclass(frozen=True)
class Parser:
    parse: Callable[[str], Any]
    expected: str | None = None  # e.g. "1 <= value <= 1024"; None when the help says it all
    is_bool: bool = False

    def __call__(self, raw: str) -> Any:
        return self.parse(raw)


_INT_RE = re.compile(r"[+-]?\d+")


def _parse_int(raw: str) -> int:
    if not _INT_RE.fullmatch(raw):
        raise ValueError(f"{show(raw)} (expected an integer)")
    return int(raw)


def _range(lo: float | None, hi: float | None, lo_open: bool = False) -> str:
    if lo is not None and hi is not None:
        return f"{lo} {'<' if lo_open else '<='} value <= {hi}"
    if lo is not None:
        return f"a number {'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f"a number <= {hi}"
    return "a finite number"


def integer(lo: int | None = None, hi: int | None = None, *, zero: str | None = None) -> Parser:
    """An integer in [lo, hi]; `zero` names what 0 means when 0 is allowed outside the range."""
    expected = _range(lo, hi) + (f", or 0 ({zero})" if zero else "")

    def parse(raw: str) -> int:
        value = _parse_int(raw)
        if zero and value == 0:
            return 0
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ValueError(f"{show(raw)} (expected {expected})")
        return value

    return Parser(parse, expected)


def number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> Parser:
    expected = _range(lo, hi, lo_open)

    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"{show(raw)} (expected a number)") from None
        too_low = lo is not None and (value <= lo if lo_open else value < lo)
        if not math.isfinite(value) or too_low or (hi is not None and value > hi):
            raise ValueError(f"{show(raw)} (expected {expected})")
        return value

    return Parser(parse, expected)


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _bool(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"{show(raw)} (expected true/false, 1/0, yes/no or on/off)")


boolean = Parser(_bool, None, is_bool=True)


def choice(*choices: str, aliases: Mapping[str, str] | None = None) -> Parser:
    aliases = aliases or {}

    def parse(raw: str) -> str:
        lowered = raw.lower()
        value = aliases.get(lowered, lowered)
        if value not in choices:
            raise ValueError(f"{show(raw)} (choose {', '.join(choices)})")
        return value

    return Parser(parse, " | ".join(choices))


text = Parser(lambda raw: raw)


def _chat_template(raw: str) -> str:
    """A Jinja template given inline (it contains `{` or `%`), else the path of a file holding
    one, read now: a missing file or a syntax error stops startup, not the first chat request."""
    text = raw
    if "{" not in raw and "%" not in raw:
        try:
            with open(os.path.expanduser(raw), encoding="utf-8") as file:
                text = file.read()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ValueError(
                f"{show(raw)} is not a template (no '{{' or '%') and not a readable file ({reason})"
            ) from None
        if not text.strip():
            raise ValueError(f"{show(raw)} is an empty file")
    import jinja2  # only when a template is configured: --help stays fast

    try:
        jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(text)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(
            f"{show(raw)} is not a valid Jinja template: {exc.message} (line {exc.lineno})"
        ) from None
    return text


chat_template = Parser(_chat_template, "inline when it contains { or %, else a file path")


def _api_key(raw: str) -> str | None:
    # "EMPTY" is the OpenAI-client convention for "no key"; auth stays off.
    return None if raw == "EMPTY" else raw


api_key = Parser(_api_key)


def _seed(raw: str) -> int | None:
    if raw.lower() in {"none", "random"}:
        return None
    value = _parse_int(raw)
    if not 0 <= value < 2**64:
        raise ValueError(f"{show(raw)} (expected 0 <= seed < 2**64, or 'none' for a random seed)")
    return value


seed = Parser(_seed, "0 <= seed < 2**64, or none for a random seed")


def _gpu_ids(raw: str) -> tuple[int, ...]:
    parts = [part.strip() for part in raw.split(",")]
    if any(not part.isdigit() for part in parts):
        raise ValueError(f"{show(raw)} (expected comma-separated non-negative integers, e.g. 0,1)")
    ids = tuple(int(part) for part in parts)
    if len(set(ids)) != len(ids):
        raise ValueError(f"{show(raw)} (duplicate GPU id)")
    return ids


gpu_ids = Parser(_gpu_ids, "comma-separated ids, e.g. 0,1")


def host_rule(entry: str) -> tuple[str, bool]:
    """An allowlist entry as (normalised host, whether it covers subdomains): a bare host name or
    IP, or `*.` and a domain. A URL, a port, a path or a `*` elsewhere is refused: such an entry
    would never match a host and would refuse every image URL without saying why."""
    text = entry.strip().lower()
    wildcard = text.startswith("*.")
    base = text[2:] if wildcard else text
    if "://" in base:
        raise ValueError(f"{show(entry)} is a URL: give its host alone (e.g. cdn.example.com)")
    try:  # a bare IPv6 address (`::1`), which a URL would need in brackets
        return str(ipaddress.IPv6Address(base)), False
    except ValueError:
        pass
    try:
        url = httpx.URL(f"http://{base}/")
        host = url.raw_host.decode("ascii").rstrip(".")
        plain = (
            url.port is None and url.path == "/" and not url.userinfo and not url.query and not url.fragment
        )
    except (httpx.InvalidURL, UnicodeError):
        host, plain = "", False
    if not host or not plain or "*" in host:
        raise ValueError(
            f"{show(entry)} is not a host (e.g. cdn.example.com, or *.example.com for its subdomains)"
        )
    return host, wildcard


def _hosts(raw: str) -> tuple[str, ...]:
    entries = (part.strip().lower().rstrip(".") for part in raw.split(","))
    hosts = tuple(dict.fromkeys(entry for entry in entries if entry))
    for entry in hosts:
        host_rule(entry)
    return hosts


hosts = Parser(_hosts, "comma-separated hosts, `*.example.com` for subdomains")


def _bind_address(raw: str) -> str:
    """An IP to bind, or a name resolved to one here (granian binds IP literals only; `localhost`
    is what uvicorn, the seed's server, accepts)."""
    try:
        return str(ipaddress.ip_address(raw.strip("[]")))
    except ValueError:
        pass
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            infos = socket.getaddrinfo(raw, None, family, socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            continue
        if infos:
            return str(infos[0][4][0])
    raise ValueError(f"{show(raw)} is neither an IP address nor a name that resolves to one")


bind_address = Parser(_bind_address, "an IP address (0.0.0.0, ::, 127.0.0.1) or a name that resolves to one")


def _origins(raw: str) -> tuple[str, ...]:
    origins = []
    for part in (p.strip().rstrip("/") for p in raw.split(",")):
        if not part:
            continue
        if part != "*" and not part.startswith(("http://", "https://")):
            raise ValueError(f"{show(part)} is not an origin (e.g. https://chat.example.com, or *)")
        origins.append(part)
    return tuple(dict.fromkeys(origins))


origins = Parser(_origins, "comma-separated origins, e.g. https://chat.example.com; * for any")


def _networks(raw: str) -> tuple[str, ...]:
    networks = []
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            continue
        try:
            networks.append(str(ipaddress.ip_network(part, strict=False)))
        except ValueError:
            raise ValueError(f"{show(part)} is not an IP network (e.g. 10.20.0.0/16)") from None
    return tuple(dict.fromkeys(networks))


networks = Parser(_networks, "comma-separated CIDRs")
