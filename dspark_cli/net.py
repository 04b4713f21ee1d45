"""Network addresses: what counts as this machine only (servers listen there unless told otherwise), and what
llama.cpp's RPC sockets can use (IPv4 only: its server binds AF_INET to inet_addr(host), its client connects
an AF_INET socket to gethostbyname(host); ggml-rpc/transport.cpp)."""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def ipv4_listen_address(host: str) -> str | None:
    """The IPv4 address llama.cpp's RPC server can listen on for `host` (a dotted-quad address; `localhost` is
    127.0.0.1), or None: an IPv6 address or a host name, which it cannot bind."""
    if host == "localhost":
        return "127.0.0.1"
    try:
        address = ipaddress.IPv4Address(host)
    except ValueError:
        return None
    return None if address == ipaddress.IPv4Address("255.255.255.255") else str(address)  # inet_addr's error value


def is_ipv6_literal(host: str) -> bool:
    """An IPv6 address, bare or in brackets (what llama.cpp's RPC client cannot connect to)."""
    return ":" in host or host.startswith("[")
