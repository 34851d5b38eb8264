"""Command line of ``vhostmem-ctl``: ask a running vhostmem what it holds.

Each command asks the control socket (:class:`~vhostmem.control.ControlClient`) and prints the
answer as JSON (``--json``) or as text from :mod:`vhostmem.report`; ``explain`` needs no
running back-end. ``ctl_main`` returns the exit status so tests can call it directly: 0 ok,
1 the back-end answered with an error (``check``: a violation or a mismatch), 2 cannot run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from vhostmem.cli import parse_size

__all__ = ["build_ctl_parser", "ctl_main"]


def _int0(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r} (decimal or 0x-hex)") from None


def _json_flag(parser: argparse.ArgumentParser) -> None:
    # --json is accepted before or after the command's own arguments.
    parser.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print JSON for scripts"
    )


def build_ctl_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vhostmem-ctl",
        description="Ask a running vhostmem what it holds.",
        epilog="Exit status: 0 ok, 1 the back-end answered with an error, 2 cannot run "
        "(usage, no control socket).",
    )
    parser.add_argument(
        "--control",
        default=os.environ.get("VHOSTMEM_CONTROL"),
        metavar="PATH",
        help="vhostmem's control socket (default $VHOSTMEM_CONTROL; vhostmem puts it at its "
        "first socket path + .ctl)",
    )
    _json_flag(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("regions", help="the region table of every socket")
    p.add_argument(
        "--merged",
        action="store_true",
        help="coalesce adjacent regions (contiguous GPA, front-end address and file offset on "
        "one file) except across unmergeable markers, and say what kept each boundary",
    )
    p.add_argument(
        "--qmp",
        metavar="SOCKET",
        help="QEMU's QMP socket: take unmergeable markers from QEMU (virtio-mem memslot aliases, "
        "memory device ranges)",
    )
    _json_flag(p)
    p = sub.add_parser("map", help="a picture of the guest physical address space")
    _json_flag(p)
    p = sub.add_parser(
        "events",
        help="recent events: memory-table requests, connects, errors, protocol deviations, "
        "data-path totals",
    )
    p.add_argument("--limit", type=int, default=200, help="how many (default 200)")
    _json_flag(p)
    p = sub.add_parser("stats", help="counters: mapped bytes, fds, maps, requests, vrings")
    _json_flag(p)
    p = sub.add_parser(
        "peek",
        help="read guest memory through vhostmem's own mapping (never faults pages in)",
    )
    p.add_argument("gpa", type=_int0, help="guest physical address (decimal or 0x-hex)")
    p.add_argument("len", type=_int0, help="bytes to read (decimal or 0x-hex, at most 1 MiB)")
    p.add_argument("--socket", help="which vhost-user socket's table (default: the first)")
    _json_flag(p)
    p = sub.add_parser(
        "inject",
        help="add a fault-injection rule at run time (grammar: vhostmem --help), or list them",
    )
    p.add_argument("spec", nargs="?", help="e.g. ADD_MEM_REG:nth=2:errno=ENOMEM; none lists rules")
    p.add_argument("--clear", action="store_true", help="remove every rule first")
    _json_flag(p)
    p = sub.add_parser(
        "check",
        help="is every memory-table update atomic per memslot? with --qmp, does the table "
        "equal what QEMU should have sent? exit 0 clean, 1 violation or mismatch, 2 cannot run",
    )
    p.add_argument(
        "--qmp",
        metavar="SOCKET",
        help="QEMU's QMP socket: compare the live table region by region with QEMU's flat view "
        "run through the model of QEMU's vhost merging",
    )
    p.add_argument("--socket", help="which vhost-user socket's table to compare (default: all)")
    _json_flag(p)
    p = sub.add_parser(
        "explain",
        help="what QEMU sends for a virtio-mem plug sequence, with and without unmergeable "
        "memslots (QEMU >= 8.2 vs older); needs no running vhostmem",
        description="Each STEP is the set of plugged memslots after one change, e.g. "
        "'0' '0,1' '0,1,2' '-' (none). Default: 0 -> 0,1,2 -> 0 -> none, the recorded QEMU run.",
    )
    p.add_argument(
        "steps", nargs="*", metavar="STEP", help="plugged memslots, e.g. 0,1 (- for none)"
    )
    p.add_argument("--memslot-size", type=parse_size, default=1 << 30, metavar="SIZE")
    p.add_argument("--device-size", type=parse_size, default=4 << 30, metavar="SIZE")
    p.add_argument("--base", type=_int0, default=0x100000000, metavar="GPA", help="device memaddr")
    _json_flag(p)
    p = sub.add_parser(
        "diagnose",
        help="what matters for mapping on one screen: limits, huge page pools, mapped total, "
        "fds, slots",
    )
    _json_flag(p)
    p = sub.add_parser(
        "timeline",
        help="a run's memory table over time: a Perfetto trace (ui.perfetto.dev) and/or a "
        "self-contained HTML page, from an event log (or a running vhostmem's events)",
    )
    p.add_argument(
        "--event-log",
        metavar="FILE",
        help="vhostmem's event log (--event-log); without it, the events of the vhostmem at "
        "--control",
    )
    p.add_argument("--qemu-trace", metavar="FILE", help="QEMU's trace log (-trace vhost_* -D FILE)")
    p.add_argument("-o", "--output", metavar="OUT.pftrace", help="write the Perfetto trace")
    p.add_argument("--html", metavar="OUT.html", help="write the HTML page")
    return parser


#: vhostmem-ctl command -> (control command, renderer in vhostmem.report, request arguments).
#: Renderers are named, not imported: report loads only when a command prints.
_CTL: dict[str, tuple[str, str, Callable[[argparse.Namespace], dict[str, Any]]]] = {
    "regions": ("regions", "render_regions", lambda a: _regions_args(a)),
    "map": ("regions", "render_map", lambda a: {}),
    "events": ("events", "render_events", lambda a: {"limit": a.limit}),
    "stats": ("stats", "render_stats", lambda a: {}),
    "peek": (
        "peek",
        "render_peek",
        lambda a: {"gpa": a.gpa, "len": a.len} | ({"socket": a.socket} if a.socket else {}),
    ),
    "inject": (
        "inject",
        "render_faults",
        lambda a: ({"spec": a.spec} if a.spec else {}) | ({"clear": True} if a.clear else {}),
    ),
    "diagnose": ("diagnose", "render_diagnose", lambda a: {}),
}


def _regions_args(args: argparse.Namespace) -> dict[str, Any]:
    if not args.merged:
        return {}
    markers: list[list[Any]] = []
    if args.qmp:
        from vhostmem.qmp import query_memory, unmergeable_markers

        view = query_memory(args.qmp)
        markers = [[m.start, m.end, m.source] for m in unmergeable_markers(view)]
    return {"merged": True, "markers": markers}


def _explain(args: argparse.Namespace) -> int:
    from vhostmem.qemu_model import explain
    from vhostmem.report import render_explain

    steps: list[set[int]] = []
    for text in args.steps or ["0", "0,1,2", "0", "-"]:
        try:
            steps.append(set() if text == "-" else {int(i) for i in text.split(",")})
        except ValueError:
            print(
                f"vhostmem-ctl: step {text!r} is not a comma list of memslot numbers",
                file=sys.stderr,
            )
            return 2
    doc = explain(
        steps,
        base_gpa=args.base,
        region_size=args.device_size,
        memslot_size=args.memslot_size,
    )
    print(
        json.dumps(doc, indent=2, sort_keys=True)
        if getattr(args, "json", False)
        else render_explain(doc)
    )
    return 0


def _check(args: argparse.Namespace) -> int:
    from qemu.qmp import QMPError

    from vhostmem.control import ControlClient, ControlError
    from vhostmem.report import render_check

    client = ControlClient(args.control)
    try:
        doc = client.call("check")
        regions = client.call("regions")["regions"] if args.qmp else []
    except ControlError as err:
        print(f"vhostmem-ctl: {err}", file=sys.stderr)
        return 2
    ok = bool(doc["clean"])
    if args.qmp:
        from vhostmem.qmp import expected_regions, query_memory

        try:
            view = query_memory(args.qmp)
        except (OSError, QMPError) as err:
            print(f"vhostmem-ctl: cannot ask QEMU over QMP ({args.qmp}): {err}", file=sys.stderr)
            return 2
        want = {(r.gpa, r.size, r.mmap_offset) for r in expected_regions(view)}
        have = {
            (r["gpa"], r["size"], r["mmap_offset"])
            for r in regions
            if args.socket in (None, r["socket"])
        }
        doc["qmp"] = {
            "expected": sorted(want),
            "missing": sorted(want - have),
            "unexpected": sorted(have - want),
            "matches": want == have,
        }
        ok = ok and want == have
    if getattr(args, "json", False):
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        print(render_check(doc, args.qmp))
    return 0 if ok else 1


def _timeline(args: argparse.Namespace) -> int:
    from vhostmem.qemu_trace import parse_lines
    from vhostmem.timeline import build_trace, parse_event_lines, render_html, replay

    if not args.output and not args.html:
        print(
            "vhostmem-ctl timeline: say what to write: -o OUT.pftrace, --html OUT.html or both",
            file=sys.stderr,
        )
        return 2
    try:
        if args.event_log:
            with open(args.event_log, encoding="utf-8") as f:
                events = parse_event_lines(f)
        elif args.control:
            from vhostmem.control import ControlClient, ControlError

            try:
                events = ControlClient(args.control).call("events", limit=1 << 30)["events"]
            except ControlError as err:
                print(f"vhostmem-ctl: {err}", file=sys.stderr)
                return 2
        else:
            print(
                "vhostmem-ctl timeline: --event-log FILE is required (or --control PATH / "
                "VHOSTMEM_CONTROL to read a running vhostmem's events)",
                file=sys.stderr,
            )
            return 2
        trace = []
        if args.qemu_trace:
            with open(args.qemu_trace, encoding="utf-8", errors="replace") as f:
                trace = parse_lines(f.read().splitlines())
    except (OSError, ValueError) as err:
        print(f"vhostmem-ctl timeline: cannot read the input: {err}", file=sys.stderr)
        return 2
    story = replay(events, trace)
    try:
        if args.output:
            data = build_trace(story)
            with open(args.output, "wb") as out:
                out.write(data)
        if args.html:
            with open(args.html, "w", encoding="utf-8") as out:
                out.write(render_html(story, f"vhostmem timeline: {args.event_log or 'events'}"))
    except OSError as err:
        print(f"vhostmem-ctl timeline: cannot write: {err}", file=sys.stderr)
        return 2
    v = story.verdict
    print(
        f"{v['requests']} memory-table request(s), {len(story.mappings)} region mapping(s), "
        f"{v['violations']} violation(s), {v['failed']} failed request(s)"
        + "".join(f"; wrote {p}" for p in (args.output, args.html) if p)
    )
    return 0


def ctl_main(argv: Sequence[str] | None = None) -> int:
    """``vhostmem-ctl``; returns the exit status."""
    parser = build_ctl_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return 2 if exc.code not in (0, None) else 0
    if args.command == "explain":
        return _explain(args)
    if args.command == "timeline":
        return _timeline(args)
    if not args.control:
        print("vhostmem-ctl: --control PATH is required (or set VHOSTMEM_CONTROL)", file=sys.stderr)
        return 2
    if args.command == "check":
        return _check(args)
    cmd, render_name, make_args = _CTL[args.command]
    if args.command == "regions" and args.merged:
        render_name = "render_merged"
    from qemu.qmp import QMPError

    from vhostmem import report
    from vhostmem.control import ControlClient, ControlError

    render: Callable[[dict[str, Any]], str] = getattr(report, render_name)

    try:
        request = make_args(args)
    except (OSError, QMPError) as err:
        print(f"vhostmem-ctl: cannot ask QEMU over QMP ({args.qmp}): {err}", file=sys.stderr)
        return 2
    try:
        result = ControlClient(args.control).call(cmd, **request)
    except ControlError as err:
        print(f"vhostmem-ctl: {err}", file=sys.stderr)
        return 2 if "cannot reach" in str(err) else 1
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print(render(result))
    return 0
