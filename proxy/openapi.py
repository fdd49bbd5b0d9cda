"""The OpenAPI 3.1 document of the HTTP API, served at ``/openapi.json``.

Written by hand, next to the code it describes, and checked by the tests against the
proxy's real responses (``tests/e2e/test_openapi.py``).
"""

from __future__ import annotations

from typing import Any

from . import __version__

_ERROR_REF = {"$ref": "#/components/schemas/Error"}
_JSON_ERROR = {"application/json": {"schema": _ERROR_REF}}


def _query(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description,
            "schema": {"type": "string", "minLength": 1, "maxLength": 256}}  # fmt: skip


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": _JSON_ERROR}


EVENT_DATA_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "The `data:` line of a lifecycle event.",
    "required": ["sessionId", "ownerAccessKey", "reason"],
    "properties": {
        "sessionId": {"type": "string", "description": "The session's name."},
        "ownerAccessKey": {"type": "string"},
        "reason": {"type": ["string", "null"]},
        "result": {"enum": ["UNDEFINED", "SUCCESS", "FAILURE"]},
        "kernelId": {"type": "string"},
        "exitCode": {"type": "integer"},
        "group": {"type": "string", "description": "The session's group (withGroup=true only)."},
    },
    "additionalProperties": False,
}

EVENT_DATA_V5_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "The `data:` line of a lifecycle event on `/events/session`.",
    "required": ["reason", "sessionName", "ownerAccessKey", "sessionId", "exitCode"],
    "properties": {
        "reason": {"type": ["string", "null"]},
        "sessionName": {"type": "string", "description": "The session's name."},
        "ownerAccessKey": {"type": "string"},
        "sessionId": {
            "type": ["string", "null"],
            "description": "The session's UUID (null from an upstream that has none).",
        },
        "exitCode": {
            "type": ["integer", "null"],
            "description": "On kernel_terminating, kernel_terminated, session_success and "
            "session_failure; null on every other event.",
        },
        "kernelId": {"type": ["string", "null"], "description": "kernel_* events only."},
        "clusterRole": {"type": ["string", "null"], "description": "kernel_* events only."},
        "clusterIdx": {"type": "integer", "description": "kernel_* events only; 0 included."},
        "group": {"type": "string", "description": "The session's group (withGroup=true only)."},
    },
    "additionalProperties": False,
}


WITH_GROUP: dict[str, Any] = {
    "name": "withGroup",
    "in": "query",
    "required": False,
    "description": "`true`: every event's data also has `group`, the session's group "
    "(project) name, which the data of neither generation carries otherwise (the "
    "dashboard asks for it). `false` (default): the data as the generation has it.",
    "schema": {"enum": ["true", "false"]},
}


