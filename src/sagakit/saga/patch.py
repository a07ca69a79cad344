"""JSON patches on saga data (RFC 6902's ``add``, ``remove``, ``replace``, ``test``), pure.

An operator edits a saga's data with a patch, never by rewriting the whole
document: the patch says exactly what changes, and :func:`diff` records the
values before and after each touched path, so the history keeps what the
data was. Paths are JSON pointers (``/items/0/qty``); ``-`` appends to a list.
"""

from __future__ import annotations

import copy
from typing import Any

from ..errors import InvalidOperatorAction

OPS = ("add", "remove", "replace", "test")
MAX_OPS = 100


def apply_patch(doc: Any, patch: list[dict[str, Any]]) -> Any:
    """A patched copy of ``doc``; :class:`InvalidOperatorAction` on a bad patch."""
    if not isinstance(patch, list) or not patch or len(patch) > MAX_OPS:
        raise InvalidOperatorAction(f"a patch is a list of 1 to {MAX_OPS} operations")
    out = copy.deepcopy(doc)
    for op in patch:
        out = _one(out, op)
    return out


def diff(before: Any, after: Any, patch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each path the patch touched, with its value before and after (None: absent)."""
    return [
        {"path": op["path"], "before": _get(before, op["path"]), "after": _get(after, op["path"])}
        for op in patch
        if op.get("op") != "test"
    ]


def _one(doc: Any, op: Any) -> Any:
    if not isinstance(op, dict) or op.get("op") not in OPS or not isinstance(op.get("path"), str):
        raise InvalidOperatorAction(f"not a patch operation (op, path[, value]): {op!r}")
    keys = _pointer(op["path"])
    if op["op"] in ("add", "replace", "test") and "value" not in op:
        raise InvalidOperatorAction(f"{op['op']} {op['path']} needs a value")
    if not keys:
        return _root(doc, op)
    parent = _walk(doc, keys[:-1], op["path"])
    _at(parent, keys[-1], op)
    return doc


def _root(doc: Any, op: dict[str, Any]) -> Any:
    if op["op"] == "test":
        _test(doc, op)
        return doc
    if op["op"] == "remove":
        raise InvalidOperatorAction("the whole document cannot be removed")
    return copy.deepcopy(op["value"])


def _at(parent: Any, key: str, op: dict[str, Any]) -> None:
    if isinstance(parent, list):
        return _at_list(parent, key, op)
    if not isinstance(parent, dict):
        raise InvalidOperatorAction(f"{op['path']}: the parent is neither object nor list")
    if op["op"] != "add" and key not in parent:
        raise InvalidOperatorAction(f"{op['path']}: no such member")
    if op["op"] == "remove":
        del parent[key]
    elif op["op"] == "test":
        _test(parent[key], op)
    else:
        parent[key] = copy.deepcopy(op["value"])


def _at_list(parent: list[Any], key: str, op: dict[str, Any]) -> None:
    if key == "-" and op["op"] == "add":
        return parent.append(copy.deepcopy(op["value"]))
    i = _index(key, len(parent) + (op["op"] == "add"), op["path"])
    if op["op"] == "add":
        parent.insert(i, copy.deepcopy(op["value"]))
    elif op["op"] == "remove":
        del parent[i]
    elif op["op"] == "test":
        _test(parent[i], op)
    else:
        parent[i] = copy.deepcopy(op["value"])


def _test(value: Any, op: dict[str, Any]) -> None:
    if value != op["value"]:
        raise InvalidOperatorAction(f"test {op['path']} failed: the value is {value!r}")


def _walk(doc: Any, keys: list[str], path: str) -> Any:
    for key in keys:
        if isinstance(doc, list):
            doc = doc[_index(key, len(doc), path)]
        elif isinstance(doc, dict) and key in doc:
            doc = doc[key]
        else:
            raise InvalidOperatorAction(f"{path}: no such path")
    return doc


def _get(doc: Any, path: str) -> Any:
    try:
        return _walk(doc, _pointer(path), path)
    except InvalidOperatorAction:
        return None


def _index(key: str, size: int, path: str) -> int:
    if not key.isdigit() or int(key) >= size:
        raise InvalidOperatorAction(f"{path}: index {key!r} out of range")
    return int(key)


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise InvalidOperatorAction(f"a path is a JSON pointer starting with '/', got {path!r}")
    return [k.replace("~1", "/").replace("~0", "~") for k in path[1:].split("/")]
