"""Command line of ``vhostmem``, the back-end (``vhostmem-ctl`` is :mod:`vhostmem.ctl`).

The only place ``trio.run`` is called. ``main`` returns the exit status so tests can call it
directly.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, NoReturn

from vhostmem import __version__
from vhostmem.faults import FaultSpecError, parse_fault

if TYPE_CHECKING:
    from vhostmem.sockets import BoundSockets

# The back-end binds its sockets before importing trio, construct and the rest (python -X
# importtime lists them), so the socket accepts before they load (tools/bench's launch row
# times exec to accepting); the rest loads in main().

__all__ = ["main", "parse_size"]

_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``4096``, ``0x1000``, ``512M``, ``1G``, ``1TiB`` -> bytes."""
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    suffix = value[-1:] if value[-1:] in "KMGT" else ""
    number = value[: len(value) - len(suffix)]
    try:
        return int(number, 0) * _SUFFIXES[suffix]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 4096, 512M, 1G)") from None


def _gpa_range(text: str) -> tuple[int, int]:
    start, sep, end = text.partition("-")
    try:
        low, high = int(start, 0), int(end, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a range: {text!r} (START-END, e.g. 0x100000000-0x140000000)"
        ) from None
    if not sep or high <= low:
        raise argparse.ArgumentTypeError(f"{text!r}: END must be above START")
    return (low, high)


def _die(msg: str, code: int = 1) -> NoReturn:
    print(f"vhostmem: {msg}", file=sys.stderr)
    raise SystemExit(code)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vhostmem",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
A vhost-user back-end that receives the guest memory table from QEMU, maps every region, and
keeps a live table you can query with vhostmem-ctl.

Start it first, then QEMU with a vhost-user device on the same socket:

  vhostmem --socket /tmp/vu.sock --event-log /tmp/vu.events
  qemu-system-x86_64 ... -object memory-backend-memfd,id=mem0,size=512M,share=on \\
      -machine q35,memory-backend=mem0 -m 512M \\
      -chardev socket,id=c0,path=/tmp/vu.sock \\
      -netdev vhost-user,id=n0,chardev=c0 -device virtio-net-pci,netdev=n0

Guest memory must be shared (share=on) or QEMU sends nothing. Nothing about memory arrives until
the guest's virtio-net driver starts the device. Without --tap the guest NIC passes no traffic:
vhostmem accepts the rings but moves no packets. With --tap NAME (root) it moves the guest's
frames to and from a TAP device, in a network namespace with --netns:

  vhostmem --socket /tmp/vu.sock --tap vhm0 --netns vhm --tap-address 192.0.2.1/24""",
        epilog="""\
Then, in another terminal:
  vhostmem-ctl --control /tmp/vu.sock.ctl regions     the region table
  vhostmem-ctl --control /tmp/vu.sock.ctl map         a picture of guest physical memory
  vhostmem-ctl --control /tmp/vu.sock.ctl peek 0x100000 64
