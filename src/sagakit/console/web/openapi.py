"""The OpenAPI 3.0 document of the JSON API, served at ``/api/openapi.json``."""

from __future__ import annotations

from typing import Any

from ..admissible import SAGA_ACTIONS
from ..query import STATES

_STR = {"type": "string"}
_NUM = {"type": "number"}
_ERR = {
    "description": "error",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
}
_DENIED = {"401": _ERR, "403": _ERR}


def _ok(schema: dict[str, Any], code: str = "200") -> dict[str, Any]:
    return {code: {"description": "ok", "content": {"application/json": {"schema": schema}}}}


def _param(name: str, schema: dict[str, Any], where: str = "query") -> dict[str, Any]:
    return {"name": name, "in": where, "required": where == "path", "schema": schema}


_QUERY_PARAMS = [
    _param("type", _STR),
    _param("state", {"type": "string", "enum": list(STATES)}),
    _param("step", _STR),
    _param("older_than", {"type": "number", "minimum": 0}),
    _param("stuck_for", {"type": "number", "minimum": 0}),
    _param("correlation_id", _STR),
    _param("version", {"type": "integer", "minimum": 1}),
    _param("limit", {"type": "integer", "minimum": 1, "maximum": 10000}),
]
_PATCH = {"type": "array", "items": {"type": "object"}, "maxItems": 100}
_ACTION_BODY = {
    "type": "object",
    "required": ["reason"],
    "additionalProperties": False,
    "properties": {
        "reason": {"type": "string", "minLength": 1, "maxLength": 2000},
        "step": _STR,
        "patch": _PATCH,
        "wait": {"type": "number", "minimum": 0, "maximum": 30},
    },
}


_DL_ACTION = {"type": "string", "enum": ["replay", "purge"]}
_DL_BODY = {
    "type": "object",
    "required": ["reason"],
    "additionalProperties": False,
    "properties": {
        "reason": {"type": "string", "minLength": 1, "maxLength": 2000},
        "wait": {"type": "number", "minimum": 0, "maximum": 30},
    },
}
_DL_BULK_BODY = {
    "type": "object",
    "required": ["reason"],
    "additionalProperties": False,
    "properties": {
        "reason": {"type": "string", "minLength": 1, "maxLength": 2000},
        "dry_run": {"type": "boolean"},
        "filter": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "queue": _STR,
                "error_type": _STR,
                "saga_id": _STR,
                "older_than": {"type": "number", "minimum": 0},
                "limit": {"type": "integer", "minimum": 1, "maximum": 10000},
            },
        },
    },
}
_ACTING = {"400": _ERR, "413": _ERR, "415": _ERR, "422": _ERR}


def _dead_letter_paths() -> dict[str, Any]:
    action = _param("action", _DL_ACTION, "path")
    seq = _param("seq", {"type": "integer", "minimum": 1, "maximum": 2**63 - 1}, "path")
    return {
        "/api/dead-letters/{seq}/{action}": {
            "post": {
                "parameters": [seq, action],
                "requestBody": _body(_DL_BODY),
                "responses": {
                    **_ok({"type": "object"}),
                    **_ok({"type": "object"}, "202"),
                    **_DENIED,
                    **_ACTING,
                    "404": _ERR,
                    "409": _ERR,
                },
            }
        },
        "/api/dead-letters/bulk/{action}": {
            "post": {
                "parameters": [action],
                "requestBody": _body(_DL_BULK_BODY),
                "responses": {**_ok({"type": "object"}), **_DENIED, **_ACTING},
            }
        },
    }


_REASON = {"type": "string", "minLength": 1, "maxLength": 2000}
_NAME = {"type": "string", "minLength": 1, "maxLength": 200}
_LIMIT = _param("limit", {"type": "integer", "minimum": 1, "maximum": 10000})


def _get(params: list[dict[str, Any]], *codes: str) -> dict[str, Any]:
    extra = {code: _ERR for code in codes}
    return {
        "get": {"parameters": params, "responses": {**_ok({"type": "object"}), **_DENIED, **extra}}
    }


def _post(params: list[dict[str, Any]], body: dict[str, Any]) -> dict[str, Any]:
    responses = {**_ok({"type": "object"}), **_DENIED, **_ACTING, "404": _ERR, "409": _ERR}
    return {"post": {"parameters": params, "requestBody": _body(body), "responses": responses}}


def _object(required: list[str], **props: Any) -> dict[str, Any]:
    return {"type": "object", "required": required, "additionalProperties": False,
            "properties": props}  # fmt: skip


