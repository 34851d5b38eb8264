"""Check vhostmem's JSON against the JSON Schemas shipped in the package (``vhostmem/schemas``).

The schemas (draft 2020-12) are the contract for the event log and for every
``vhostmem-ctl --json`` document; validating needs the ``jsonschema`` library (the ``test``
extra: ``pip install 'vhostmem[test]'`` or ``pip install jsonschema``)::

    from vhostmem.testing.schema import check, event_log_problems
    check(doc, "regions")                      # raises SchemaError naming the field
    assert event_log_problems("vu.events.jsonl") == []
"""

from __future__ import annotations

import functools
import importlib.util
import json
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = [
    "DOCUMENTS",
    "SchemaError",
    "available",
    "check",
    "event_log_problems",
    "load_schema",
    "problems",
]

#: Schema name -> what it describes. ``event-log`` is one line; the others are the documents
#: ``vhostmem-ctl COMMAND --json`` prints (``map`` prints the ``regions`` document).
DOCUMENTS = {
    "event-log": "one event-log line (and one entry of events --json)",
    "regions": "vhostmem-ctl regions --json (and map --json)",
    "events": "vhostmem-ctl events --json",
    "stats": "vhostmem-ctl stats --json",
    "check": "vhostmem-ctl check --json",
    "peek": "vhostmem-ctl peek --json",
    "inject": "vhostmem-ctl inject --json",
    "diagnose": "vhostmem-ctl diagnose --json",
    "explain": "vhostmem-ctl explain --json",
}


class SchemaError(AssertionError):
    """A document does not match its schema; the text names every field that does not."""


def load_schema(name: str) -> dict[str, Any]:
    """The schema ``vhostmem/schemas/NAME.schema.json`` as a dict.

    Raises:
        KeyError: no such schema (the known names are :data:`DOCUMENTS`).
    """
    if name not in DOCUMENTS:
        raise KeyError(f"no schema {name!r}; known: {', '.join(DOCUMENTS)}")
    text = resources.files("vhostmem").joinpath("schemas", f"{name}.schema.json").read_text()
    doc = json.loads(text)
    assert isinstance(doc, dict)
    return doc


def available() -> bool:
    """Whether the ``jsonschema`` library (a test dependency) can be imported."""
    return importlib.util.find_spec("jsonschema") is not None


@functools.cache
def _validator(name: str) -> Any:
    try:
        import jsonschema  # type: ignore[import-untyped,unused-ignore]
        from referencing import Registry, Resource  # type: ignore[import-not-found,unused-ignore]
    except ImportError as err:
        raise RuntimeError(
            f"checking JSON against vhostmem's schemas needs the jsonschema library ({err}): "
            "pip install jsonschema (or vhostmem[test])"
        ) from err
    # Every schema is in the registry, so one may $ref another by its $id (events -> event-log).
    registry = Registry().with_resources(
        (schema["$id"], Resource.from_contents(schema)) for schema in map(load_schema, DOCUMENTS)
    )
    schema = load_schema(name)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, registry=registry)


def problems(doc: Any, name: str) -> list[str]:
    """What in ``doc`` does not match schema ``name``: one line per error, ``[]`` if it matches.

    ``doc`` is checked as it would be written (through ``json.dumps``), so tuples count as
    arrays and a value JSON cannot hold is itself a problem.
    """
    try:
        doc = json.loads(json.dumps(doc))
    except (TypeError, ValueError) as err:
        return [f"not JSON: {err}"]
    out: list[str] = []
    for error in sorted(_validator(name).iter_errors(doc), key=lambda e: list(e.path)):
        where = "/".join(map(str, error.absolute_path)) or "(top)"
        text = f"{where}: {error.message}"
        if text not in out:  # a field required by the line and by its kind is said once
            out.append(text)
    return out


def check(doc: Any, name: str) -> None:
    """Raise :class:`SchemaError` unless ``doc`` matches schema ``name``."""
    found = problems(doc, name)
    if found:
        raise SchemaError(
            f"does not match the {name} schema ({DOCUMENTS[name]}):\n  "
            + "\n  ".join(found)
            + f"\n{json.dumps(doc, sort_keys=True, default=repr)[:2000]}"
        )


def event_log_problems(lines: str | Path | Iterable[Mapping[str, Any]]) -> list[str]:
    """Every line of an event log (a file path, or the parsed lines) that breaks the schema.

    Returns:
        ``"line N: field: message"`` strings; ``[]`` when every line matches (or the file does
        not exist: a back-end that never booked an event wrote none).
    """
    if isinstance(lines, (str, Path)):
        try:
            text = Path(lines).read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        parsed: list[Any] = []
        out: list[str] = []
        for number, line in enumerate(text.splitlines(), 1):
            try:
                parsed.append((number, json.loads(line)))
            except ValueError as err:
                out.append(f"line {number}: not JSON: {err}")
    else:
        parsed, out = list(enumerate(lines, 1)), []
    for number, doc in parsed:
        out += [f"line {number}: {p}" for p in problems(doc, "event-log")]
    return out
