"""``POST /v1/rain/feedback``: the request body, validated (a 400 naming the field otherwise)."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import bad_request
from .fields import number_field, text_field
from .limits import MAX_COMMENT_CHARS

MAX_FEEDBACK_ABS = 1e6


@dataclass(frozen=True)
class FeedbackRequest:
    """``POST /v1/rain/feedback``."""

    request_id: str
    score: float
    comment: str | None = None


def parse_feedback(body: dict) -> FeedbackRequest:
    """A validated feedback record."""
    rid = body.get("request_id")
    if not isinstance(rid, str) or not rid:
        raise bad_request("request_id must be a non-empty string", "request_id", code="missing_required_parameter")
    if len(rid) > 200:
        raise bad_request("request_id is too long", "request_id")
    score = number_field(body, "score", None, -MAX_FEEDBACK_ABS, MAX_FEEDBACK_ABS)
    if score is None:
        raise bad_request("score must be a number", "score", code="missing_required_parameter")
    comment = text_field(body, "comment", MAX_COMMENT_CHARS)
    return FeedbackRequest(request_id=rid, score=score, comment=comment)


__all__ = ["FeedbackRequest", "MAX_FEEDBACK_ABS", "parse_feedback"]
