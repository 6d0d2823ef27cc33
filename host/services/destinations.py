"""Where a completion callback may go: the operator's policy, applied when a
job is submitted and again before every delivery (DNS may have changed).

    callback_url ──parse──▶ Destination (http/https, no userinfo, no fragment, capped)
        │  host matches a `callback_allow` pattern ("hooks.example.com",
        │  "*.example.com", optionally ":port"; "*" any host)   else Refused
        ▼
    resolve ONCE (getaddrinfo) ──▶ every address checked:
        loopback, link-local (169.254/16, fe80::/10: cloud metadata), private,
        unspecified, multicast, reserved, site-local or otherwise not global
        (an IPv4 address inside an IPv6 one, IPv4-mapped or 6to4, judged
        itself) ──▶ Refused, unless in `callback_allow_networks`; the host's
        own listening port on one of its own addresses (IPv4-mapped forms
        included) ──▶ Refused always
        ▼
    (Destination, the first checked address): delivery connects to that
    address itself, with the original Host header (no second lookup).

`Refused` carries the reason in words a client can act on; the job service
turns it into a 400 `invalid_input` at submit, the deliverer into a FAILED
callback (no retry) at delivery.
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import re
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import psutil

MAX_URL_CHARS = 2048
_HOST_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?", re.IGNORECASE)
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], list[str]]


class Refused(Exception):
    """The destination is not allowed; the message says why and how to allow it."""


class Unresolvable(Exception):
    """The destination's name does not resolve (now): worth another try later."""


@dataclass(frozen=True)
class Destination:
    """A parsed callback URL: what to connect to and what to send."""

    url: str
    scheme: str
    host: str  # lower case; an IPv6 literal without brackets
    port: int
    target: str  # path and query, as sent on the request line
    host_header: str  # as the URL names it (port included when not the default)


def parse_url(url: str) -> Destination:
    """Raises Refused unless `url` is an absolute http(s) URL without
    userinfo or fragment, at most MAX_URL_CHARS long."""
    if len(url) > MAX_URL_CHARS:
        raise Refused(f"callback_url is longer than {MAX_URL_CHARS} characters")
    if not url.isascii() or not url.isprintable() or " " in url:
        raise Refused("callback_url must be printable ASCII without spaces")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise Refused(f"callback_url is not a valid URL: {exc}") from exc
    if parts.scheme not in ("http", "https"):
        raise Refused("callback_url must be an absolute http:// or https:// URL")
    if "@" in parts.netloc:
        raise Refused("callback_url must not carry a user name or password")
    if parts.fragment or url.endswith("#"):
        raise Refused("callback_url must not have a fragment (#...)")
    if not parts.hostname:
        raise Refused("callback_url has no host")
    if not _plain_host(parts.hostname):
        raise Refused(
            "callback_url's host must be a DNS name (letters, digits, '-', '_' and dots) "
            "or an IP address"
        )
    if port == 0:
        raise Refused("callback_url's port must be 1 to 65535")
    default = 443 if parts.scheme == "https" else 80
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Destination(
        url, parts.scheme, parts.hostname.lower(), port or default, target, parts.netloc
    )


def _plain_host(host: str) -> bool:
    """`host` is a plain DNS name or an IP address: no character a resolver
    reads otherwise (a backslash escapes a dot in glibc's, so a name could
    end like an allowed domain and lie elsewhere)."""
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return False
        return True
    return _HOST_NAME.fullmatch(host) is not None


def _pattern(text: str) -> tuple[str, int | None]:
    """`(host pattern, port or None)` of a `callback_allow` entry."""
    text = text.strip().lower()
    if text.startswith("["):  # an IPv6 literal, maybe with a port
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    host, colon, port = text.rpartition(":")
    if colon and port.isdigit() and ":" not in host:
        return host, int(port)
    return text, None


def _matches(pattern: str, port: int | None, dest: Destination) -> bool:
    if port is not None and port != dest.port:
        return False
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return dest.host.endswith(pattern[1:])
    return dest.host == pattern


def kind_of(address: IPAddress) -> str | None:
    """What makes `address` no public destination, in words; None for a public one."""
    if isinstance(address, ipaddress.IPv6Address):
        # An IPv4 address inside an IPv6 one (IPv4-mapped, 6to4) is judged itself.
        for embedded, how in ((address.ipv4_mapped, "IPv4-mapped"), (address.sixtofour, "6to4")):
            if embedded is not None:
                inner = kind_of(embedded)
                return None if inner is None else f"{inner} ({how})"
        if address.is_site_local:  # fec0::/10, deprecated, yet not "private" to ipaddress
            return "a site-local address"
    checks = (
        (address.is_unspecified, "the unspecified address"),
        (address.is_loopback, "a loopback address"),
        (address.is_link_local, "a link-local address (where cloud metadata services live)"),
        (address.is_multicast, "a multicast address"),
        (address.is_private, "a private address"),
        (address.is_reserved, "a reserved address"),
        (not address.is_global, "not a public address"),
    )
    return next((words for hit, words in checks if hit), None)


