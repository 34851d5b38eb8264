"""The host side of the data path: a TAP device, in a network namespace when asked (pyroute2).

``vhostmem --tap NAME [--netns NS] [--tap-address CIDR]``: :func:`open_tap` creates the network
namespace if it does not exist, creates the TAP device inside it (or attaches to an existing,
unattached TAP of that name), brings it up and gives it the address. :meth:`Tap.close` removes
exactly what ``open_tap`` created, in reverse order: the address it added to a device it did not
create, the device (a TAP made here is not persistent: closing its fd removes it, even if the
process is killed), the namespace.

The TAP is made with ``TUNSETIFF`` on ``/dev/net/tun`` (there is no netlink request that
attaches a queue) while the calling thread is inside the namespace (pyroute2 ``pushns``/
``popns``), so a device of the same name outside the namespace is never touched. Everything
else (looking up the link, its kind, up, addresses, the namespace itself) goes through pyroute2.
The fd is non-blocking, without ``IFF_VNET_HDR``: one read is one Ethernet frame.
"""

from __future__ import annotations

import errno as errno_mod
import fcntl
import ipaddress
import logging
import os
import struct
from dataclasses import dataclass, field
from typing import Any, final

from vhostmem.errors import VhostMemError

# pyroute2 (a large import: python -X importtime shows it) is imported inside the functions that
# talk netlink, so a vhostmem without --tap never loads it (STYLE.md: no pyroute2 where nothing
# needs netlink).


def _pyroute2() -> None:
    """Import pyroute2, made safe for a process that handles SIGTERM itself.

    For namespace work pyroute2 forks a child (``pyroute2.process.ChildProcess``) and stops it
    with SIGTERM. The child inherits our Python SIGTERM handler; running it there would unwind a
    copy of *our* stack in the child, through our cleanup (which removes the socket files we
    created). ``disable_mp_signal`` makes the child reset SIGINT/SIGTERM to the defaults first.
    """
    from pyroute2 import config  # type: ignore[import-untyped,unused-ignore]

    config.disable_mp_signal = True
    # pyroute2 logs every netlink message at DEBUG; vhostmem's --log-level debug is about us.
    if logging.getLogger("pyroute2").level == logging.NOTSET:
        logging.getLogger("pyroute2").setLevel(logging.INFO)


__all__ = ["Tap", "TapConfig", "TapError", "open_tap"]

logger = logging.getLogger(__name__)

#: linux/if_tun.h
_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_IFNAMSIZ = 16
_TUN_DEVICE = "/dev/net/tun"


class TapError(VhostMemError):
    """The TAP device or its namespace cannot be set up; the text says why and what to do."""


@final
@dataclass(frozen=True, slots=True)
class TapConfig:
    """What ``--tap``, ``--netns`` and ``--tap-address`` asked for.

    Attributes:
        name: interface name (at most 15 bytes).
        netns: network namespace name (``ip netns`` style, under /run/netns); ``None``: ours.
        address: ``ADDRESS/PREFIX`` to put on the device, or ``None``.
    """

    name: str
    netns: str | None = None
    address: str | None = None

    def check(self) -> None:
        """Raise :class:`TapError` for a name or address Linux would refuse."""
        _check_ifname(self.name)
        if self.netns is not None and (
            not self.netns or "/" in self.netns or self.netns in (".", "..")
        ):
            raise TapError(f"network namespace name {self.netns!r} is not a plain file name")
        if self.address is not None:
            _parse_address(self.address)


def _check_ifname(name: str) -> None:
    raw = name.encode()
    if not raw or len(raw) >= _IFNAMSIZ or name in (".", "..") or any(c in name for c in "/: \t\n"):
        raise TapError(
            f"interface name {name!r} is not valid: 1 to {_IFNAMSIZ - 1} bytes, no '/', ':' "
            "or whitespace"
        )


def _parse_address(text: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    try:
        iface = ipaddress.ip_interface(text)
    except ValueError as err:
        raise TapError(
            f"--tap-address {text!r}: {err} (use ADDRESS/PREFIX, e.g. 192.0.2.1/24)"
        ) from None
    if "/" not in text:
        raise TapError(f"--tap-address {text!r} has no prefix length (e.g. 192.0.2.1/24)")
    return iface


@final
@dataclass(slots=True)
class Tap:
    """An open TAP device and what was created for it.

    Attributes:
        name: interface name.
        netns: its namespace name, or ``None``.
        fd: non-blocking fd of frames (-1 once closed).
        ifindex: interface index inside its namespace.
        mac: its Ethernet address.
        created_link: the device was made by :func:`open_tap` (it goes away with the fd).
        created_netns: the namespace was made by :func:`open_tap` (removed by close).
        added_address: the address :func:`open_tap` added, or ``None``.
        was_up: the device was already up before we attached (else close brings it down).
    """

    name: str
    netns: str | None
    fd: int
    ifindex: int = 0
    mac: str = ""
    created_link: bool = False
    created_netns: bool = False
    added_address: str | None = None
    was_up: bool = False
    _closed: bool = field(default=False, repr=False)

    def as_json(self) -> dict[str, Any]:
        return {
            "tap": self.name,
            "netns": self.netns,
            "ifindex": self.ifindex,
            "mac": self.mac,
            "address": self.added_address,
            "created_link": self.created_link,
            "created_netns": self.created_netns,
        }

    def close(self) -> None:
        """Remove what :func:`open_tap` created (address, device, namespace); idempotent.

        Every step is tried even if an earlier one failed; failures are logged.
        """
        if self._closed:
            return
        self._closed = True
        _pyroute2()
        from pyroute2 import IPRoute, netns  # type: ignore[import-untyped,unused-ignore]
        from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped,unused-ignore]

        if self.ifindex and not self.created_link and (self.added_address or not self.was_up):
            try:
                with IPRoute(netns=self.netns) as ipr:
                    if self.added_address:
                        iface = _parse_address(self.added_address)
                        ipr.addr(
                            "del",
                            index=self.ifindex,
                            address=str(iface.ip),
                            prefixlen=iface.network.prefixlen,
                        )
                    if not self.was_up:
                        ipr.link("set", index=self.ifindex, state="down")
            except (NetlinkError, OSError) as err:
                logger.warning("tap %s: cannot undo our address/state: %s", self.name, err)
        if self.fd >= 0:
            os.close(self.fd)  # a non-persistent TAP (the one we made) disappears here
            self.fd = -1
        if self.created_netns and self.netns is not None:
            try:
                netns.remove(self.netns)
            except OSError as err:
                logger.warning("cannot remove network namespace %s: %s", self.netns, err)