def _stream_path(
    summary: str, data_schema: str, filters: list[dict[str, Any]], note: str
) -> dict[str, Any]:
    """One API generation's event stream: its filters and data differ, nothing else."""
    return {
        "get": {
            "summary": summary,
            "description": (
                "Each event: `id: <log id>:<sequence>` (the same id for the same event on "
                "every path and replica), `event: <name>` (an open set, e.g. "
                f"kernel_started), one `data:` line of JSON ({data_schema}). {note} Stream "
                "notices: `stream_gap` (StreamGap data, no id), `stream_overflow`, "
                "`server_close`. `: ping` comments keep the stream open. Clients "
                "sending `Accept: text/event-stream` also get id-only blocks that "
                "move their Last-Event-ID without an event. With `initialState=true` the "
                "stream starts with `stream_state_begin` (StateBegin data, no id), then the "
                "latest event per visible entity exactly as it was delivered live but "
                "without an `id:` line, then `stream_state_end` (StateEnd data) whose `id:` "
                "is the position the state reflects; live events follow from exactly "
                "there. Such a stream never gets `stream_gap`: it gets a fresh "
                "`stream_state_begin` (reason `resync`) ... `stream_state_end` instead."
            ),
            "parameters": [
                *filters,
                _query("lastEventId", "Resume after this id (first connection)."),
                {
                    "name": "initialState",
                    "in": "query",
                    "required": False,
                    "description": "`true`: the current state first (latest event per "
                    "entity the caller may see), then changes; resyncs instead of gaps. "
                    "`false` (default): changes only.",
                    "schema": {"enum": ["true", "false"]},
                },
                WITH_GROUP,
                {
                    "name": "Last-Event-ID",
                    "in": "header",
                    "required": False,
                    "description": "Resume after this id (reconnections).",
                    "schema": {
                        "type": "string",
                        "pattern": "^[0-9A-Za-z_-]{1,64}:[0-9]{1,20}$",
                    },
                },
            ],
            "responses": {
                "200": {
                    "description": "An endless event stream",
                    "content": {
                        "text/event-stream": {
                            "schema": {"type": "string"},
                            "x-event-data": {"$ref": f"#/components/schemas/{data_schema}"},
                            "x-gap-data": {"$ref": "#/components/schemas/StreamGap"},
                            "x-state-begin-data": {"$ref": "#/components/schemas/StateBegin"},
                            "x-state-end-data": {"$ref": "#/components/schemas/StateEnd"},
                        }
                    },
                },
                "400": _error("Bad parameter, query or Last-Event-ID"),
                "401": _error("Not authenticated (the `error` field says why)"),
                "403": _error("A user naming another owner's key"),
            },
        }
    }


V4_FILTERS: list[dict[str, Any]] = [
    _query("sessionId", "A session name; `*` (default) for all visible."),
    _query("ownerAccessKey", "The session owner's key (admins only)."),
    _query("owner_access_key", "Alias of ownerAccessKey (the SDK's)."),
    _query("group", "A group (project) name; `*` (default) for all."),
    _query("groupName", "Alias of group."),
]
V5_FILTERS: list[dict[str, Any]] = [
    _query("sessionName", "A session name; `*` (default) for all visible."),
    _query("name", "Alias of sessionName."),
    _query("ownerAccessKey", "The named session's owner (admins only)."),
    _query("owner_access_key", "Alias of ownerAccessKey (the SDK's)."),
    _query("sessionId", "A session UUID; overrides sessionName and ownerAccessKey."),
    _query("group", "A group (project) name; `*` (default) for all."),
    _query("groupName", "Alias of group."),
    {
        "name": "scope",
        "in": "query",
        "required": False,
        "description": "`session`: only session_* events; `kernel`: only "
        "kernel_* events; `*` (default): both.",
        "schema": {"enum": ["*", "session", "kernel"]},
    },
]


def _state_path(summary: str, state_schema: str, filters: list[dict[str, Any]]) -> dict[str, Any]:
    """One generation's state as JSON: the stream's filters, its data, a position."""
    return {
        "get": {
            "summary": summary,
            "description": (
                "What a stream with the same filters and `initialState=true` sends between "
                "`stream_state_begin` and `stream_state_end`: for every entity the caller "
                "may see, the latest event, with the `event` name and `data` a live "
                "delivery has, in log order. `position` is the position the state "
                "reflects: open the stream with it as `Last-Event-ID` (or `lastEventId`) "
                "to get every change after it, none missing, none repeated. Only the "
                "filters and `withGroup` are taken: `lastEventId` and `initialState` are "
                "refused here."
            ),
            "parameters": [*filters, WITH_GROUP],
            "responses": {
                "200": {
                    "description": "The state",
                    "content": {
                        "application/json": {
                            "schema": {"$ref": f"#/components/schemas/{state_schema}"}
                        }
                    },
                },
                "400": _error("Bad parameter or query"),
                "401": _error("Not authenticated (the `error` field says why)"),
                "403": _error("A user naming another owner's key"),
            },
        }
    }


