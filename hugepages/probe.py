#!/usr/bin/env python3
"""Show the huge page pools and hugetlbfs mounts of this machine.

Per page size (from /sys/kernel/mm/hugepages/hugepages-*kB): total (nr_hugepages), free,
reserved (promised to a mapping but not yet faulted in: not usable by anyone else), surplus
(overcommitted pages beyond the pool) and the overcommit limit; "available" is free - reserved,
what a new mapping can still get. Then every hugetlbfs mount with its page size, and the
processes that hold huge pages right now (HugetlbPages in /proc/PID/status: shared and private
hugetlb memory they have faulted in).

Standalone (stdlib only), never imported by vhostmem.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

SYSFS = Path("/sys/kernel/mm/hugepages")


def default_page_kb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Hugepagesize:"):
            return int(line.split()[1])
    return 2048


def human(kb: int) -> str:
    return f"{kb >> 20}G" if kb >= 1 << 20 and kb % (1 << 20) == 0 else f"{kb >> 10}M"


def pools() -> list[dict[str, Any]]:
    out = []
    for d in sorted(SYSFS.glob("hugepages-*kB"), key=lambda p: int(p.name[10:-2])):
        kb = int(d.name[len("hugepages-") : -2])

        def read(name: str, d: Path = d) -> int:
            return int((d / name).read_text())

        total, free, resv = read("nr_hugepages"), read("free_hugepages"), read("resv_hugepages")
        out.append(
            {
                "page_size": human(kb),
                "page_size_bytes": kb * 1024,
                "total": total,
                "free": free,
                "reserved": resv,
                "surplus": read("surplus_hugepages"),
                "overcommit": read("nr_overcommit_hugepages"),
                "available": free - resv,
            }
        )
    return out


def mounts() -> list[dict[str, Any]]:
    out = []
    for line in Path("/proc/mounts").read_text().splitlines():
        _dev, mnt, fstype, opts, *_ = line.split()
        if fstype != "hugetlbfs":
            continue
        kb = default_page_kb()
        for opt in opts.split(","):
            if opt.startswith("pagesize="):
                val = opt.split("=", 1)[1].upper()
                kb = int(val[:-1]) << (20 if val.endswith("G") else 10 if val.endswith("M") else 0)
        out.append(
            {"path": mnt, "page_size": human(kb), "page_size_bytes": kb * 1024, "options": opts}
        )
    return out


def holders() -> list[dict[str, Any]]:
    """Processes with hugetlb pages mapped (faulted in), largest first."""
    out = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(
                line.split(":", 1) for line in status.read_text().splitlines() if ":" in line
            )
        except OSError:  # the process went away
            continue
        kb = int(fields.get("HugetlbPages", "0 kB").split()[0])
        if kb:
            out.append(
                {
                    "pid": int(status.parent.name),
                    "name": fields["Name"].strip(),
                    "hugetlb_bytes": kb * 1024,
                }
            )
    return sorted(out, key=lambda h: -h["hugetlb_bytes"])


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--json", action="store_true", help="one JSON document (version 1)")
    args = ap.parse_args()
    doc = {"version": 1, "pools": pools(), "mounts": mounts(), "holders": holders()}
    if args.json:
        json.dump(doc, sys.stdout, indent=2)
        print()
        return 0
    print(f"{'size':>5} {'total':>7} {'free':>7} {'reserved':>9} {'surplus':>8} {'available':>10}")
    for p in doc["pools"]:
        print(
            f"{p['page_size']:>5} {p['total']:>7} {p['free']:>7} {p['reserved']:>9} "
            f"{p['surplus']:>8} {p['available']:>10}"
        )
    if not doc["mounts"]:
        print("hugetlbfs: not mounted (hugepages/setup.sh --mount DIR)")
    for m in doc["mounts"]:
        print(f"hugetlbfs: {m['path']} (pagesize {m['page_size']})")
    if not doc["holders"]:
        print("no process holds huge pages")
    for h in doc["holders"]:
        print(f"held by pid {h['pid']} ({h['name']}): {h['hugetlb_bytes'] >> 20} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