# getaddrinfo cannot be interrupted: lookups run on a few threads of their
# own, and whoever asked waits at most RESOLVE_TIMEOUT_S (a lookup that
# hangs holds one of those threads, never a request's or a deliverer's for
# longer, and never past a delivery's lease).
RESOLVE_TIMEOUT_S = 3.0
_LOOKUPS = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="plughost-dns")


def system_resolver(host: str, port: int) -> list[str]:
    """Every address `host` resolves to, in the resolver's order, within
    RESOLVE_TIMEOUT_S. Raises Unresolvable."""
    lookup = _LOOKUPS.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    try:
        found = lookup.result(timeout=RESOLVE_TIMEOUT_S)
    except concurrent.futures.TimeoutError as exc:
        lookup.cancel()  # if it has not started yet
        raise Unresolvable(f"{host} did not resolve within {RESOLVE_TIMEOUT_S:g} s") from exc
    except (socket.gaierror, UnicodeError) as exc:
        raise Unresolvable(f"{host} does not resolve ({exc})") from exc
    return list(dict.fromkeys(str(info[4][0]).split("%")[0] for info in found))


def own_addresses() -> set[IPAddress]:
    """The addresses of this machine's interfaces."""
    found: set[IPAddress] = set()
    for addresses in psutil.net_if_addrs().values():
        for entry in addresses:
            if entry.family in (socket.AF_INET, socket.AF_INET6):
                try:
                    found.add(ipaddress.ip_address(entry.address.split("%")[0]))
                except ValueError:
                    continue  # not an address this check can compare
    return found


@dataclass(frozen=True)
class CallbackPolicy:
    """The operator's destinations (`callback_allow`, `callback_allow_networks`)
    and the ports this host listens on (refused on its own addresses)."""

    allow: tuple[str, ...] = ()
    networks: tuple[IPNetwork, ...] = ()
    own_ports: frozenset[int] = frozenset()
    resolver: Resolver = field(default=system_resolver, compare=False)

    @classmethod
    def of(
        cls, allow: Iterable[str], networks: Iterable[str], own_ports: Iterable[int] = ()
    ) -> CallbackPolicy:
        """Raises ValueError for a network that is no CIDR."""
        return cls(
            tuple(p.strip() for p in allow if p.strip()),
            tuple(ipaddress.ip_network(n.strip(), strict=False) for n in networks if n.strip()),
            frozenset(own_ports),
        )

    @property
    def enabled(self) -> bool:
        return bool(self.allow)

    def check_url(self, url: str) -> Destination:
        """Parse `url` and match its host against `callback_allow`. Raises Refused."""
        if not self.enabled:
            raise Refused(
                "callbacks are not enabled on this host (its operator allows no "
                "destination: callback_allow is empty)"
            )
        dest = parse_url(url)
        if not any(_matches(*_pattern(p), dest) for p in self.allow):
            where = f"{dest.host}:{dest.port}"
            raise Refused(
                f"callback_url's host {where} matches none of this host's callback_allow "
                "patterns; its operator can add it there"
            )
        return dest

    def address_of(self, dest: Destination) -> str:
        """Resolve `dest` once and check every address; the first, to connect
        to. Raises Refused, or Unresolvable when the name does not resolve."""
        addresses = self.resolver(dest.host, dest.port)
        if not addresses:
            raise Unresolvable(f"{dest.host} resolves to no address")
        own = own_addresses() if dest.port in self.own_ports else set()
        for text in addresses:
            address = ipaddress.ip_address(text)
            plain = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
            seen = plain or address  # an IPv4-mapped address reaches the IPv4 one
            if dest.port in self.own_ports and (
                address in own or seen in own or seen.is_loopback or seen.is_unspecified
            ):
                raise Refused(
                    f"callback_url {dest.host}:{dest.port} resolves to {address}, "
                    "this host's own API port: a callback may not call the host itself"
                )
            kind = kind_of(address)
            if kind is not None and not self._allowed(plain or address):
                raise Refused(
                    f"callback_url's host {dest.host} resolves to {address}, {kind}; "
                    "its operator can allow it with callback_allow_networks"
                )
        return addresses[0]

    def _allowed(self, address: IPAddress) -> bool:
        """`address` (an IPv4-mapped one in its IPv4 form) is in `callback_allow_networks`."""
        return any(net.version == address.version and address in net for net in self.networks)

    def check(self, url: str) -> tuple[Destination, str]:
        """`check_url`, then `address_of`. Raises Refused or Unresolvable."""
        dest = self.check_url(url)
        return dest, self.address_of(dest)


__all__ = [
    "MAX_URL_CHARS",
    "CallbackPolicy",
    "Destination",
    "Refused",
    "Unresolvable",
    "kind_of",
    "parse_url",
    "system_resolver",
]
