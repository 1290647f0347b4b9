"""The OpenAPI 3.1 description of the web page's JSON API (served at /api/openapi.json).

Built as a plain dict so it is one import away from the routes it describes;
tests check that it validates and that it names exactly api.ROUTES.
"""

from __future__ import annotations

import copy
from functools import lru_cache
from typing import Any

import hasync


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERRORS = {
    "401": {"$ref": "#/components/responses/Unauthenticated"},
    "503": {"$ref": "#/components/responses/DaemonDown"},
}
_WRITE_ERRORS = {
    **_ERRORS,
    "400": {"$ref": "#/components/responses/BadRequest"},
    "403": {"$ref": "#/components/responses/CsrfRefused"},
    "409": {"$ref": "#/components/responses/Refused"},
}
_WRITE_SECURITY = [{"session": [], "csrf": []}]


def _op(summary: str, ok: dict[str, Any], *, body: dict[str, Any] | None = None, write: bool = False,
        validation: bool = False, public: bool = False, params: list | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": {"200": _json(ok, "done")}}
    if public:
        op["security"] = []
    elif write:
        op["security"] = _WRITE_SECURITY
        op["responses"].update(_WRITE_ERRORS)
    else:
        op["responses"].update(_ERRORS)
    if validation:
        op["responses"]["422"] = {"$ref": "#/components/responses/Invalid"}
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    if params:
        op["parameters"] = params
    return op


_MESSAGE = _ref("Message")
_GROUP_ID = [{"name": "id", "in": "path", "required": True,
              "schema": {"type": "integer", "minimum": 1, "maximum": 255}}]

_SCHEMAS: dict[str, Any] = {
    "Message": {"type": "object", "required": ["ok"],
                "properties": {"ok": {"const": True}, "message": {"type": "string"}}},
    "Error": {"type": "object", "required": ["ok", "error"],
              "properties": {"ok": {"const": False}, "error": {"type": "string"},
                             "field": {"type": "string", "description":
                                       "the dotted config path of the culprit, e.g. "
                                       "group[0].monitor[1].floating_ip"}}},
    "Monitor": {"type": "object", "required": ["interface", "floating_ip"],
                "properties": {"interface": {"type": "string", "description": "Monitoring Interface"},
                               "floating_ip": {"type": "string", "description":
                                               "Floating IP Address; the prefix defaults to the "
                                               "interface's subnet when omitted"}}},
    "GroupForm": {
        "type": "object", "description": "the Add HA Group form; omitted fields take their defaults",
        "properties": {
            "id": {"type": ["integer", "string"]},
            "state": {"enum": ["master", "backup"], "description": "HA State"},
            "ha_link": {"type": "string", "description": "HA Link Interface"},
            "peer_address": {"type": "string", "description": "Peer HA Link Address"},
            "peer_mask": {"type": ["integer", "string"],
                          "description": "Peer HA Link Mask: a prefix length or a dotted mask"},
            "monitors": {"type": "array", "items": _ref("Monitor")},
            "priority": {"type": ["integer", "string"]},
            "heartbeat_interval_ms": {"type": ["number", "string"]},
            "dead_count": {"type": ["integer", "string"]},
            "preempt": {"enum": ["on", "off", "delay"]},
            "preempt_delay_ms": {"type": ["integer", "string"]},
            "garp_count": {"type": ["integer", "string"]},
            "garp_interval_ms": {"type": ["integer", "string"]},
        },
    },
    "Group": {
        "type": "object", "description": "HA Group Details as the daemon keeps them",
        "required": ["id", "state", "ha_link", "peer_address", "peer_mask", "monitor"],
        "properties": {
            "id": {"type": "integer"}, "state": {"enum": ["master", "backup"]},
            "priority": {"type": "integer"}, "ha_link": {"type": "string"},
            "peer_address": {"type": "string"}, "peer_mask": {"type": "integer"},
            "heartbeat_interval_ms": {"type": "number"}, "dead_count": {"type": "integer"},
            "preempt": {"enum": ["on", "off", "delay"]}, "preempt_delay_ms": {"type": "integer"},
            "garp_count": {"type": "integer"}, "garp_interval_ms": {"type": "integer"},
            "monitor": {"type": "array", "items": _ref("Monitor")},
        },
    },
    "Status": {
        "type": "object", "description": "the daemon's status (hasync status --json) plus web counters",
        "required": ["ok", "icon", "role", "state"],
        "properties": {
            "ok": {"const": True},
            "icon": {"enum": ["grey", "green", "red"]},
            "role": {"enum": ["", "Master", "Backup"]},
            "state": {"type": "string"},
            "cause": {"type": "string"},
            "reasons": {"type": "array", "items": {"type": "string"}},
            "hostname": {"type": "string"}, "enabled": {"type": "boolean"},
            "peer": {"type": ["object", "null"]},
            "sync": {"type": ["object", "null"]},
            "last_transition": {"type": ["object", "null"]},
            "web": {"type": "object", "additionalProperties": {"type": "integer"}},
        },
    },
}

_RESPONSES = {
    "Unauthenticated": _json(_ref("Error"), "no valid session: log in"),
    "BadRequest": _json(_ref("Error"), "not JSON, or the wrong shape"),
    "CsrfRefused": _json(_ref("Error"), "missing or wrong X-CSRF-Token"),
    "Refused": _json(_ref("Error"), "the daemon refused the operation"),
    "Invalid": _json(_ref("Error"), "a field failed validation; nothing was saved"),
    "DaemonDown": _json(_ref("Error"), "the hasync daemon is not answering"),
}


@lru_cache(maxsize=1)
def _document() -> dict[str, Any]:
    paths = {
        "/api/login": {"post": _op(
            "log in as admin; sets the session cookie", public=True,
            body={"type": "object", "required": ["password"], "properties": {"password": {"type": "string"}}},
            ok={"type": "object", "required": ["ok", "csrf_token"],
                "properties": {"ok": {"const": True}, "csrf_token": {"type": "string"},
                               "hostname": {"type": "string"}}})
            | {"responses": {
                "200": _json({"type": "object"}, "logged in: send csrf_token as X-CSRF-Token"),
                "400": {"$ref": "#/components/responses/BadRequest"},
                "401": _json(_ref("Error"), "wrong password"),
                "403": _json(_ref("Error"), "no admin password is set"),
                "429": _json(_ref("Error"), "too many failed logins from this address")}}},
        "/api/session": {"get": _op("whether this browser is logged in (and its CSRF token)", public=True,
                                    ok={"type": "object", "properties": {
                                        "authenticated": {"type": "boolean"},
                                        "csrf_token": {"type": "string"},
                                        "hostname": {"type": "string"},
                                        "password_set": {"type": "boolean"}}})},
        "/api/logout": {"post": _op("end this session", _MESSAGE, write=True)},
        "/api/status": {"get": _op("the HA icon, role, peer, sync health, last failover, reasons for red",
                                   _ref("Status"))},
        "/api/interfaces": {"get": _op("this node's interfaces and addresses (for the dropdowns)", {
            "type": "object", "properties": {"interfaces": {"type": "array", "items": {
                "type": "object", "properties": {"name": {"type": "string"},
                                                 "addresses": {"type": "array",
                                                               "items": {"type": "string"}}}}}}})},
        "/api/global": {
            "get": _op("Global Settings", {"type": "object", "properties": {
                "status": {"enum": ["enable", "disable"]}}}),
            "post": _op("Global Settings: set Config Status", _MESSAGE, write=True, validation=True,
                        body={"type": "object", "required": ["status"],
                              "properties": {"status": {"enum": ["enable", "disable"]}}}),
        },
        "/api/groups": {
            "get": _op("HA Group Details of every group", {"type": "object", "properties": {
                "groups": {"type": "array", "items": _ref("Group")}}}),
            "post": _op("Add HA Group (answers \"HA Group Added Successfully\")", _MESSAGE, write=True,
                        validation=True, body=_ref("GroupForm")),
        },
        "/api/groups/{id}": {
            "get": _op("one group's details", {"type": "object", "properties": {"group": _ref("Group")}},
                       params=_GROUP_ID),
            "put": _op("edit a group: the given fields change, the others stay", _MESSAGE, write=True,
                       validation=True, body=_ref("GroupForm"), params=_GROUP_ID),
            "delete": _op("delete a group", _MESSAGE, write=True, params=_GROUP_ID),
        },
        "/api/switchover": {"post": _op("graceful hand-over of the Master role to the peer", _MESSAGE,
                                        write=True)},
        "/api/resync": {"post": _op("full resync of state (and config) from the Master", {"type": "object"},
                                    write=True, body={"type": "object", "properties": {
                                        "config": {"type": "boolean",
                                                   "description": "the replicated configuration only"}}})},
        "/api/openapi.json": {"get": _op("this document", {"type": "object"}, public=True)},
    }
    paths["/api/groups/{id}"]["get"]["responses"]["404"] = _json(_ref("Error"), "no such group")
    return {
        "openapi": "3.1.0",
        "info": {"title": "hasync High Availability web API", "version": hasync.__version__,
                 "description": "The JSON API under the High Availability page. Log in with "
                                "POST /api/login; state-changing requests need the session "
                                "cookie, the X-CSRF-Token header and a JSON body."},
        "paths": paths,
        "security": [{"session": []}],
        "components": {
            "schemas": _SCHEMAS,
            "responses": _RESPONSES,
            "securitySchemes": {
                "session": {"type": "apiKey", "in": "cookie", "name": "hasync_session"},
                "csrf": {"type": "apiKey", "in": "header", "name": "X-CSRF-Token"},
            },
        },
    }


def openapi_document() -> dict[str, Any]:
    """A fresh copy (callers may add to it)."""
    return copy.deepcopy(_document())