def _attach_tun(name: str, ns: str | None) -> int:
    """TUNSETIFF in ``ns`` (the calling thread enters it and comes back)."""
    _pyroute2()
    from pyroute2 import netns  # type: ignore[import-untyped,unused-ignore]

    if ns is not None:
        netns.pushns(ns)
    try:
        try:
            fd = os.open(_TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as err:
            raise TapError(
                f"cannot open {_TUN_DEVICE}: {err.strerror} (load the tun module: modprobe tun; "
                "in a container, pass the device: --device /dev/net/tun)"
            ) from err
        try:
            ifr = struct.pack("16sH", name.encode(), _IFF_TAP | _IFF_NO_PI)
            fcntl.ioctl(fd, _TUNSETIFF, ifr)
        except OSError as err:
            os.close(fd)
            hint = {
                errno_mod.EBUSY: "another process has it open (a TAP takes one reader); stop it "
                "or choose another --tap name",
                errno_mod.EPERM: "creating a TAP needs CAP_NET_ADMIN (run as root)",
                errno_mod.EINVAL: f"a device named {name} exists and is not a TAP (a TUN, or "
                "a TAP with other flags); choose another --tap name",
            }.get(err.errno or 0, "see tuntap.rst for TUNSETIFF")
            raise TapError(f"TUNSETIFF {name}: {err.strerror}: {hint}") from err
        return fd
    finally:
        if ns is not None:
            netns.popns()


def open_tap(config: TapConfig) -> Tap:
    """Create (or attach to) the TAP device ``config`` names, set it up, and return it.

    Raises:
        TapError: what failed, and what to do; nothing created is left behind.
    """
    config.check()
    _pyroute2()
    from pyroute2 import IPRoute, netns  # type: ignore[import-untyped,unused-ignore]
    from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped,unused-ignore]

    ns = config.netns
    tap = Tap(config.name, ns, -1)
    try:
        if ns is not None and ns not in netns.listnetns():
            try:
                netns.create(ns)
            except OSError as err:
                raise TapError(f"cannot create network namespace {ns}: {err}") from err
            tap.created_netns = True
        where = f" in network namespace {ns}" if ns else ""
        with IPRoute(netns=ns) as ipr:
            existing = ipr.link_lookup(ifname=config.name)
            if existing:
                link = ipr.get_links(existing[0])[0]
                info = link.get_attr("IFLA_LINKINFO")
                kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
                if kind != "tun":
                    raise TapError(
                        f"{config.name}{where} exists and is a {kind or 'plain'} device, not a "
                        "TAP; choose another --tap name"
                    )
                tap.was_up = bool(link["flags"] & 1)
        tap.fd = _attach_tun(config.name, ns)
        tap.created_link = not existing
        with IPRoute(netns=ns) as ipr:
            found = ipr.link_lookup(ifname=config.name)
            if not found:
                raise TapError(f"{config.name}{where} vanished right after TUNSETIFF")
            tap.ifindex = found[0]
            ipr.link("set", index=tap.ifindex, state="up")
            link = ipr.get_links(tap.ifindex)[0]
            tap.mac = str(link.get_attr("IFLA_ADDRESS") or "")
            if config.address is not None:
                iface = _parse_address(config.address)
                have = {
                    (a.get_attr("IFA_ADDRESS"), a["prefixlen"])
                    for a in ipr.get_addr(index=tap.ifindex)
                }
                if (str(iface.ip), iface.network.prefixlen) not in have:
                    ipr.addr(
                        "add",
                        index=tap.ifindex,
                        address=str(iface.ip),
                        prefixlen=iface.network.prefixlen,
                    )
                    tap.added_address = config.address
    except NetlinkError as err:
        tap.close()
        raise TapError(f"setting up TAP {config.name}: netlink said {err}") from err
    except BaseException:
        tap.close()
        raise
    logger.info(
        "TAP %s (ifindex %d, %s)%s%s%s",
        tap.name,
        tap.ifindex,
        tap.mac,
        f" in netns {ns}" if ns else "",
        f", address {config.address}" if config.address else "",
        " created" if tap.created_link else " attached",
    )
    return tap
