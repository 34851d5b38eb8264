"""The JSON Schemas shipped in the package are the contract: every event kind and every
``vhostmem-ctl --json`` document is produced here and validated with the ``jsonschema`` library.

tests/conftest.py holds every other test's event-log lines to the same schema.
"""

from __future__ import annotations

import io
import json
import os
import tomllib
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import trio

from vhostmem import journal
from vhostmem.ctl import ctl_main
from vhostmem.events import Handled
from vhostmem.faults import parse_fault
from vhostmem.protocol import Header, Request, VringState, encode_request
from vhostmem.report import render_events
from vhostmem.server import Backend, ServerConfig
from vhostmem.testing import schema
from vhostmem.testing.backend import start_backend
from vhostmem.testing.frontend import FakeFrontend, make_memfd

from .helpers.waiting import in_thread, wait_until
from .helpers.wire import start_pair, wired

MiB = 1 << 20
GiB = 1 << 30
BASE = 0x100000000
HOST = 0x7F0000000000
ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = ROOT / "vhostmem" / "schemas"


def kinds_of(schema_doc: dict[str, Any]) -> list[str]:
    return list(schema_doc["properties"]["event"]["enum"])


# -- the schemas themselves ----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(schema.DOCUMENTS))
def test_every_schema_is_draft_2020_12_and_shipped(name: str) -> None:
    doc = schema.load_schema(name)
    assert doc["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(doc)
    assert doc["$id"] == f"urn:vhostmem:schema:{name}"
    assert doc["properties"]["version"]["const"] == 1


def test_the_schema_files_are_the_documents_and_package_data() -> None:
    assert sorted(p.name for p in SCHEMAS.glob("*.json")) == sorted(
        f"{name}.schema.json" for name in schema.DOCUMENTS
    )
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "schemas/*.schema.json" in data["tool"]["setuptools"]["package-data"]["vhostmem"]
    test_extra = data["project"]["optional-dependencies"]["test"]
    assert any(dep.startswith("jsonschema") for dep in test_extra)


def test_every_field_of_every_event_kind_has_one_type() -> None:
    """Fields are typed once, at the top; a kind only says which of them it may carry."""
    doc = schema.load_schema("event-log")
    typed = set(doc["properties"])
    kinds = kinds_of(doc)
    assert sorted(kinds) == sorted(journal.EVENT_KINDS)
    for kind in kinds:
        allowed = doc["$defs"][kind]["propertyNames"]["enum"]
        assert set(allowed) <= typed, f"{kind}: untyped {set(allowed) - typed}"
        assert set(doc["$defs"][kind]["required"]) <= set(allowed), kind
        assert {"version", "event", "ts"} <= set(doc["$defs"][kind]["required"]), kind
        # each kind is selected by its own "event" value
        assert {
            "if": {"required": ["event"], "properties": {"event": {"const": kind}}},
            "then": {"$ref": f"#/$defs/{kind}"},
        } in doc["allOf"]


@pytest.mark.parametrize(
    ("line", "words"),
    [
        # the shape a violation line had: added/removed as arrays, a lone "violation"
        ({"added": [], "removed": [], "violation": {}}, ["added: [] is not of type 'integer'"]),
        ({"violations": None}, ["violations: None is not of type 'array'"]),
        ({"peer_pid": None}, ["peer_pid: None is not of type 'integer'"]),
        ({"batching": "guess"}, ["batching: 'guess' is not one of"]),
        ({"version": 2}, ["version: 1 was expected"]),
        ({"kind": "request"}, ["'kind' is not one of"]),
        ({"error": "x"}, ["should not be valid"]),
    ],
)
def test_the_event_log_schema_refuses_what_breaks_a_reader(
    line: dict[str, Any], words: list[str]
) -> None:
    good = {
        "version": 1,
        "event": "memory-table",
        "ts": 1.5,
        "socket": "s",
        "conn": 1,
        "request": "ADD_MEM_REG",
        "result": "ok",
        "added": 1,
        "removed": 0,
        "kept": 0,
        "seq": 1,
        "batch": 1,
        "classification": "plug",
        "batching": "gap",
        "violations": [],
        "region": {"gpa": 0, "size": 4096, "uaddr": 0, "mmap_offset": 0},
    }
    assert schema.problems(good, "event-log") == []
    found = "\n".join(schema.problems(good | line, "event-log"))
    for word in words:
        assert word in found, found


# -- every event kind, produced by the real code ---------------------------------------------------


def memory_lines(backend: Backend) -> list[dict[str, Any]]:
    return [e for e in backend.booking.events if e.get("event") == "memory-table"]


async def test_every_event_kind_matches_the_schema(tmp_path: Path) -> None:
    log = tmp_path / "events.jsonl"
    memfd = make_memfd(4 * GiB)
    try:
        async with wired(event_log=str(log)) as w:
            a, b = w.a, w.b
            assert await in_thread(a.add_region, BASE, GiB, HOST, 0, memfd) == 0
            # QEMU before 8.2: remove the live memslot and add it back merged with the next
            assert await in_thread(a.rem_region, BASE, GiB, HOST) == 0
            assert await in_thread(a.add_region, BASE, 2 * GiB, HOST, 0, memfd) == 0
            # an ADD overlapping the live region fails
            assert await in_thread(a.add_region, BASE, GiB, HOST, 0, os.dup(memfd)) != 0
            # SET_MEM_TABLE twice on b: the second keeps one region and adds another
            one = (0, MiB, HOST + 8 * GiB, 0, os.dup(memfd))
            assert await in_thread(b.set_mem_table, [one]) == 0
            two = (MiB, MiB, HOST + 9 * GiB, MiB, os.dup(memfd))
            assert await in_thread(b.set_mem_table, [(*one[:4], os.dup(memfd)), two]) == 0
            # a request that is not a memory-table request fails
            await in_thread(a.send_raw, encode_request(200, b"", need_reply=True))
            assert (await in_thread(a.recv_reply, 200)).u64 == 1
            # and one succeeds with an injected delay
            w.backend.faults.add(parse_fault("GET_QUEUE_NUM:delay=1ms"))
            assert await in_thread(a.call, Request.GET_QUEUE_NUM) is not None
            w.backend.booking.book_pending()
            backend = w.backend
        # a peer --allow-uid refuses
        refusing = Backend(ServerConfig(allow_uids=(os.getuid() + 4242,)))
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                fe = await start_pair(refusing, nursery, "refusing")
                await wait_until(lambda: refusing.booking.events, "the refusal")
                fe.close()
        refusing.cleanup()
        # a request before SET_OWNER, served as DPDK's reconnecting virtio-user needs
        lenient = Backend(ServerConfig())
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                fe = await start_pair(lenient, nursery, "lenient")
                await in_thread(
                    fe.send_raw, encode_request(Request.SET_VRING_NUM, VringState(0, 256))
                )
                assert await in_thread(fe.call, Request.GET_FEATURES) is not None
                await wait_until(
                    lambda: any(e["event"] == "protocol-deviation" for e in lenient.booking.events),
                    "the deviation",
                )
                fe.close()
                await wait_until(lambda: not lenient.connections(), "the disconnect")
        lenient.cleanup()
    finally:
        os.close(memfd)
    events = [*backend.booking.events, *refusing.booking.events, *lenient.booking.events]
    # what only --tap books (test_datapath drives each end to end): a ring that stopped, a
    # connection whose rings the TAP refused, the TAP handed over when its holder ended
    peer = {"pid": 1, "uid": 0, "gid": 0}
    events += [
        journal.ring_error(
            socket="a",
            conn=1,
            vring=0,
            queue="rx",
            error="vring 0: address 0x0 is in no region",
            error_kind="hole",
            base=0,
            gpa=0,
            details={"gpa": 0},
            ts=1.0,
        ),
        journal.datapath_refused(
            socket="a",
            conn=2,
            peer=None,
            tap="vhm0",
            reason="TAP vhm0 already bridges ...",
            holder=journal.party(socket="a", conn=1, peer=peer),
            ts=1.0,
        ),
        journal.datapath_handover(
            socket="a",
            conn=2,
            peer=peer,
            tap="vhm0",
            previous=journal.party(socket="a", conn=1, peer=None),
            ts=1.0,
        ),
        journal.dirty_log(
            Handled(
                Request.SET_FEATURES,
                Header(Request.SET_FEATURES, 1, 8),
                0,
                b"",
                True,
                dirty_log={
                    "logging": True,
                    "log": {
                        "size": 8,
                        "mmap_offset": 0,
                        "pages": 64,
                        "backing": "memfd",
                        "marked": 0,
                        "beyond": 0,
                    },
                },
            ),
            ts=1.0,
            socket="a",
            conn=1,
            peer_pid=None,
        ),
        journal.datapath_stats(
            socket="a",
            conn=1,
            tap="vhm0",
            counters=dict.fromkeys(journal.DATAPATH_COUNTERS, 3),
            interval=1.0,
            ts=1.0,
        ),
    ]
    assert "peer" not in events[-4] and "peer" not in events[-3]["previous"]
    for doc in events:
        schema.check(doc, "event-log")
    assert {e["event"] for e in events} == set(journal.EVENT_KINDS)
    assert [json.loads(line) for line in log.read_text().splitlines()] == [
        json.loads(json.dumps(e)) for e in backend.booking.events
    ]
    assert all(e["version"] == 1 for e in events)

    memory = memory_lines(backend)
    assert [(e["request"], e["result"], e["added"], e["removed"], e["kept"]) for e in memory] == [
        ("ADD_MEM_REG", "ok", 1, 0, 0),
        ("REM_MEM_REG", "ok", 0, 1, 0),
        ("ADD_MEM_REG", "ok", 1, 0, 0),
        ("ADD_MEM_REG", "error", 0, 0, 0),
        ("SET_MEM_TABLE", "ok", 1, 0, 0),
        ("SET_MEM_TABLE", "ok", 1, 0, 1),
    ]
    assert [e["seq"] for e in memory] == list(range(1, 7))
    assert {e["batching"] for e in memory} == {"gap"}
    # the violation goes in its own array; the counts stay integers on its line
    merge = memory[2]
    [violation] = merge["violations"]
    assert violation["kind"] == "merge" and violation["removed_by"] == [2]
    assert violation["completed_by"] == merge["seq"] == 3
    assert violation["unmapped"] == {"start": BASE, "end": BASE + GiB, "size": GiB}
    assert [len(e["violations"]) for e in memory] == [0, 0, 1, 0, 0, 0]
    assert memory[3]["error"].startswith("ADD_MEM_REG") and memory[3]["error_kind"]
    assert "error" not in memory[0] and "region" in memory[0] and "regions" in memory[4]
    # what each request mapped, with its backing and fds (a memfd: mmap's own fd only)
    assert [[m["gpa"] for m in e.get("mapped", ())] for e in memory] == [
        [BASE],
        [],
        [BASE],
        [],
        [0],
        [MiB],
    ]
    assert {(m["backing"], m["fds_held"]) for e in memory for m in e.get("mapped", ())} == {
        ("memfd", 1)
    }
    # a failure of another request is its own kind, named, without "request"
    [failed] = [e for e in events if e["event"] == "request-failed"]
    assert failed["name"] == "UNKNOWN(200)" and "request" not in failed
    assert failed["result"] == "error" and "200" in failed["error"]
    [note] = [e for e in events if e["event"] == "request-note"]
    assert note["name"] == "GET_QUEUE_NUM" and note["injected"] == "GET_QUEUE_NUM:delay=1ms"
    connects = [e for e in events if e["event"] == "connect"]
    assert all(e["peer"]["pid"] == os.getpid() for e in connects)
    [refusal] = [e for e in events if e["event"] == "refused"]
    assert refusal["peer"]["uid"] == os.getuid() and "4242" in refusal["reason"]
    [deviation] = [e for e in events if e["event"] == "protocol-deviation"]
    assert (deviation["name"], deviation["deviation"], deviation["state"]) == (
        "SET_VRING_NUM",
        "request-before-owner",
        "await-owner",
    )
    assert deviation["peer"] == {"pid": os.getpid(), "uid": os.getuid(), "gid": os.getgid()}
    assert "SET_OWNER" in deviation["rule"] and "--strict-protocol" in deviation["rule"]
    # vhostmem-ctl events reads every kind
    text = render_events({"version": 1, "events": events})
    for words in (
        "connect",
        "ADD_MEM_REG ok gpa=0x100000000",
        "VIOLATION merge: 0x100000000",
        "UNKNOWN(200) error",
        "GET_QUEUE_NUM ok",
        "refused",
        "ring-error",
        "disconnect",
        "PROTOCOL DEVIATION (request-before-owner): SET_VRING_NUM served in state await-owner "
        f"from pid {os.getpid()} uid {os.getuid()}",
    ):
        assert words in text, (words, text)


# -- every vhostmem-ctl --json document ------------------------------------------------------------


def ctl_json(control: str, *args: str) -> tuple[int, Any]:
    out = io.StringIO()
    with redirect_stdout(out):
        code = ctl_main(["--control", control, *args, "--json"])
    return code, json.loads(out.getvalue())


def test_every_ctl_json_document_matches_its_schema(tmp_path: Path) -> None:
    backend = start_backend(tmp_path)
    memfd = make_memfd(4 * GiB)
    try:
        with FakeFrontend.connect(backend.socket) as fe:
            fe.handshake()
            assert fe.add_region(BASE, GiB, HOST, 0, memfd) == 0
            assert fe.rem_region(BASE, GiB, HOST) == 0
            assert fe.add_region(BASE, 2 * GiB, HOST, 0, memfd) == 0
            documents = {
                "regions": ctl_json(backend.control, "regions"),
                "regions --merged": ctl_json(backend.control, "regions", "--merged"),
                "map": ctl_json(backend.control, "map"),
                "events": ctl_json(backend.control, "events"),
                "stats": ctl_json(backend.control, "stats"),
                "check": ctl_json(backend.control, "check"),
                "peek": ctl_json(backend.control, "peek", hex(BASE), "64"),
                "inject": ctl_json(backend.control, "inject", "ADD_MEM_REG:nth=9:errno=ENOMEM"),
                "diagnose": ctl_json(backend.control, "diagnose"),
                "explain": ctl_json(backend.control, "explain"),
            }
            text = io.StringIO()
            with redirect_stdout(text):
                assert ctl_main(["--control", backend.control, "events"]) == 0
    finally:
        os.close(memfd)
        assert backend.stop() == 0
    for label, (code, doc) in documents.items():
        name = label.split()[0].replace("map", "regions")
        assert code == (1 if name == "check" else 0), (label, doc)  # check: the merge violates
        schema.check(doc, name)
    assert documents["check"][1]["counts"]["violations"] == 1
    events = documents["events"][1]["events"]
    assert [e["event"] for e in events] == ["connect"] + ["memory-table"] * 3
    # the human rendering reads the new shape
    assert "VIOLATION merge" in text.getvalue() and "ADD_MEM_REG ok" in text.getvalue()
    assert schema.event_log_problems(backend.event_log) == []


def test_the_readme_shows_one_valid_line_of_each_event_kind() -> None:
    text = (ROOT / "README.md").read_text()
    lines = [
        json.loads(line.strip())
        for line in text.splitlines()
        if line.strip().startswith('{"version": 1, "event": ')
    ]
    assert sorted(e["event"] for e in lines) == sorted(journal.EVENT_KINDS)
    for line in lines:
        schema.check(line, "event-log")


def test_events_say_a_deviation_rule_once_per_connection_and_kind() -> None:
    def line(conn: int, name: str) -> dict[str, Any]:
        return {
            "version": 1,
            "event": "protocol-deviation",
            "ts": 1.0,
            "socket": "s",
            "conn": conn,
            "name": name,
            "deviation": "request-before-owner",
            "state": "await-owner",
            "rule": "THE RULE",
        }

    events = [line(1, "SET_FEATURES"), line(1, "SET_MEM_TABLE"), line(2, "SET_FEATURES")]
    for doc in events:
        schema.check(doc, "event-log")
    text = render_events({"version": 1, "events": events})
    assert text.count("THE RULE") == 2, text  # conn 1 once, conn 2 once
    assert text.count("PROTOCOL DEVIATION (request-before-owner)") == 3, text


def test_events_text_gives_the_data_path_totals() -> None:
    line = {
        "version": 1,
        "event": "datapath-stats",
        "ts": 1.0,
        "socket": "s",
        "conn": 1,
        "tap": "vhm0",
        "rx_packets": 120,
        "rx_bytes": 11760,
        "rx_dropped": 2,
        "tx_packets": 118,
        "tx_bytes": 11564,
        "tx_dropped": 0,
        "interval": 1.0,
    }
    schema.check(line, "event-log")
    text = render_events({"version": 1, "events": [line]})
    assert (
        "data path totals on vhm0: to the guest 120 packets (2 dropped), from the guest 118 "
        "packets (0 dropped)"
    ) in text, text