def _flow_paths() -> dict[str, Any]:
    """Choreography flows, process managers and their timers, 2PC branches in doubt."""
    path = [_param(n, _NAME, "path") for n in ("process", "key", "timer")]
    timer_action = _param("action", {"type": "string", "enum": ["fire", "cancel"]}, "path")
    done = _param("done", {"type": "string", "enum": ["true", "false"]})
    timers = _param("timers", {"type": "string", "enum": ["pending"]})
    by = [_param(n, _STR) for n in ("process", "status", "correlation_id")]
    bulk = _object(["reason", "timer"], reason=_REASON, timer=_NAME, process=_STR, status=_STR,
                   correlation_id=_STR, dry_run={"type": "boolean"},
                   limit={"type": "integer", "minimum": 1, "maximum": 10000})  # fmt: skip
    outcome = {"type": "string", "enum": ["commit", "rollback"]}
    resolve = _object(
        ["reason", "outcome"], reason=_REASON, outcome=outcome, force={"type": "boolean"}
    )
    flow_by = [_param(n, _STR) for n in ("flow", "status", "correlation_id")]
    return {
        "/api/flows": _get([*flow_by, _LIMIT], "422"),
        "/api/flows/{correlation_id}": _get(
            [_param("correlation_id", _STR, "path"), _param("flow", _STR)], "404"
        ),
        "/api/processes": _get([*by, done, timers, _LIMIT], "422"),
        "/api/processes/{process}/{key}": _get(path[:2], "404", "422"),
        "/api/processes/{process}/{key}/timers/{timer}/{action}": _post(
            [*path, timer_action], _object(["reason"], reason=_REASON)
        ),
        "/api/timers/bulk/{action}": _post([timer_action], bulk),
        "/api/2pc": _get([], "503"),
        "/api/2pc/{gid}/resolve": _post([_param("gid", _NAME, "path")], resolve),
    }


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def document() -> dict[str, Any]:
    """The document (built on demand; it is small)."""
    action = _param("action", {"type": "string", "enum": list(SAGA_ACTIONS)}, "path")
    saga_id = _param("saga_id", _STR, "path")
    return {
        "openapi": "3.0.3",
        "info": {"title": "sagakit console API", "version": "1"},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Error": {"type": "object", "properties": {"error": _STR, "type": _STR}}},
        },
        "security": [{"bearer": []}],
        "paths": {
            "/api/sagas": {
                "get": {
                    "parameters": _QUERY_PARAMS,
                    "responses": {**_ok({"type": "object"}), **_DENIED, "422": _ERR},
                }
            },
            "/api/sagas/{saga_id}": {
                "get": {
                    "parameters": [saga_id],
                    "responses": {**_ok({"type": "object"}), **_DENIED, "404": _ERR},
                }
            },
            "/api/sagas/{saga_id}/{action}": {
                "post": {
                    "parameters": [saga_id, action],
                    "requestBody": _body(_ACTION_BODY),
                    "responses": {
                        **_ok({"type": "object"}),
                        **_ok({"type": "object"}, "202"),
                        **_DENIED,
                        "400": _ERR,
                        "404": _ERR,
                        "409": _ERR,
                        "413": _ERR,
                        "415": _ERR,
                        "422": _ERR,
                    },
                }
            },
            "/api/bulk/{action}": {
                "post": {
                    "parameters": [action],
                    "requestBody": _body(
                        {
                            "type": "object",
                            "required": ["reason"],
                            "properties": {
                                "reason": _STR,
                                "dry_run": {"type": "boolean"},
                                "query": {"type": "object"},
                                "step": _STR,
                                "patch": _PATCH,
                            },
                        }
                    ),
                    "responses": {
                        **_ok({"type": "object"}),
                        **_DENIED,
                        "400": _ERR,
                        "413": _ERR,
                        "415": _ERR,
                        "422": _ERR,
                    },
                }
            },
            "/api/audit": {
                "get": {
                    "parameters": [
                        _param("actor", _STR),
                        _param("action", _STR),
                        _param("target", _STR),
                        _param("outcome", {"type": "string", "enum": ["done", "denied", "failed"]}),
                        _param("limit", {"type": "integer", "minimum": 1, "maximum": 10000}),
                    ],
                    "responses": {**_ok({"type": "array"}), **_DENIED, "422": _ERR},
                }
            },
            "/api/dead-letters": {
                "get": {
                    "parameters": [
                        _param("limit", {"type": "integer", "minimum": 1, "maximum": 10000})
                    ],
                    "responses": {**_ok({"type": "array"}), **_DENIED, "422": _ERR},
                }
            },
            **_dead_letter_paths(),
            **_flow_paths(),
            "/api/health": {"get": {"responses": {**_ok({"type": "object"}), **_DENIED}}},
            "/api/tokens": {
                "get": {"responses": {**_ok({"type": "array"}), **_DENIED}},
                "post": {
                    "requestBody": _body(
                        {
                            "type": "object",
                            "required": ["role"],
                            "properties": {
                                "role": {"type": "string", "enum": ["viewer", "operator", "admin"]},
                                "name": _STR,
                            },
                        }
                    ),
                    "responses": {
                        **_ok({"type": "object"}, "201"),
                        **_DENIED,
                        "400": _ERR,
                        "413": _ERR,
                        "415": _ERR,
                        "422": _ERR,
                    },
                },
            },
            "/api/tokens/{token_id}": {
                "delete": {
                    "parameters": [_param("token_id", _STR, "path")],
                    "responses": {**_ok({"type": "object"}), **_DENIED, "404": _ERR},
                }
            },
        },
    }
