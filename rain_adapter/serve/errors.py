"""API errors as vLLM sends them: ``{"error": {"message", "type", "param", "code", "rain_code"}}`` with a
4xx/5xx status.

``code`` is the HTTP status as an int (vLLM's ``ErrorInfo.code``; OpenAI sends a string or null there);
the machine-readable reason this server gives (``context_length_exceeded``, ``invalid_value``, …) is in
``rain_code``. :attr:`APIError.code` is that reason.
"""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """An error the server answers with ``status`` and an OpenAI-style JSON body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status,
                          "rain_code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)
