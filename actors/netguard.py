"""Destination policy: which URLs haul may fetch from or post to.

haul runs next to Redis and, in clouds, next to metadata services (169.254.169.254) that hand
out credentials. A URL from a customer's order must not reach them. By default only public
addresses are allowed; ``HAUL_ALLOW_PRIVATE_NETWORKS`` lifts that on trusted networks, and
``HAUL_ALLOW_HOSTS`` lets exact ``host:port`` destinations through (an internal origin).

Link-local networks and the known metadata addresses (:data:`ALWAYS_REFUSED`) stay refused
even with private networks allowed: a trusted network is still a cloud machine whose metadata
service answers any process that asks. Only an exact ``host:port`` in ``HAUL_ALLOW_HOSTS``
reaches them.

Two checks, both on every redirect hop:

- before the request, :meth:`DestinationPolicy.check` judges the scheme, the name
  (``localhost`` and ``*.localhost`` by name) and every address the name resolves to, for a
  clear, permanent error;
- at connect time, :class:`GuardedAdapter` resolves once more, judges the address it will
  connect to and pins the connection to it, so a DNS answer that changes between the two
  (rebinding) cannot switch the destination. With private networks off that is
  requests-hardened's IP filter plus the policy's own judgment; with them on, the same pinning
  refuses only what is always refused.

Odd spellings (``2130706433``, ``0x7f.1``, ``0177.0.0.1``, ``[::ffff:127.0.0.1]``) resolve to
the address they denote and are judged as such.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import urllib.request
from collections.abc import Iterable, Iterator
from typing import Literal
from urllib.parse import urlsplit

import requests
from requests_hardened.ip_filter import EXTRA_BLOCKED_NET_RANGES

from actors.connections import GuardedAdapter, host_port
from actors.errors import ForbiddenDestination

ALLOWED_SCHEMES = frozenset({"http", "https"})

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Non-public networks Python's ``is_global`` lets through: deprecated IPv6 site-local
#: (RFC 3879; routed inside sites that still use it), plus requests-hardened's extra ranges
#: (6to4 relay, CGNAT, NAT64, ORCHIDv2, ...), so the check before the request refuses what the
#: connect-time filter would.
NOT_PUBLIC: tuple[Network, ...] = (ipaddress.ip_network("fec0::/10"), *EXTRA_BLOCKED_NET_RANGES)
#: Link-local networks: 169.254.169.254 is the metadata service of AWS, GCP, Azure (IMDS),
#: OpenStack, DigitalOcean, Oracle and more; Tencent's is 169.254.0.23.
LINK_LOCAL: tuple[Network, ...] = (ipaddress.ip_network("169.254.0.0/16"), ipaddress.ip_network("fe80::/10"))
#: Cloud metadata services outside link-local, one address each: Azure's wire server,
#: Alibaba Cloud's metadata service (in CGNAT space), AWS's IPv6 IMDS (Nitro), Google Cloud's
#: IPv6 metadata server.
METADATA_ADDRESSES: tuple[Network, ...] = tuple(
    ipaddress.ip_network(a) for a in ("168.63.129.16/32", "100.100.100.200/32", "fd00:ec2::254/128", "fd20:ce::254/128")
)
#: Refused even with ``HAUL_ALLOW_PRIVATE_NETWORKS``; only an exact HAUL_ALLOW_HOSTS entry reaches them.
ALWAYS_REFUSED: tuple[Network, ...] = LINK_LOCAL + METADATA_ADDRESSES


def _forms(address: Address) -> Iterator[Address]:
    """``address`` and the IPv4 address it embeds, if any (IPv4-mapped, 6to4, NAT64)."""
    yield address
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in ipaddress.IPv6Network("64:ff9b::/96"):
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            yield embedded


def is_public(address: Address) -> bool:
    """True for addresses on the public internet; False for loopback, private, link-local,
    site-local, CGNAT, multicast, reserved, unspecified and IPv4-mapped/-translated forms of those."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is not None:
            return is_public(embedded)
        if address in ipaddress.IPv6Network("64:ff9b::/96"):
            return is_public(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    if any(address in network for network in NOT_PUBLIC):
        return False
    return address.is_global and not address.is_multicast and not address.is_reserved


def _entry(host: str, port: int) -> str:
    """``host:port`` as ``HAUL_ALLOW_HOSTS`` spells it (IPv6 in brackets, lower case)."""
    return (f"[{host}]:{port}" if ":" in host else f"{host}:{port}").lower()


class DestinationPolicy:
    """Decides whether a URL may be contacted, and says why not.

    ``always_refused``: networks refused even with private networks allowed (default
    :data:`ALWAYS_REFUSED`, link-local and cloud metadata); an exact ``allow_hosts`` entry
    still reaches them.
    """

    def __init__(
        self,
        allow_private_networks: bool,
        allow_hosts: frozenset[str] = frozenset(),
        always_refused: Iterable[Network] = ALWAYS_REFUSED,
    ) -> None:
        self.allow_private_networks = allow_private_networks
        self.allow_hosts = allow_hosts
        self.always_refused = tuple(always_refused)

    def allowlisted(self, host: str, port: int) -> bool:
        """Exact ``host:port`` entries skip every address check (``HAUL_ALLOW_HOSTS``)."""
        return _entry(host, port) in self.allow_hosts

    def trusting(self, url: str) -> DestinationPolicy:
        """A copy that also trusts the exact ``host:port`` of ``url``.

        For destinations the operator configured (``HAUL_WEBHOOK_URL`` on an internal host):
        they are not hostile input, and refusing them would fail every task. Task-given URLs
        must never come through here.
        """
        host, port = host_port(url)
        if not host or not port:
            raise ValueError(f"{url!r} is not an http(s) URL with a host; cannot trust its destination")
        return DestinationPolicy(
            self.allow_private_networks, self.allow_hosts | {_entry(host, port)}, self.always_refused
        )

    def refusal(self, address: Address) -> Literal["not_public", "always_refused"] | None:
        """Why ``address`` may not be contacted (for a destination not allowlisted), or None."""
        if not self.allow_private_networks and not is_public(address):
            return "not_public"
        if any(form in network for form in _forms(address) for network in self.always_refused):
            return "always_refused"
        return None

    def check(self, url: str, *, purpose: str) -> None:
        """Raise :class:`ForbiddenDestination` unless ``url`` may be contacted.

        ``purpose`` ("task 3f2a..., file 'a.mp4' from https://...") goes into the message.
        """
        parts = urlsplit(url)
        if parts.scheme not in ALLOWED_SCHEMES:
            raise ForbiddenDestination(f"{purpose}: {parts.scheme!r} URLs are not fetched; use http or https")
        host, port = host_port(url)
        if not host:
            raise ForbiddenDestination(f"{purpose}: the URL has no host")
        if self.allowlisted(host, port):
            return
        name = host.rstrip(".")
        if not self.allow_private_networks and (name == "localhost" or name.endswith(".localhost")):
            raise ForbiddenDestination(
                f"{purpose}: {host} is loopback (by name), which is not a public address; {_NOT_PUBLIC_HINT}"
            )
        for address in self._resolve(host, port, purpose):
            reason = self.refusal(address)
            if reason == "always_refused":
                raise ForbiddenDestination(
                    f"{purpose}: {host} is {address}, a link-local or cloud metadata address; haul refuses "
                    "those even with HAUL_ALLOW_PRIVATE_NETWORKS (list the exact host:port in HAUL_ALLOW_HOSTS "
                    "only if this destination really is wanted)"
                )
            if reason is not None:
                raise ForbiddenDestination(
                    f"{purpose}: {host} is {address}, which is not a public address; {_NOT_PUBLIC_HINT}"
                )

    def session(self, proxy: str | None = None) -> requests.Session:
        """A requests session whose connections pass the connect-time check.

        requests looks at the environment on every request (proxy variables, a CA bundle,
        ``~/.netrc``: file lookups and a scan of all variables). The CA bundle variables are
        read here once; the rest is switched off unless a proxy variable is set at start-up,
        which also means origins never get ``~/.netrc`` credentials: haul's credentials travel
        in task URLs.
        """
        session = requests.Session()
        session.mount("http://", GuardedAdapter(self, https=False))
        session.mount("https://", GuardedAdapter(self, https=True))
        if proxy:
            session.proxies = {"http": proxy, "https": proxy}
        bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
        if bundle:
            session.verify = bundle
        session.trust_env = bool(urllib.request.getproxies())
        return session

    @staticmethod
    def _resolve(host: str, port: int, purpose: str) -> list[Address]:
        try:
            infos = socket.getaddrinfo(host.strip("[]"), port, proto=socket.IPPROTO_TCP)
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


_NOT_PUBLIC_HINT = (
    "haul refuses loopback, private, link-local and metadata destinations (list an internal origin in "
    "HAUL_ALLOW_HOSTS, or set HAUL_ALLOW_PRIVATE_NETWORKS=1 only on a trusted network)"
)
