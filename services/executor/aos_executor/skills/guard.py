"""Which hosts http_call may reach: the external-calls switch and the SSRF guard.

- `DISABLE_EXTERNAL_CALLS=1`: every host not on the allow-list is refused before any
  DNS lookup (a lookup is already a call out).
- SSRF guard, always on: the host is resolved and every address it resolves to must be
  a public one. Loopback, private, link-local (which holds the cloud metadata endpoint
  169.254.169.254), shared, reserved, multicast and unspecified addresses are refused
  unless the host or the address is on the allow-list.

Allow-list entries (`AOS_HTTP_ALLOW_HOSTS`, comma separated): a host name
(`api.example.com`), a suffix wildcard (`*.example.com`), an IP address (`127.0.0.1`)
or a network (`10.0.0.0/8`). Both refusals fail the step with EXTERNAL_CALLS_DISABLED
(not retryable: the same call would be refused again).

The connection goes to the first address the check returned (http_call pins it in the
URL and sends the name in `Host` and, for TLS, as SNI and in the certificate check), so
a DNS server that answers differently the second time (rebinding) cannot redirect it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from aos_contracts.failures import FailureCode
from aos_executor.skills.base import SkillError

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Awaitable[list[str]]]

# Metadata endpoints that are not link-local (Alibaba Cloud's sits in shared space).
METADATA_ADDRESSES = frozenset(
    {ipaddress.ip_address("100.100.100.200"), ipaddress.ip_address("fd00:ec2::254")}
)


async def resolve_host(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    return sorted({str(info[4][0]) for info in infos})


def is_forbidden_address(address: IpAddress) -> bool:
    """Not a public unicast address: an SSRF target unless explicitly allowed."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return (
        address in METADATA_ADDRESSES
        or not address.is_global
        or address.is_multicast
        or address.is_link_local
        or address.is_loopback
        or address.is_private
        or address.is_reserved
        or address.is_unspecified
    )


def _ip(text: str) -> IpAddress | None:
    try:
        return ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None


@dataclass
class HostPolicy:
    disable_external_calls: bool = False
    allow: tuple[str, ...] = ()
    resolver: Resolver = resolve_host
    _names: set[str] = field(default_factory=set, init=False)
    _suffixes: list[str] = field(default_factory=list, init=False)
    _networks: list[IpNetwork] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        for raw in self.allow:
            entry = raw.strip().lower()
            if not entry:
                continue
            if entry.startswith("*."):
                self._suffixes.append(entry[1:])
                continue
            try:
                self._networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                self._names.add(entry.rstrip("."))

    @classmethod
    def from_list(cls, disable: bool, allow: str | Iterable[str]) -> HostPolicy:
        entries = allow.split(",") if isinstance(allow, str) else list(allow)
        return cls(disable, tuple(entry.strip() for entry in entries if entry.strip()))

    def host_allowed(self, host: str) -> bool:
        name = host.lower().rstrip(".")
        if name in self._names or any(name.endswith(suffix) for suffix in self._suffixes):
            return True
        address = _ip(name)
        return address is not None and self.address_allowed(address)

    def address_allowed(self, address: IpAddress) -> bool:
        return any(address in network for network in self._networks)

    async def check(self, host: str, port: int) -> list[str]:
        """The addresses `host` resolves to, all allowed; or SkillError."""
        allowed_by_name = self.host_allowed(host)
        if self.disable_external_calls and not allowed_by_name:
            raise SkillError.of(
                FailureCode.EXTERNAL_CALLS_DISABLED,
                f"http_call to {host!r} refused: DISABLE_EXTERNAL_CALLS is on and the host "
                "is not on the allow-list (AOS_HTTP_ALLOW_HOSTS)",
            )
        literal = _ip(host)
        if literal is not None:
            addresses = [str(literal)]
        else:
            try:
                addresses = await self.resolver(host, port)
            except OSError as exc:
                raise SkillError.of(
                    FailureCode.SKILL_ERROR, f"http_call: cannot resolve {host!r}: {exc}"
                ) from exc
        for text in addresses:
            address = ipaddress.ip_address(text)
            if is_forbidden_address(address) and not (
                allowed_by_name or self.address_allowed(address)
            ):
                raise SkillError.of(
                    FailureCode.EXTERNAL_CALLS_DISABLED,
                    f"http_call to {host!r} refused: it resolves to {address}, a private, "
                    "loopback, link-local or metadata address (SSRF guard); allow it "
                    "explicitly with AOS_HTTP_ALLOW_HOSTS",
                )
        return addresses
