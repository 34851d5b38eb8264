"""Text for people: turns vhostmem's JSON documents into terminal tables and pictures.

Every text renderer lives here: the control socket's documents, the atomicity report
(``check``) and the plug-sequence explanation (``explain``). Pure formatting; ``vhostmem-ctl``
prints what these functions return.
"""

from __future__ import annotations

import json
import textwrap
import time
from collections.abc import Mapping
from typing import Any

from vhostmem.atomicity import ADD_MEM_REG, range_text
from vhostmem.regions import human_size

__all__ = [
    "render_check",
    "render_diagnose",
    "render_events",
    "render_explain",
    "render_faults",
    "render_map",
    "render_merged",
    "render_peek",
    "render_regions",
    "render_report",
    "render_stats",
]


#: Regions ``stats`` names per connection on its line (``regions`` lists them all).
_STATS_RANGES = 4


def _connection_line(sock: dict[str, Any], conn: dict[str, Any]) -> str:
    peer = conn.get("peer") or {}
    return (
        f"conn {conn['conn']}, peer pid {peer.get('pid', '?')} uid {peer.get('uid', '?')}: "
        f"{conn['slots_used']} of {sock['max_slots']} slots used"
    )


def _socket_line(sock: dict[str, Any]) -> str:
    live = len(sock["connections"])
    if not live:
        return f"{sock['socket']}: no front-end connected"
    return f"{sock['socket']}: {live} front-end{'s' if live != 1 else ''} connected"


def render_regions(doc: dict[str, Any]) -> str:
    """The region table, grouped by socket, then by connection (each has its own table)."""
    lines: list[str] = []
    for sock in doc["sockets"]:
        lines.append(_socket_line(sock))
        for conn in sock["connections"]:
            lines.append(f"  {_connection_line(sock, conn)}")
            if conn.get("dirty_log"):
                lines.append(f"    {_dirty_log_line(conn['dirty_log'])}")
            if conn["regions"]:
                lines.extend(_region_rows(conn["regions"]))
    return "\n".join(lines) if lines else "no sockets"


def _dirty_log_line(log: dict[str, Any]) -> str:
    """The mapped dirty log of a connection (SET_LOG_BASE): size, backing, what it covers, the
    pages marked so far and whether logging is on (LOG_ALL acked)."""
    text = (
        f"dirty log: {human_size(log['size'])} ({log['backing']}, mmap_offset "
        f"{hex(log['mmap_offset'])}) covering {human_size(log['pages'] * 4096)} of guest memory; "
        f"{log['marked']} page(s) marked; logging {'on' if log['logging'] else 'off'}"
    )
    if log["beyond"]:
        text += f"; {log['beyond']} write(s) past the log's end not marked"
    return text


def _region_rows(regions: list[dict[str, Any]]) -> list[str]:
    lines = [
        f"    {'GPA start':>18} {'GPA end':>18} {'size':>10} {'front-end addr':>18} "
        f"{'mmap_offset':>14}  backing"
    ]
    for r in regions:
        end = r["gpa"] + r["size"] - 1
        backing = r.get("backing", "?")
        page = r.get("page_size")
        if page:
            backing += f" ({human_size(page)} pages)"
        if r.get("file"):
            backing += f" {r['file']}"
        lines.append(
            f"    0x{r['gpa']:016x} 0x{end:016x} {human_size(r['size']):>10} "
            f"0x{r['uaddr']:016x} {hex(r['mmap_offset']):>14}  {backing}"
        )
        if r.get("unmap_failed"):
            lines.append(f"      UNMAP FAILED, still mapped: {r['unmap_failed']}")
    return lines


def render_map(doc: dict[str, Any], width: int = 64) -> str:
    """A picture of the guest physical address space: regions (letters) and holes (dots)."""
    out: list[str] = []
    for sock in doc["sockets"]:
        if not sock["connections"]:
            out.append(f"{sock['socket']}: (no front-end connected)")
        for conn in sock["connections"]:  # each connection maps its own guest
            out.extend(_map_picture(f"{sock['socket']} conn {conn['conn']}", conn, width))
    return "\n".join(out) if out else "no sockets"


