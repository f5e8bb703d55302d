"""The API's OpenAPI document (3.0.3, which the bundled Swagger UI renders) and its docs page.

Written as data beside the routes it describes; ``tests/test_api.py`` validates it with
openapi-spec-validator and checks that its paths and methods are exactly the application's.
The docs page loads Swagger UI from the ``swagger-ui-bundle`` package, served by the API
itself: no CDN.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import HTMLResponse

from actors.states import State

_JSON = "application/json"
_PROBLEM = "application/problem+json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _problem(description: str) -> dict[str, Any]:
    return {"description": description, "content": {_PROBLEM: {"schema": _ref("Problem")}}}


def _ok(description: str, schema: str, **extra: Any) -> dict[str, Any]:
    return {"description": description, "content": {_JSON: {"schema": _ref(schema)}}, **extra}


_TASK_ID = {"name": "task_id", "in": "path", "required": True, "schema": {"type": "string"}}
_WATCH = {"name": "watch_token", "in": "query", "required": False, "schema": {"type": "string"},
          "description": "a watch token from the task's creation: reads this task only"}  # fmt: skip
_LAST_EVENT = {"name": "Last-Event-ID", "in": "header", "required": False, "schema": {"type": "string"},
               "description": "the id of the last event received: the stream goes on after it"}  # fmt: skip
_AUTH = {"401": _problem("no valid token"), "403": _problem("the token may not do this")}
_EVENTS = {
    "description": "Server-Sent Events (task.queued, task.retried, task.claimed, task.started, task.progress, "
    "file.resolved, file.completed, task.finalizing, task.completed, task.failed, task.canceled; reset when "
    "events were lost)",
    "content": {"text/event-stream": {"schema": {"type": "string"}}},
}

_SCHEMAS: dict[str, Any] = {
    "Problem": {
        "type": "object",
        "required": ["title", "status", "detail"],
        "properties": {
            "type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"},
            "detail": {"type": "string"}, "instance": {"type": "string"},
            "errors": {"type": "array", "items": {"type": "object", "properties": {
                "pointer": {"type": "string"}, "detail": {"type": "string"}}}},
        },
    },
    "File": {
        "type": "object",
        "description": "a file by its own url, or by a page showing it (resolved by a worker with haul[resolve])",
        "required": ["path"],
        "properties": {"url": {"type": "string"}, "page": {"type": "string"}, "path": {"type": "string"},
                       "size": {"type": "integer"}, "sha256": {"type": "string"},
                       "format": {"type": "string", "description": "a yt-dlp format selector, for a page"},
                       "resolved": {"type": "object", "description": "what its page resolved to, in status",
                                    "properties": {"extractor": {"type": "string"}, "format_id": {"type": "string"},
                                                   "title": {"type": "string"}, "duration": {"type": "number"},
                                                   "host": {"type": "string"}}}},
    },
    "Manifest": {
        "type": "object",
        "description": "a manifest ({files}) or a list of URLs ({urls})",
        "properties": {
            "name": {"type": "string"}, "key": {"type": "string"}, "webhook": {"type": "string"},
            "accept": {"type": "array", "items": {"type": "string"}},
            "files": {"type": "array", "items": _ref("File")},
            "urls": {"type": "array", "items": {"type": "string"}},
            "headers": {"type": "object", "additionalProperties": {"type": "string"},
                        "description": "sent with the task's requests (a secret: never shown back)"},
            "cookies": {"type": "string", "description": "Netscape cookie file content (a secret: never shown back)"},
        },
    },
    "Task": {
        "type": "object",
        "description": "the same keys as `haul status ID --json`",
        "required": ["id", "state"],
        "properties": {
            "id": {"type": "string"}, "name": {"type": "string"}, "key": {"type": "string", "nullable": True},
            "state": {"type": "string", "enum": [s.value for s in State]}, "attempts": {"type": "integer"},
            "files_total": {"type": "integer"}, "files_done": {"type": "integer"},
            "bytes_total": {"type": "integer"}, "bytes_done": {"type": "integer"},
            "bytes_stored": {"type": "integer"}, "error": {"type": "string", "nullable": True},
            "connections": {"type": "integer", "description": "connections to origins open now"},
            "files": {"type": "array", "items": {"type": "object"},
                      "description": "each with its state (done, downloading, waiting) and, downloading, "
                                     "bytes_done, connections and (once known) bytes_total"},
            "watch_token": {"type": "string", "description": "only in the answer to a submit"},
        },
    },
    "TaskPage": {
        "type": "object",
        "properties": {"tasks": {"type": "array", "items": _ref("Task")},
                       "next_cursor": {"type": "string", "nullable": True}},
    },
    "Counts": {"type": "object", "additionalProperties": {"type": "integer"}},
}  # fmt: skip


def document() -> dict[str, Any]:
    """The OpenAPI document of every route."""
    one_task = {"parameters": [_TASK_ID]}
    return {
        "openapi": "3.0.3",
        "info": {"title": "haul", "version": "1", "description": "Submit and follow haul's tasks."},
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/tasks": {
                "post": {
                    "summary": "Submit a task (idempotent on its key)",
                    "parameters": [
                        {"name": "Idempotency-Key", "in": "header", "required": False, "schema": {"type": "string"}}
                    ],  # fmt: skip
                    "requestBody": {"required": True, "content": {_JSON: {"schema": _ref("Manifest")}}},
                    "responses": {
                        "201": _ok("created", "Task", headers={"Location": {"schema": {"type": "string"}}}),
                        "200": _ok("the same key and request again: the same task", "Task"),
                        "413": _problem("body too large"),
                        "415": _problem("the body is not application/json"),
                        "422": _problem("bad input or a key conflict"),
                        **_AUTH,
                    },  # fmt: skip
                },
                "get": {
                    "summary": "List tasks in a state, newest first (or the one a key names)",
                    "parameters": [
                        {"name": name, "in": "query", "required": False, "schema": {"type": kind}}
                        for name, kind in (
                            ("state", "string"),
                            ("key", "string"),
                            ("limit", "integer"),
                            ("cursor", "string"),
                        )
                    ],  # fmt: skip
                    "responses": {"200": _ok("a page", "TaskPage"), "422": _problem("bad parameter"), **_AUTH},
                },
            },
            "/v1/tasks/{task_id}": {
                **one_task,
                "get": {
                    "summary": "One task",
                    "parameters": [_WATCH],
                    "responses": {"200": _ok("the task", "Task"), "404": _problem("no such task"), **_AUTH},
                },
            },
            "/v1/tasks/{task_id}/retry": {
                **one_task,
                "post": {
                    "summary": "Give a failed, dead or canceled task fresh attempts",
                    "responses": {
                        "200": _ok("queued again", "Task"),
                        "404": _problem("no such task"),
                        "409": _problem("the task's state does not allow it"),
                        **_AUTH,
                    },
                },
            },  # fmt: skip
            "/v1/tasks/{task_id}/cancel": {
                **one_task,
                "post": {
                    "summary": "Cancel a task that has not ended",
                    "responses": {
                        "200": _ok("canceled", "Task"),
                        "404": _problem("no such task"),
                        "409": _problem("the task's state does not allow it"),
                        **_AUTH,
                    },
                },
            },  # fmt: skip
            "/v1/tasks/{task_id}/events": {
                **one_task,
                "get": {
                    "summary": "The task's events: retained ones replayed, then live; closed after the final one",
                    "parameters": [_WATCH, _LAST_EVENT],
                    "responses": {
                        "200": _EVENTS,
                        "204": {"description": "the client has the final event"},
                        "404": _problem("no such task"),
                        **_AUTH,
                    },  # fmt: skip
                },
            },
            "/v1/events": {
                "get": {
                    "summary": "Every task's events from now on",
                    "parameters": [_LAST_EVENT],
                    "responses": {"200": _EVENTS, **_AUTH},
                },  # fmt: skip
            },
            "/v1/counts": {
                "get": {"summary": "Tasks by state", "responses": {"200": _ok("counts", "Counts"), **_AUTH}},
            },
            "/healthz": {
                "get": {
                    "summary": "Redis answers",
                    "security": [],
                    "responses": {"200": {"description": "ok"}, "503": _problem("Redis does not answer")},
                },
            },  # fmt: skip
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "security": [],
                    "responses": {"200": {"description": "OpenAPI 3.0"}},
                }
            },  # fmt: skip
            "/docs": {
                "get": {
                    "summary": "Interactive documentation",
                    "security": [],
                    "responses": {"200": {"description": "Swagger UI"}},
                }
            },  # fmt: skip
        },
    }


DOCS_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>haul API</title>
<link rel="stylesheet" href="/docs/static/swagger-ui.css"></head>
<body><div id="ui"></div>
<script src="/docs/static/swagger-ui-bundle.js"></script>
<script src="/docs/static/docs.js"></script>
</body></html>
"""

#: Swagger UI's start, as a file of its own: the page's Content-Security-Policy allows no inline script.
DOCS_JS = 'window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#ui"});\n'

DOCS_CSP = "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'"


def docs_page() -> HTMLResponse:
    return HTMLResponse(DOCS_HTML, headers={"Content-Security-Policy": DOCS_CSP})