def _state_schema(data_schema: str) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["position", "entities", "events"],
        "properties": {
            "position": {
                "type": "string",
                "pattern": "^[0-9A-Za-z_-]{1,64}:[0-9]{1,20}$",
                "description": "The position the state reflects: resume the stream here.",
            },
            "entities": {"type": "integer", "minimum": 0},
            "events": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["event", "data"],
                    "properties": {
                        "event": {"type": "string"},
                        "data": {"$ref": f"#/components/schemas/{data_schema}"},
                    },
                    "additionalProperties": False,
                },
            },
        },
        "additionalProperties": False,
    }


DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "kernel-events-proxy",
        "version": __version__,
        "description": (
            "Kernel lifecycle events from the cluster manager's gRPC stream, as "
            "authenticated, filtered Server-Sent Events: Backend.AI API v4.20190615's "
            "`/stream/kernel/_/events` and v5-and-later's `/events/session`."
        ),
    },
    "paths": {
        "/": {
            "get": {
                "summary": "API version document (clients negotiate from it)",
                "security": [],
                "responses": {
                    "200": {
                        "description": "The version document (JSON unless the client "
                        "prefers text/html, which gets the dashboard page).",
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/Version"}
                            },
                            "text/html": {"schema": {"type": "string"}},
                        },
                    }
                },
            }
        },
        "/healthz": {
            "get": {
                "summary": "The process (or its group of workers) is alive",
                "description": "With `server.workers` above 1, the answer names the worker "
                "that gave it and counts the group's workers; it is 503 when the worker "
                "cannot reach its supervisor.",
                "security": [],
                "responses": {
                    "200": {
                        "description": "Alive",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["status"],
                                    "properties": {
                                        "status": {"const": "ok"},
                                        "worker": {"type": "integer", "minimum": 1},
                                        "workers": {"$ref": "#/components/schemas/Workers"},
                                    },
                                    "additionalProperties": False,
                                }
                            }
                        },
                    },
                    "503": _error(
                        "A worker of a group that cannot reach its supervisor "
                        "(`supervisor-unavailable`)"
                    ),
                },
            }
        },
        "/readyz": {
            "get": {
                "summary": "The upstream stream is live (with several workers: in every one)",
                "security": [],
                "responses": {
                    "200": {
                        "description": "Ready",
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/Readiness"}
                            }
                        },
                    },
                    "503": {
                        "description": "The upstream stream is not live (or, in a group, "
                        "not in every worker; or the worker cannot reach its supervisor: "
                        "an Error, `supervisor-unavailable`)",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "oneOf": [
                                        {"$ref": "#/components/schemas/Readiness"},
                                        _ERROR_REF,
                                    ]
                                }
                            }
                        },
                    },
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics (absent here when `server.metrics_bind` is set)",
                "security": [],
                "responses": {
                    "200": {
                        "description": "Prometheus text format 0.0.4",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "security": [],
                "responses": {
                    "200": {
                        "description": "OpenAPI 3.1",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
            }
        },
        "/stream/kernel/_/events": _stream_path(
            "Kernel lifecycle events as Server-Sent Events (API v4)",
            "EventData",
            V4_FILTERS,
            "A cluster session's sub-kernels' `kernel_*` events are not sent on this path.",
        ),
        "/stream/kernel/_/events/state": _state_path(
            "The state as JSON, with the filters and data of /stream/kernel/_/events",
            "StateV4",
            V4_FILTERS,
        ),
        "/events/session": _stream_path(
            "Session and kernel lifecycle events as Server-Sent Events (API v5 and later)",
            "EventDataV5",
            V5_FILTERS,
            "Every kernel's `kernel_*` events are sent, each with its clusterRole and clusterIdx.",
        ),
        "/events/session/state": _state_path(
            "The state as JSON, with the filters and data of /events/session",
            "StateV5",
            V5_FILTERS,
        ),
    },
    "components": {
        "securitySchemes": {
            "backendaiSignature": {
                "type": "apiKey",
                "in": "header",
                "name": "Authorization",
                "description": (
                    "`BackendAI signMethod=HMAC-SHA256, credential=<access key>:<hex "
                    "signature>`, with `Date` (or `X-BackendAI-Date`) and "
                    "`X-BackendAI-Version`, signed as the Backend.AI SDK does."
                ),
            },
        },
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["status", "error", "title", "detail"],
                "properties": {
                    "status": {"type": "integer", "minimum": 400, "maximum": 599},
                    "error": {"type": "string", "description": "A short, stable code."},
                    "title": {"type": "string"},
                    "detail": {"type": "string", "description": "What was wrong."},
                },
                "additionalProperties": False,
            },
            "Version": {
                "type": "object",
                "required": ["version"],
                "properties": {
                    "version": {"const": "v4.20190615"},
                    "manager": {"type": "string"},
                    "proxy": {"type": "string"},
                },
            },
            "Readiness": {
                "type": "object",
                "required": ["status", "upstream"],
                "properties": {
                    "status": {"enum": ["ready", "upstream-unavailable"]},
                    "upstream": {"type": "boolean"},
                    "workers": {"$ref": "#/components/schemas/Workers"},
                },
                "additionalProperties": False,
            },
            "Workers": {
                "description": "A group's worker processes (`server.workers` above 1): "
                "configured, running (serving) and, in readiness, how many of those have a "
                "live upstream stream.",
                "type": "object",
                "required": ["configured", "running"],
                "properties": {
                    "configured": {"type": "integer", "minimum": 2},
                    "running": {"type": "integer", "minimum": 0},
                    "upstream_live": {"type": "integer", "minimum": 0},
                },
                "additionalProperties": False,
            },
            "EventData": EVENT_DATA_SCHEMA,
            "EventDataV5": EVENT_DATA_V5_SCHEMA,
            "StateV4": _state_schema("EventData"),
            "StateV5": _state_schema("EventDataV5"),
            "StateBegin": {
                "type": "object",
                "required": ["reason"],
                "properties": {"reason": {"enum": ["initial", "resync"]}},
                "additionalProperties": False,
            },
            "StateEnd": {
                "type": "object",
                "required": ["entities"],
                "properties": {"entities": {"type": "integer", "minimum": 0}},
                "additionalProperties": False,
            },
            "StreamGap": {
                "type": "object",
                "required": ["reason", "after", "before"],
                "properties": {
                    "reason": {"type": "string"},
                    "after": {"type": ["string", "null"]},
                    "before": {"type": ["string", "null"]},
                },
                "additionalProperties": False,
            },
        },
    },
    "security": [{"backendaiSignature": []}],
}


