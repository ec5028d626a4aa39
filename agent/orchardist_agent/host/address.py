"""The address this host's engines are reached at: the first non-loopback IPv4, or an override.

Interfaces are listed without sending anything: ``ifconfig`` on macOS, the SIOCGIFADDR ioctl per
interface on Linux. A machine with only loopback (a CI box) gets 127.0.0.1, the honest answer.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import sys
from collections.abc import Iterable

from .macos import Runner, parse_ifconfig

LOOPBACK = "127.0.0.1"
_SIOCGIFADDR = 0x8915  # Linux <linux/sockios.h>


def choose_address(candidates: Iterable[str], override: str | None = None) -> str:
    """The override if given, else the first usable IPv4 (not loopback, link-local or unspecified)."""
    if override:
        return override
    for candidate in candidates:
        try:
            ip = ipaddress.IPv4Address(candidate)
        except ValueError:
            continue
        if not (ip.is_loopback or ip.is_link_local or ip.is_unspecified):
            return candidate
    return LOOPBACK


def _linux_addresses() -> list[str]:
    import fcntl

    found: list[str] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue  # no IPv4 on this interface
            found.append(socket.inet_ntoa(packed[20:24]))
    return found


def host_addresses(run: Runner) -> list[str]:
    """This host's IPv4 addresses, in interface order."""
    if sys.platform == "darwin":
        return parse_ifconfig(run(("ifconfig",)) or "")
    if sys.platform.startswith("linux"):
        return _linux_addresses()
    return []
