"""A merchants file's problems as people read them: one line per problem, naming the entry (by its
slug or name, else its place), the field and what is wrong, from pydantic's validation errors."""
from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from .networks import Entry

# section -> (the key that names an entry, what an entry is called)
NAMING = {"merchants": ("slug", "merchant"), "networks": ("name", "network"), "webhooks": ("name", "webhook")}
SECTIONS = "must be a list"


def label(doc: dict[str, Any], section: str, index: int) -> str:
    """`merchant 'aliexpress'`, or `merchants[3]` when the entry has no name to go by."""
    key, kind = NAMING[section]
    raw = doc.get(section)
    entry = raw[index] if isinstance(raw, list) and index < len(raw) else None
    value = entry.get(key) if isinstance(entry, dict) else None
    return f"{kind} {value!r}" if isinstance(value, str) else f"{section}[{index}]"


def _what(error: ErrorDetails, hint: str | None) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown field"
    if error["type"] == "value_error":
        said = str(error.get("ctx", {}).get("error", ""))
        if said:
            return said
    return hint or error["msg"]


def problems(error: ValidationError, doc: dict[str, Any], entries: dict[str, type[Entry]]) -> list[str]:
    found = []
    for e in error.errors(include_url=False, include_input=False):  # never an input: it may be a secret
        section, *rest = e["loc"]
        if not rest:
            unknown = e["type"] == "extra_forbidden"
            found.append(f"{section}: {'unknown top-level section' if unknown else SECTIONS}")
            continue
        index, *path = rest
        where = label(doc, str(section), int(index))
        if not path:  # the entry as a whole
            shape = e["type"] in ("model_type", "model_attributes_type")
            found.append(f"{where}: {'must be a mapping' if shape else _what(e, None)}")
            continue
        field = str(path[0])
        what = _what(e, entries[str(section)].HINTS.get(field))
        found += [f"{where}: {field}: {part}" for part in what.split("; ")]  # a line per problem
    return found