# --- The browser side (web.py): sessions, the dashboard's files ------------------------

_PRINCIPAL: dict[str, Any] = {
    "type": "object",
    "required": ["access_key", "role", "domain", "user_id", "expires_in"],
    "properties": {
        "access_key": {"type": "string"},
        "role": {"enum": ["user", "admin", "superadmin"]},
        "domain": {"type": "string"},
        "user_id": {"type": "string"},
        "expires_in": {"type": "integer", "description": "Seconds the session lasts."},
    },
    "additionalProperties": False,
}
_UI_FILE = {
    "description": "The file",
    "content": {
        media: {"schema": {"type": "string"}}
        for media in ("text/html", "text/javascript", "text/css", "image/svg+xml")
    },
}
DOCUMENT["paths"].update(
    {
        "/server/login": {
            "post": {
                "summary": "Sign in with a keypair; sets the session cookie",
                "description": (
                    "Sets an HttpOnly, SameSite=Lax cookie (Secure over TLS) holding a "
                    "signed, expiring token. Wrong credentials get the same answer whether "
                    "or not the access key exists."
                ),
                "security": [],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["access_key", "secret_key"],
                                "properties": {
                                    "access_key": {"type": "string", "maxLength": 256},
                                    "secret_key": {"type": "string", "maxLength": 256},
                                },
                                "additionalProperties": False,
                            }
                        }
                    },
                },
                "responses": {
                    "200": {
                        "description": "Signed in",
                        "content": {"application/json": {"schema": _PRINCIPAL}},
                    },
                    "400": _error("Malformed body (the `error` field says how)"),
                    "401": _error("Wrong access key or secret key"),
                    "403": _error("A request from a foreign origin"),
                    "404": _error("Cookie sessions are not configured"),
                    "415": _error("The body is not application/json"),
                },
            }
        },
        "/server/logout": {
            "post": {
                "summary": "Sign out: clears the session cookie",
                "security": [],
                "responses": {
                    "200": {
                        "description": "Signed out",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "properties": {"status": {"const": "logged-out"}},
                                }
                            }
                        },
                    },
                    "403": _error("A request from a foreign origin"),
                },
            }
        },
        "/server/session": {
            "get": {
                "summary": "Who the session cookie names",
                "security": [{"sessionCookie": []}],
                "responses": {
                    "200": {
                        "description": "Signed in",
                        "content": {"application/json": {"schema": _PRINCIPAL}},
                    },
                    "401": _error("No valid session"),
                },
            }
        },
        "/ui/": {
            "get": {
                "summary": "The dashboard page",
                "security": [],
                "responses": {"200": _UI_FILE},
            }
        },
        "/ui/{name}": {
            "get": {
                "summary": "The dashboard's files (app.js, style.css, favicon.svg)",
                "security": [],
                "parameters": [
                    {
                        "name": "name",
                        "in": "path",
                        "required": True,
                        "description": "Any other name: 404.",
                        "schema": {"enum": ["index.html", "app.js", "style.css", "favicon.svg"]},
                    }
                ],
                "responses": {"200": _UI_FILE, "404": _error("No such file")},
            }
        },
    }
)
DOCUMENT["components"]["securitySchemes"].update(
    {
        "sessionCookie": {
            "type": "apiKey",
            "in": "cookie",
            "name": "kep_session",
            "description": "Set by POST /server/login (the name is `session.cookie_name`).",
        },
        "bearerJwt": {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "JWT",
            "description": (
                "HMAC-signed (`jwt.key`); claims `sub` or `access_key`, `role`, `user_id`, "
                "`domain`, `exp`."
            ),
        },
    }
)
DOCUMENT["security"] += [{"sessionCookie": []}, {"bearerJwt": []}]