""",
    )
    where = parser.add_argument_group("where to serve")
    where.add_argument(
        "--socket",
        "--socket-path",
        dest="sockets",
        action="append",
        default=[],
        metavar="PATH",
        help="listen on this Unix socket for QEMU (repeatable). The path appears only once it "
        "accepts; a stale socket there is replaced, any other file is left alone",
    )
    where.add_argument(
        "--fd",
        dest="fds",
        action="append",
        type=int,
        default=[],
        metavar="N",
        help="serve an inherited socket: listening (accepts front-ends) or already connected "
        "(serves it once); needs --control; not with --socket (QEMU's back-end conventions)",
    )
    where.add_argument(
        "--connect",
        action="append",
        default=[],
        metavar="PATH",
        help="connect to a front-end that listens (QEMU -chardev socket,server=on), retrying "
        "until it does, and again after each disconnect",
    )
    where.add_argument(
        "--control",
        metavar="PATH",
        help="control socket for vhostmem-ctl (default: the first socket path + .ctl)",
    )
    where.add_argument(
        "--socket-mode",
        type=lambda s: int(s, 8),
        default=0o600,
        metavar="OCTAL",
        help="permissions of the sockets vhostmem creates (default 0600)",
    )
    offer = parser.add_argument_group("what to offer QEMU")
    offer.add_argument(
        "--max-slots",
        type=int,
        default=509,
        metavar="N",
        help="memory slots offered (GET_MAX_MEM_SLOTS, default 509). Below 509 QEMU's "
        "virtio-mem silently falls back to one memslot for the whole device",
    )
    offer.add_argument(
        "--no-mem-slots",
        action="store_true",
        help="withhold CONFIGURE_MEM_SLOTS: QEMU then sends whole SET_MEM_TABLEs of at most 8 "
        "regions instead of ADD_MEM_REG/REM_MEM_REG",
    )
    offer.add_argument(
        "--no-dirty-log",
        action="store_true",
        help="withhold VHOST_F_LOG_ALL and LOG_SHMFD: QEMU then refuses to migrate the guest "
        "(a migration blocker naming LOG_SHMFD)",
    )
    offer.add_argument(
        "--strict-protocol",
        action="store_true",
        help="keep to the vhost-user spec's order: refuse, as a failure, a request before "
        "SET_OWNER and a second SET_OWNER, and start a ring at its SET_VRING_BASE even when "
        "its used index says otherwise. By default these, which real front-ends take (DPDK's "
        "virtio-user reconnecting in server mode), are served as libvhost-user and DPDK serve "
        "them, each with a protocol-deviation event and a log line (README, Leniencies)",
    )
    offer.add_argument(
        "--queues", type=int, default=1, metavar="N", help="queue pairs (GET_QUEUE_NUM, default 1)"
    )
    offer.add_argument(
        "--max-mapped",
        type=parse_size,
        metavar="SIZE",
        help="refuse mappings beyond this many bytes in total (default: no limit)",
    )
    net = parser.add_argument_group(
        "data path (without --tap the rings are accepted and no packets move)"
    )
    net.add_argument(
        "--tap",
        metavar="NAME",
        help="bridge the guest NIC (queue pair 0) to TAP device NAME: created, or attached to "
        "if an unattached TAP of that name exists, and brought up; offers MRG_RXBUF and "
        "EVENT_IDX. Needs CAP_NET_ADMIN. What vhostmem created is removed when it exits",
    )
    net.add_argument(
        "--netns",
        metavar="NS",
        help="put the TAP in network namespace NS (/run/netns/NS; created if missing, and then "
        "removed at exit)",
    )
    net.add_argument(
        "--tap-address",
        metavar="CIDR",
        help="give the TAP this address, e.g. 192.0.2.1/24 (removed at exit)",
    )
    out_merge = parser.add_argument_group("merged view (vhostmem-ctl regions --merged)")
    out_merge.add_argument(
        "--unmergeable",
        action="append",
        default=[],
        type=_gpa_range,
        metavar="START-END",
        help="a GPA range (0x-hex or decimal, END exclusive) whose edges the merged view never "
        "crosses, like QEMU's unmergeable memslot aliases (repeatable)",
    )
    out_merge.add_argument(
        "--no-merge",
        action="store_true",
        help="the merged view shows every received region on its own",
    )
    offer.add_argument(
        "--inject",
        action="append",
        default=[],
        metavar="SPEC",
        help="make chosen requests fail on purpose (repeatable), e.g. "
        "ADD_MEM_REG:nth=2:errno=ENOMEM, ADD_MEM_REG:nth=2:ack=1, REM_MEM_REG:every:delay=500ms, "
        "ADD_MEM_REG:nth=3:disconnect. Parts: nth=N | every, count=K, errno=NAME, ack=V, "
        "delay=TIME, disconnect. Counting is per rule from when it was added; at run time: "
        "vhostmem-ctl inject SPEC",
    )
    where.add_argument(
        "--allow-uid",
        dest="allow_uids",
        action="append",
        type=int,
        default=[],
        metavar="UID",
        help="accept front-ends (and control clients) only from this user id (repeatable; "
        "checked with SO_PEERCRED, refusals are logged)",
    )
    where.add_argument(
        "--send-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="drop a front-end that has not read its replies for this long (default 10); it "
        "stalls only its own connection",
    )
    where.add_argument(
        "--linger-ms",
        type=float,
        default=0.0,
        metavar="MS",
        help="after each message, wait up to MS in the kernel for the front-end's next one "
        "before handing the connection back to the event loop (default 0: never; the kernel "
        "waits in whole ticks and one more: 1 ms waited 8 ms at HZ=250). Saves a trip "
        "through the event loop per request for a single front-end, but while a read waits "
        "every other socket, the control socket and --tap traffic wait too (tools/bench row "
        "'GET_FEATURES, 2nd front-end')",
    )
    out = parser.add_argument_group("what to record")
    out.add_argument(
        "--event-log",
        metavar="FILE",
        help="append one JSON object per line: every memory-table request, connects, "
        "disconnects and failures",
    )
    out.add_argument(
        "--batch-gap",
        type=float,
        default=20.0,
        metavar="MS",
        help="memory requests arriving within MS of our previous reply belong to one batch (one "
        "QEMU memory commit); violations of per-memslot atomicity are judged per batch "
        "(default 20)",
    )
    out.add_argument(
        "--qemu-trace",
        action="append",
        default=[],
        metavar="[SOCKET=]FILE",
        help="QEMU's trace log (QEMU run with -trace vhost_commit -trace vhost_user_write "
        "-trace vhost_user_read -D FILE -msg timestamp=on): batches are then exactly QEMU's "
        "commits, not a timing guess; the file may appear later and be replaced when QEMU "
        "restarts. SOCKET=FILE for one socket when several are served (repeatable)",
    )
    out.add_argument(
        "--trace-wait",
        type=float,
        default=2000.0,
        metavar="MS",
        help="how long a memory request's verdict waits for its lines in --qemu-trace before "
        "it falls back to the gap rule and says so (default 2000)",
    )
    out.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="stderr log level (debug shows every request)",
    )
    parser.add_argument(
        "--print-capabilities",
        action="store_true",
        help='print {"type": "net"} and exit (QEMU back-end program conventions)',
    )
    parser.add_argument("--version", action="version", version=f"vhostmem {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the back-end; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.print_capabilities:
        print(json.dumps({"type": "net"}))
        return 0
    if not (args.sockets or args.fds or args.connect):
        parser.error("say where to serve: --socket PATH, --fd N or --connect PATH")
    if args.sockets and args.fds:
        # vhost-user.rst, "Backend program conventions": --socket-path is incompatible with
        # --fd, and --fd with --socket-path; a management layer passes one or the other.
        parser.error(
            "--fd and --socket (--socket-path) are mutually exclusive (QEMU's vhost-user "
            "back-end program conventions): serve the inherited socket with --fd N --control "
            "PATH, or let vhostmem listen with --socket PATH"
        )
    control = args.control
    if control is None:
        if args.fds and not args.sockets and not args.connect:
            parser.error("--fd needs --control PATH (there is no socket path to put it beside)")
        control = (args.sockets or args.connect)[0] + ".ctl"
    if args.max_slots < 1:
        parser.error("--max-slots must be at least 1")
    if args.queues < 1:
        parser.error("--queues must be at least 1")
    if args.send_timeout <= 0:
        parser.error("--send-timeout must be more than 0 seconds")
    if args.batch_gap < 0 or args.linger_ms < 0:
        parser.error("--batch-gap and --linger-ms must not be negative")
    if args.trace_wait <= 0:
        parser.error("--trace-wait must be more than 0 ms")
    args.qemu_trace = _qemu_trace_option(parser, args.qemu_trace, [*args.sockets, *args.connect])
    for spec in args.inject:
        try:
            parse_fault(spec)
        except FaultSpecError as err:
            parser.error(f"--inject {err}")
    if args.tap is None and (args.netns or args.tap_address):
        parser.error("--netns and --tap-address need --tap NAME")
    if args.tap is not None:
        from vhostmem.tap import TapConfig, TapError

        try:
            TapConfig(args.tap, args.netns, args.tap_address).check()
        except TapError as err:
            parser.error(str(err))
    from vhostmem.sockets import SocketError, open_sockets

    # Until the server loop takes SIGTERM over, a SIGTERM must still clean up: the socket
    # exists from here on.
    signal.signal(signal.SIGTERM, _stop_early)
    try:
        bound = open_sockets(tuple(args.sockets), tuple(args.fds), control, args.socket_mode)
    except SocketError as err:
        _die(str(err))
    except OSError as err:
        _die(f"{err.filename or ''}: {err.strerror or err}".lstrip(": "))
    try:
        return _serve(args, control, bound)
    except (_StopEarly, KeyboardInterrupt):
        return 0
    finally:
        bound.close()


class _StopEarly(Exception):
    """SIGTERM before the server loop ran."""


def _stop_early(signum: int, frame: object) -> None:
    raise _StopEarly


def _serve(args: argparse.Namespace, control: str, bound: BoundSockets) -> int:
    import logging

    import trio

    from vhostmem.mapping import raise_nofile_limit
    from vhostmem.server import ServerConfig, run
    from vhostmem.session import SessionConfig
    from vhostmem.tap import TapConfig, TapError

    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    old, new = raise_nofile_limit()
    logging.getLogger("vhostmem").debug("RLIMIT_NOFILE soft limit %d -> %d", old, new)
    config = ServerConfig(
        sockets=tuple(args.sockets),
        fds=tuple(args.fds),
        connect=tuple(args.connect),
        control=control,
        event_log=args.event_log,
        session=SessionConfig(
            queues=args.queues,
            max_slots=args.max_slots,
            mem_slots=not args.no_mem_slots,
            net=args.tap is not None,
            dirty_log=not args.no_dirty_log,
            strict=args.strict_protocol,
        ),
        socket_mode=args.socket_mode,
        max_mapped=args.max_mapped,
        inject=tuple(args.inject),
        allow_uids=tuple(args.allow_uids),
        unmergeable=tuple(args.unmergeable),
        merge=not args.no_merge,
        tap=TapConfig(args.tap, args.netns, args.tap_address) if args.tap else None,
        send_timeout=args.send_timeout,
        batch_gap=args.batch_gap / 1000,
        linger=args.linger_ms / 1000,
        qemu_trace=args.qemu_trace,
        trace_wait=args.trace_wait / 1000,
    )
    try:
        trio.run(functools.partial(run, config, bound=bound))
    except TapError as err:
        _die(str(err))
    except OSError as err:
        _die(f"{err.filename or ''}: {err.strerror or err}".lstrip(": "))
    except KeyboardInterrupt:
        pass
    return 0


def _qemu_trace_option(
    parser: argparse.ArgumentParser, values: Sequence[str], sockets: Sequence[str]
) -> tuple[tuple[str, str], ...]:
    """``--qemu-trace FILE`` (every socket) or ``SOCKET=FILE`` (one socket) as pairs."""
    out: dict[str, str] = {}
    for value in values:
        sock, eq, path = value.partition("=")
        if eq and sock not in sockets:
            if not os.path.exists(value):
                parser.error(
                    f"--qemu-trace {value!r}: {sock!r} is not a socket given with --socket or "
                    f"--connect ({', '.join(sockets) or 'none'}); give FILE for every socket"
                )
            eq = ""
        if not eq:
            sock, path = "", value  # one file for every socket (its name may hold '=')
        if not path:
            parser.error(f"--qemu-trace {value!r}: give a FILE, or SOCKET=FILE")
        if sock in out:
            parser.error(
                f"--qemu-trace given twice for {sock or 'every socket'}: {out[sock]} and {path}"
            )
        out[sock] = path
    return tuple(out.items())
