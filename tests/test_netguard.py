"""The destination policy on its own: what is refused before a request, what is refused at
connect time, and the exact host:port exceptions. Requests go only to test servers on
127.0.0.1; link-local and metadata addresses are only ever judged, never contacted."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from ipaddress import ip_network
from typing import Any

import pytest
import requests

from actors.connections import refused_at_connect
from actors.errors import ForbiddenDestination
from actors.netguard import DestinationPolicy
from tests.servers import Origin

pytestmark = pytest.mark.fast

#: Loopback in both families: a stand-in for the always-refused networks that a test may contact.
LOOPBACK = (ip_network("127.0.0.0/8"), ip_network("::1/128"))

METADATA = [
    "http://169.254.169.254/latest/meta-data/",  # AWS, GCP, Azure IMDS, OpenStack, ...
    "http://169.254.0.23/",  # Tencent Cloud
    "http://[fe80::1]/",
    "http://168.63.129.16/machine?comp=goalstate",  # Azure wire server (public address space)
    "http://100.100.100.200/latest/meta-data/",  # Alibaba Cloud (CGNAT space)
    "http://[fd00:ec2::254]/latest/meta-data/",  # AWS IPv6
    "http://[fd20:ce::254]/computeMetadata/v1/",  # Google Cloud IPv6
    "http://[::ffff:169.254.169.254]/",  # the same, IPv4-mapped
    "http://[64:ff9b::a9fe:a9fe]/",  # NAT64
    "http://2852039166/",  # 169.254.169.254 as one number
]


@pytest.mark.parametrize("url", METADATA)
@pytest.mark.parametrize("allow_private", [False, True])
def test_link_local_and_metadata_addresses_are_refused_even_with_private_networks(
    url: str, allow_private: bool
) -> None:
    with pytest.raises(ForbiddenDestination, match="task t: .* is ") as info:
        DestinationPolicy(allow_private).check(url, purpose="task t")
    if allow_private:
        assert "link-local or cloud metadata address" in str(info.value)
        assert "HAUL_ALLOW_HOSTS" in str(info.value)


def test_deprecated_site_local_ipv6_is_not_public() -> None:
    with pytest.raises(ForbiddenDestination, match="fec0::1, which is not a public address"):
        DestinationPolicy(False).check("http://[fec0::1]/a.mp4", purpose="task t")
    DestinationPolicy(True).check("http://[fec0::1]/a.mp4", purpose="task t")  # private, not always refused


def test_only_an_exact_allow_hosts_entry_reaches_a_metadata_address() -> None:
    policy = DestinationPolicy(True, frozenset({"169.254.169.254:80", "[fd00:ec2::254]:80"}))
    policy.check("http://169.254.169.254/latest/", purpose="task t")  # judged only, never sent
    policy.check("http://[fd00:ec2::254]/latest/", purpose="task t")
    with pytest.raises(ForbiddenDestination, match="169.254.169.254"):
        policy.check("http://169.254.169.254:8080/latest/", purpose="task t")


def test_always_refused_networks_hold_before_the_request_and_at_connect_time(origin: Origin) -> None:
    """With private networks on, the always-refused networks are refused twice: by check(),
    and by the adapter when ``localhost`` resolves at connect time (no check() before)."""
    origin.put("/v.mp4", b"video")
    policy = DestinationPolicy(allow_private_networks=True, always_refused=LOOPBACK)
    for url in (f"http://127.0.0.1:{origin.port}/v.mp4", f"http://localhost:{origin.port}/v.mp4"):
        with pytest.raises(ForbiddenDestination, match="link-local or cloud metadata"):
            policy.check(url, purpose="task t")
    with pytest.raises(requests.RequestException) as info:
        policy.session().get(f"http://localhost:{origin.port}/v.mp4", timeout=5)
    assert refused_at_connect(info.value), info.value
    assert origin.requests == []
    # The same server answers once the network is not refused: the refusal above was the guard's.
    answer = DestinationPolicy(True).session().get(f"http://127.0.0.1:{origin.port}/v.mp4", timeout=5)
    assert answer.status_code == 200 and answer.content == b"video"


@pytest.fixture
def rebinding_dns(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """``rebound.test`` answers each lookup with the next address of the list (the last one
    repeats): a name whose DNS answer changes between the check and the connection."""
    answers: list[str] = []
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host != "rebound.test":
            return real(host, port, *args, **kwargs)
        address = answers.pop(0) if len(answers) > 1 else answers[0]
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, int(port or 80)))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield answers


def test_connect_time_pins_the_address_it_judged_with_private_networks_on(
    origin: Origin, rebinding_dns: list[str]
) -> None:
    origin.put("/v.mp4", b"video")
    url = f"http://rebound.test:{origin.port}/v.mp4"
    policy = DestinationPolicy(True, always_refused=(ip_network("127.0.0.2/32"),))
    # check() sees an allowed address, the connection would go to a refused one: refused.
    rebinding_dns[:] = ["127.0.0.1", "127.0.0.2"]
    policy.check(url, purpose="task t")
    with pytest.raises(requests.RequestException) as info:
        policy.session().get(url, timeout=5)
    assert refused_at_connect(info.value), info.value
    assert origin.requests == []
    # An allowed answer: the connection goes to the address judged, under the URL's name.
    rebinding_dns[:] = ["127.0.0.1"]
    answer = policy.session().get(url, timeout=5)
    assert answer.content == b"video"
    assert origin.requests[-1].headers["Host"] == f"rebound.test:{origin.port}"


def test_private_networks_off_still_refuse_loopback_at_connect_time(origin: Origin) -> None:
    origin.put("/v.mp4", b"video")
    with pytest.raises(requests.RequestException) as info:
        DestinationPolicy(False).session().get(f"http://localhost:{origin.port}/v.mp4", timeout=5)
    assert refused_at_connect(info.value)
    assert origin.requests == []


def test_trusting_admits_exactly_the_operators_host_and_port(origin: Origin) -> None:
    origin.put("/hook", b"ok")
    hook = f"http://127.0.0.1:{origin.port}/hook"
    policy = DestinationPolicy(False, frozenset({"cdn.internal:8080"}))
    trusted = policy.trusting(hook)
    trusted.check(hook, purpose="webhook")
    assert trusted.session().get(hook, timeout=5).content == b"ok"
    assert trusted.allow_hosts == {"cdn.internal:8080", f"127.0.0.1:{origin.port}"}
    assert trusted.allow_private_networks is False and trusted.always_refused == policy.always_refused
    with pytest.raises(ForbiddenDestination):  # the original is unchanged
        policy.check(hook, purpose="webhook")
    with pytest.raises(ForbiddenDestination):  # another port on the same host is not the operator's
        trusted.check(f"http://127.0.0.1:{origin.port + 1}/hook", purpose="webhook")
    assert DestinationPolicy(False).trusting("https://[FD00::5]/hooks").allow_hosts == {"[fd00::5]:443"}
    with pytest.raises(ValueError, match="not an http"):
        policy.trusting("/relative/hook")