# --- Abuse limits (limits.py, [limits]) -----------------------------------------------

_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before trying again.",
        "required": True,
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    }
}


def _limited(description: str) -> dict[str, Any]:
    return _error(description) | {"headers": _RETRY_AFTER}


# Every route checks the request's host and size before anything else.
for _item in DOCUMENT["paths"].values():
    for _operation in _item.values():
        _operation["responses"].setdefault(
            "400", _error("`bad-host`: the Host header is not a valid host name")
        )
        _operation["responses"].setdefault(
            "414", _error("The query string is longer than `limits.max_query_length`")
        )
        _operation["responses"].setdefault(
            "431", _error("The request headers are larger than `limits.max_header_bytes`")
        )
for _path in ("/stream/kernel/_/events", "/events/session"):
    DOCUMENT["paths"][_path]["get"]["responses"].update(
        {
            "429": _limited(
                "This access key already holds `limits.max_streams_per_key` streams "
                "(`too-many-streams`, counted over every path)"
            ),
            "503": _limited(
                "The server holds `limits.max_streams` streams (`server-busy`), or "
                "initialState=true and the upstream offers no snapshot (`state-unavailable`)"
            ),
        }
    )
for _path in ("/stream/kernel/_/events/state", "/events/session/state"):
    DOCUMENT["paths"][_path]["get"]["responses"]["503"] = _limited(
        "The upstream offers no snapshot (`state-unavailable`), or the state is being "
        "loaded (`state-loading`: a proxy just started or reloading it)"
    )
DOCUMENT["paths"]["/server/login"]["post"]["responses"].update(
    {
        "408": _error("The body did not arrive within `limits.body_timeout` (`body-timeout`)"),
        "429": _limited(
            "Too many attempts from this address (`too-many-attempts`) or failed ones for "
            "this access key (`too-many-failures`)"
        ),
    }
)