def _map_picture(title: str, conn: dict[str, Any], width: int) -> list[str]:
    out = [f"{title}:"]
    regions = sorted(conn["regions"], key=lambda r: r["gpa"])
    if regions:
        top = max(r["gpa"] + r["size"] for r in regions)
        out.extend(_map_rows(regions, top, width))
    else:
        out.append("  (no regions)")
    return out


def _map_rows(regions: list[dict[str, Any]], top: int, width: int) -> list[str]:
    out: list[str] = []
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    bar = ["."] * width
    for i, r in enumerate(regions):
        first = r["gpa"] * width // top
        last = max(first, (r["gpa"] + r["size"]) * width // top - 1)
        for col in range(first, min(last, width - 1) + 1):
            bar[col] = letters[i % len(letters)]
    out.append(
        f"  0x0 |{''.join(bar)}| 0x{top:x}  (one column = {human_size(max(1, top // width))})"
    )
    cursor = 0
    for i, r in enumerate(regions):
        if r["gpa"] > cursor:
            hole = human_size(r["gpa"] - cursor)
            out.append(f"      0x{cursor:012x}-0x{r['gpa'] - 1:012x}  hole {hole:>10}")
        out.append(
            f"   {letters[i % len(letters)]}  0x{r['gpa']:012x}-0x{r['gpa'] + r['size'] - 1:012x}"
            f"  region {human_size(r['size']):>8}  {r.get('backing', '?')} "
            f"mmap_offset {hex(r['mmap_offset'])}"
        )
        cursor = r["gpa"] + r["size"]
    return out


def render_events(doc: dict[str, Any]) -> str:
    """One line per event (vhostmem/schemas/event-log.schema.json), then its error and each
    violation it completed; a protocol deviation's rule once per connection and kind."""
    lines = []
    ruled: set[tuple[Any, ...]] = set()
    for ev in doc["events"]:
        stamp = time.strftime("%H:%M:%S", time.localtime(ev.get("ts", 0)))
        stamp += f".{int(ev.get('ts', 0) * 1000) % 1000:03d}"
        # memory-table lines name their request; request-failed/-note lines name it "name"
        what = ev.get("request") or ev.get("name") or ev.get("event", "?")
        if ev.get("event") == "protocol-deviation":
            peer = ev.get("peer")
            who = f" from pid {peer['pid']} uid {peer['uid']}" if peer else ""
            what = (
                f"PROTOCOL DEVIATION ({ev.get('deviation')}): {what} served in state "
                f"{ev.get('state')}{who}"
            )
        elif ev.get("event") == "datapath-stats":
            what = (
                f"data path totals on {ev['tap']}: to the guest {ev['rx_packets']} packets "
                f"({ev['rx_dropped']} dropped), from the guest {ev['tx_packets']} packets "
                f"({ev['tx_dropped']} dropped)"
            )
        text = f"{stamp} {ev.get('socket', '')} {what}"
        if "result" in ev:
            text += f" {ev['result']}"
        region = ev.get("region")
        if region:
            text += (
                f" gpa=0x{region['gpa']:x} size={human_size(region['size'])}"
                f" mmap_offset=0x{region['mmap_offset']:x}"
            )
        if "regions" in ev:
            text += f" {len(ev['regions'])} region(s)"
        if ev.get("reason"):
            text += f" ({ev['reason']})"
        if ev.get("error"):
            text += f"\n    {ev['error']}"
        said = (ev.get("socket"), ev.get("conn"), ev.get("deviation"))
        if ev.get("rule") and said not in ruled:
            ruled.add(said)
            text += f"\n    {ev['rule']}"
        for violation in ev.get("violations", ()):
            text += f"\n    VIOLATION {violation.get('kind')}: {violation.get('why', '')}"
        lines.append(text)
    return "\n".join(lines) if lines else "no events yet"


def render_stats(doc: dict[str, Any]) -> str:
    """Counters as ``name: value`` lines."""
    lines = []
    for key, value in doc.items():
        if key in ("version", "vrings", "sockets"):
            continue
        if key == "mapped_bytes":
            value = f"{value} ({human_size(value)})"
        elif key == "uptime":
            value = f"{value:.1f} s"
        elif isinstance(value, (dict, list)):  # tap and data-path counters (--tap)
            value = json.dumps(value, sort_keys=True)
        lines.append(f"{key:>18}: {value}")
    for sock in doc.get("sockets", []):
        lines.append(f"{'socket':>18}: {_socket_line(sock)}")
        for conn in sock["connections"]:
            regions = conn["regions"]
            ranges = ", ".join(
                f"0x{r['gpa']:x}-0x{r['gpa'] + r['size'] - 1:x} ({human_size(r['size'])})"
                for r in regions[:_STATS_RANGES]
            )
            if len(regions) > _STATS_RANGES:
                ranges += f" and {len(regions) - _STATS_RANGES} more (vhostmem-ctl regions)"
            lines.append(
                f"{'':>18}  {_connection_line(sock, conn)}" + (f"; {ranges}" if ranges else "")
            )
            if conn.get("dirty_log"):
                lines.append(f"{'':>18}    {_dirty_log_line(conn['dirty_log'])}")
    for ring in doc.get("vrings", []):
        lines.append(
            f"{'vring':>18}: {ring['socket']} conn {ring['conn']} #{ring['index']} "
            f"size {ring['num']} "
            f"{'started' if ring['started'] else 'stopped'}, "
            f"{'enabled' if ring['enabled'] else 'disabled'}"
        )
    return "\n".join(lines)


def render_peek(doc: dict[str, Any]) -> str:
    """A hex dump with guest physical addresses; pages not populated are said to be so."""
    data = bytes.fromhex(doc["hex"])
    base = doc["gpa"]
    lines = []
    for chunk in doc["chunks"]:
        start = chunk["gpa"] - base
        if chunk["state"] != "data":
            why = (
                "not populated: nobody wrote it, or QEMU discarded it; not read, so it stays so"
                if chunk["state"] == "unpopulated"
                else f"read fault: {chunk.get('error', '')}"
            )
            lines.append(f"0x{chunk['gpa']:012x}  ({chunk['len']} bytes {why})")
            continue
        for off in range(start, start + chunk["len"], 16):
            row = data[off : min(off + 16, start + chunk["len"])]
            text = "".join(chr(b) if 32 <= b < 127 else "." for b in row)
            lines.append(f"0x{base + off:012x}  {row.hex(' '):<47}  {text}")
    return "\n".join(lines)


def render_faults(doc: dict[str, Any]) -> str:
    """The fault-injection rules in force."""
    if not doc["faults"]:
        return "no fault-injection rules"
    return "\n".join(
        f"{f['spec']}  (matched {f['seen']}, fired {f['fired']})" for f in doc["faults"]
    )


def render_diagnose(doc: dict[str, Any]) -> str:
    """Everything that limits mapping, on one screen."""
    nofile = doc["rlimit_nofile"]
    lines = [
        f"open files      {nofile['open']} of RLIMIT_NOFILE {nofile['soft']} "
        f"(hard {nofile['hard']}); {doc['mapping_fds']} held for mappings "
        "(one per region, two for hugetlb)",
        f"memory maps     {doc['process_maps']} of vm.max_map_count {doc['max_map_count']}",
        f"mapped          {human_size(doc['mapped_bytes'])} in {doc['maps']} region(s)"
        + (f" of --max-mapped {human_size(doc['max_mapped'])}" if doc.get("max_mapped") else ""),
    ]
    for pool in doc["hugepages"]:
        lines.append(
            f"huge pages {human_size(pool['page_size']):>7}  total {pool['total']}, "
            f"free {pool['free']}, reserved {pool['resv']}, surplus {pool['surplus']}"
        )
    if not doc["hugepages"]:
        lines.append("huge pages      none configured (/sys/kernel/mm/hugepages is empty)")
    for slot in doc["slots"]:
        lines.append(
            f"slots           {slot['socket']}"
            + (f" conn {slot['conn']}" if slot.get("conn") is not None else "")
            + f": {slot['used']} used, {slot['free']} free of {slot['max']}"
        )
    if doc["faults"]:
        lines.append("fault rules     " + "; ".join(f["spec"] for f in doc["faults"]))
    shortfalls = doc.get("shortfalls", [])
    if shortfalls:
        lines.append(
            f"huge page shortfall: {len(shortfalls)} region(s) the pool cannot back "
            "in full (SIGBUS when touched)"
        )
        for s in shortfalls:
            end = s["gpa"] + s["size"] - 1
            lines.append(
                f"  {s['socket'] or '?'} 0x{s['gpa']:x}-0x{end:x} {human_size(s['size'])}: "
                f"{s['region_pages']} pages of {human_size(s['page_size'])}, file holds "
                f"{s['held']}, pool free {s['free']} (reserved {s['resv']}), {s['short']} short"
            )
            lines.append(f"    {s['text']}")
    else:
        lines.append("huge page shortfall: none (every hugetlb region can be backed)")
    return "\n".join(lines)


def render_merged(doc: dict[str, Any]) -> str:
    """The merged view: adjacent regions shown as one, and what kept each boundary."""
    lines: list[str] = []
    for sock in doc["sockets"]:
        if not sock["connections"]:
            lines.append(_socket_line(sock))
        for conn in sock["connections"]:  # each connection has its own table
            groups = [
                g
                for g in doc.get("merged", [])
                if g["socket"] == sock["socket"] and g["conn"] == conn["conn"]
            ]
            lines.append(
                f"{sock['socket']} conn {conn['conn']}: {len(groups)} merged region(s) from "
                f"{conn['slots_used']} received"
            )
            lines.extend(_merged_rows(groups))
    markers = doc.get("markers", [])
    if markers:
        lines.append("unmergeable markers:")
        lines.extend(f"  0x{m['start']:x}-0x{m['end'] - 1:x}  {m['source']}" for m in markers)
    return "\n".join(lines)


def _merged_rows(groups: list[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    for g in groups:
        end = g["gpa"] + g["size"] - 1
        parts = len(g["parts"])
        lines.append(
            f"  0x{g['gpa']:016x}-0x{end:016x} {human_size(g['size']):>10}  "
            f"{parts} region{'s' if parts != 1 else ''}"
        )
        if g["boundary_after"]:
            lines.append(f"      boundary kept: {g['boundary_after']}")
    return lines


# -- check and explain ---------------------------------------------------------------------


def _batching_line(doc: Mapping[str, Any]) -> list[str]:
    b = doc.get("batching")
    if not b:
        return []
    gap = f"{b['gap_ms']:g} ms gap (heuristic; give --qemu-trace for exact batches)"
    if b["method"] == "qemu-trace":
        lines = [f"batches: QEMU trace, {b['commits']} commits"]
    elif b["method"] == "gap":
        lines = [f"batches: {gap}"]
    else:
        lines = [
            f"batches: mixed: QEMU trace for {b['requests']['qemu-trace']} requests in "
            f"{b['commits']} commits, then {gap} for {b['requests']['gap']} requests"
        ]
    for f in b["fallbacks"]:
        lines.append(f"  FALLBACK to the gap rule ({f['socket']} conn {f['conn']}): {f['reason']}")
    wire = doc.get("wire") or {}
    if wire.get("checked"):
        mismatches = wire.get("mismatches", [])
        lines.append(
            "wire vs QEMU trace: "
            + ("matches" if not mismatches else f"{len(mismatches)} MISMATCH(ES)")
        )
        lines.extend(f"  {m['socket']} conn {m['conn']}: {m['mismatch']}" for m in mismatches)
    return lines


def render_report(doc: Mapping[str, Any]) -> str:
    """:meth:`History.report` as text a person reads in one go.

    Args:
        doc: the report document.

    Returns:
        A verdict line, each violation with its reason, then one line per batch.
    """
    counts = doc["counts"]
    head = f"{counts['requests']} memory-table requests in {counts['batches']} batches"
    if counts["failed"]:
        head += f" ({counts['failed']} failed)"
    lines = [
        f"atomic: yes, {head}, no violations"
        if not counts["violations"]
        else f"atomic: NO, {counts['violations']} violation(s) in {head}"
    ]
    lines += _batching_line(doc)
    for v in doc["violations"]:
        unmapped = v["unmapped"]
        lines.append("")
        lines.append(
            f"{v['kind'].upper()}: {v['request']} #{v['seq']} (batch {v['batch']}, "
            f"{v['socket']} conn {v['conn']}), unmapped "
            f"{range_text((unmapped['start'], unmapped['end']))}"
        )
        lines.extend(textwrap.wrap(v["why"], 96, initial_indent="  ", subsequent_indent="  "))
    for m in doc.get("remaps", []):
        lines.append("")
        lines.append(
            f"remap ({m['kind']}, not a violation): {m['request']} #{m['seq']} "
            f"(batch {m['batch']}, {m['socket']} conn {m['conn']})"
        )
        lines.extend(textwrap.wrap(m["why"], 96, initial_indent="  ", subsequent_indent="  "))
    if doc["batches"]:
        lines.append("")
        lines.append(f"{'batch':>5}  {'requests':<14} {'plugged':<32} {'unplugged':<32} violations")
        for b in doc["batches"]:
            counts_ = {n: b["names"].count(n) for n in dict.fromkeys(b["names"])}
            names = ", ".join(f"{c} {n.split('_')[0]}" for n, c in counts_.items())
            plugged = ", ".join(range_text((r["start"], r["end"])) for r in b["plugged"]) or "-"
            unplugged = ", ".join(range_text((r["start"], r["end"])) for r in b["unplugged"]) or "-"
            lines.append(
                f"{b['batch']:>5}  {names:<14} {plugged:<32} {unplugged:<32} {b['violations']}"
            )
    return "\n".join(lines)


def render_check(doc: Mapping[str, Any], qmp: str | None = None) -> str:
    """``vhostmem-ctl check``: :func:`render_report`, then the comparison with QEMU's view.

    Args:
        doc: the check document; its ``qmp`` part, when present, compares the table with the
            regions QEMU should have sent.
        qmp: QEMU's QMP socket the comparison asked (named in the text).
    """
    lines = [render_report(doc)]
    q = doc.get("qmp")
    if q is not None:
        verdict = "matches" if q["matches"] else "DOES NOT match"
        lines.append(
            f"\ntable vs QEMU ({qmp}): {verdict} the {len(q['expected'])} region(s) "
            "QEMU should have sent"
        )
        for label in ("missing", "unexpected"):
            for gpa, size, off in q[label]:
                lines.append(f"  {label}: gpa=0x{gpa:x} size=0x{size:x} mmap_offset=0x{off:x}")
    return "\n".join(lines)


def _message_line(m: Mapping[str, Any]) -> str:
    verb = "ADD" if m["request"] == ADD_MEM_REG else "REM"
    text = f"{verb} 0x{m['gpa']:x}-0x{m['gpa'] + m['size'] - 1:x} {human_size(m['size'])}"
    if m["violation"]:
        text += f"  !! {m['classification']}"
    return text


def render_explain(doc: Mapping[str, Any], width: int = 46) -> str:
    """:func:`explain` as two columns, one per QEMU variant, with the non-atomic messages marked.

    Args:
        doc: the explain document.
        width: the width of one column.

    Returns:
        Text: per step the messages side by side, then each violation's reason, then totals.
    """
    variants = doc["variants"]
    lines = ["".join(f"{v['title']:<{width}}" for v in variants).rstrip()]
    lines.append("".join(f"{'-' * (width - 2):<{width}}" for _ in variants).rstrip())
    reasons: list[str] = []
    for step in doc["steps"]:
        plugged = ",".join(map(str, step["plugged"])) or "none"
        lines.append(f"{step['label']}: memslots {plugged}")
        columns = [
            [_message_line(m) for m in step["variants"][v["name"]]["messages"]] or ["(no message)"]
            for v in variants
        ]
        for row in range(max(map(len, columns))):
            cells = [col[row] if row < len(col) else "" for col in columns]
            lines.append("  " + "".join(f"{c:<{width}}" for c in cells).rstrip())
        for v in variants:
            for m in step["variants"][v["name"]]["messages"]:
                if m["violation"]:
                    reasons.append(f"{step['label']}, {v['title']}: {m['violation']['why']}")
    totals = doc["totals"]
    lines.append("")
    cells = [
        f"{totals[v['name']]['messages']} messages, {totals[v['name']]['violations']} non-atomic"
        for v in variants
    ]
    lines.append("".join(f"{c:<{width}}" for c in cells).rstrip())
    for reason in reasons:
        lines.append("")
        lines.extend(textwrap.wrap(reason, 96, subsequent_indent="  "))
    return "\n".join(lines)
