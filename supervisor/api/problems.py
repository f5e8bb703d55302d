"""Errors as RFC 9457 problem details (``application/problem+json``), one class for every
refusal the API makes, so a client reads the same shape whatever went wrong."""

from __future__ import annotations

import re
from typing import Any

from starlette.responses import JSONResponse

PROBLEM_TYPE = "application/problem+json"

_TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    409: "Conflict",
    413: "Content too large",
    415: "Unsupported media type",
    422: "Unprocessable content",
    503: "Service unavailable",
}

#: The place a manifest error names (``manifest.files[1].path: ...``, ``url #2: ...``).
_MANIFEST_WHERE = re.compile(r"^manifest((?:\.[a-z0-9_]+|\[\d+\])*)")
_URL_WHERE = re.compile(r"^url #(\d+)")


class Problem(Exception):
    """A refusal: its status, what went wrong (``detail``: what, which task, what to do), and
    for bad input the place of each error (``errors``: JSON pointers into the request body)."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        errors: list[dict[str, str]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.errors = errors
        self.headers = headers or {}

    def response(self, instance: str = "") -> JSONResponse:
        body: dict[str, Any] = {"type": "about:blank", "title": _TITLES.get(self.status, "Error"),
                                "status": self.status, "detail": self.detail}  # fmt: skip
        if instance:
            body["instance"] = instance
        if self.errors is not None:
            body["errors"] = self.errors
        return JSONResponse(body, status_code=self.status, headers=self.headers, media_type=PROBLEM_TYPE)


def invalid_input(message: str) -> Problem:
    """422 for a manifest (or list of URLs) that does not validate, pointing at the field."""
    return Problem(422, message, errors=[{"pointer": pointer_of(message), "detail": message}])


def pointer_of(message: str) -> str:
    """The JSON pointer of the field a validation message names ('' for the whole body)."""
    found = _MANIFEST_WHERE.match(message)
    if found:
        steps = re.findall(r"\.([a-z0-9_]+)|\[(\d+)\]", found.group(1))
        return "".join(f"/{name or index}" for name, index in steps)
    found = _URL_WHERE.match(message)
    if found:
        return f"/urls/{int(found.group(1)) - 1}"
    return ""
