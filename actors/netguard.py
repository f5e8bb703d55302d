"""Destination policy: which URLs haul may fetch from or post to.

haul runs next to Redis and, in clouds, next to metadata services (169.254.169.254) that hand
out credentials. A URL from a customer's order must not reach them. By default only public
addresses are allowed; ``HAUL_ALLOW_PRIVATE_NETWORKS`` lifts that for local stacks and tests.
The check resolves the host name and judges every address it resolves to, so a name that
points inward is refused like the address itself, and it runs again on every redirect hop.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

from actors.errors import ForbiddenDestination

ALLOWED_SCHEMES = frozenset({"http", "https"})

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def is_public(address: Address) -> bool:
    """True for addresses on the public internet; False for loopback, private, link-local,
    CGNAT, multicast, reserved, unspecified and IPv4-mapped/-translated forms of those."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is not None:
            return is_public(embedded)
        if address in ipaddress.IPv6Network("64:ff9b::/96"):
            return is_public(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return address.is_global and not address.is_multicast and not address.is_reserved


class DestinationPolicy:
    """Decides whether a URL may be contacted, and says why not."""

    def __init__(self, allow_private_networks: bool) -> None:
        self.allow_private_networks = allow_private_networks

    def check(self, url: str, *, purpose: str) -> None:
        """Raise :class:`ForbiddenDestination` unless ``url`` may be contacted.

        ``purpose`` ("origin of task 3f2a...", "webhook of task ...") goes into the message.
        """
        parts = urlsplit(url)
        if parts.scheme not in ALLOWED_SCHEMES:
            raise ForbiddenDestination(f"{purpose}: {parts.scheme!r} URLs are not fetched; use http or https")
        host = parts.hostname
        if not host:
            raise ForbiddenDestination(f"{purpose}: the URL has no host")
        if self.allow_private_networks:
            return
        for address in self._resolve(host, parts.port, purpose):
            if not is_public(address):
                raise ForbiddenDestination(
                    f"{purpose}: {host} resolves to {address}, which is not a public address; "
                    "haul refuses loopback, private, link-local and metadata destinations "
                    "(set HAUL_ALLOW_PRIVATE_NETWORKS=1 only on a trusted network)"
                )

    @staticmethod
    def _resolve(host: str, port: int | None, purpose: str) -> list[Address]:
        try:
            infos = socket.getaddrinfo(host, port or 443, proto=socket.IPPROTO_TCP)
        except socket.gaierror:
            # Unresolvable names fail later as a connection error, which is transient: DNS
            # outages pass. A name that never resolves uses up its attempts and ends dead.
            return []
        addresses: list[Address] = []
        for info in infos:
            raw = str(info[4][0]).split("%", 1)[0]
            try:
                addresses.append(ipaddress.ip_address(raw))
            except ValueError:
                raise ForbiddenDestination(f"{purpose}: {host} resolved to an unreadable address {raw!r}") from None
        return addresses
