"""The two kinds of failure an engine reports, free of gRPC.

`ItemFailure` is one item's problem: its neighbours in the batch carry on and the reply holds an
ItemError for it. `RequestInvalid` is the whole request's problem: the servicer answers
INVALID_ARGUMENT with its message, which names the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class ErrorCode(StrEnum):
    """Mirrors speechrl.v1.ItemErrorCode (without the prefix), so engines need no proto import."""

    INVALID_AUDIO = "INVALID_AUDIO"
    EMPTY_AUDIO = "EMPTY_AUDIO"
    NON_FINITE_AUDIO = "NON_FINITE_AUDIO"
    AUDIO_TOO_LONG = "AUDIO_TOO_LONG"
    EMPTY_TEXT = "EMPTY_TEXT"
    UNKNOWN_SPEAKER = "UNKNOWN_SPEAKER"
    INVALID_TENSOR = "INVALID_TENSOR"
    TEXT_TOO_LONG = "TEXT_TOO_LONG"
    INTERNAL = "INTERNAL"


@dataclass
class ItemFailure(Exception):
    """One item could not be processed. Returned (not raised) in an engine's result list."""

    code: ErrorCode
    message: str
    field: str = ""

    def __str__(self) -> str:
        return f"{self.code.value}: {self.message}" + (f" ({self.field})" if self.field else "")

    def at(self, field: str) -> ItemFailure:
        """The same failure located at a request field, e.g. items[3].audio."""
        return ItemFailure(self.code, self.message, field + (f".{self.field}" if self.field else ""))


class RequestInvalid(ValueError):
    """A malformed request as a whole (no items, unset required enum, too many items)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class StaleFence(Exception):
    """State pushed under an older GPU-lease grant than the last accepted one: its holder lost the lease
    and someone newer has written since (Kleppmann's fencing tokens). The servicer answers
    FAILED_PRECONDITION with error code STALE_FENCE."""

    def __init__(self, what: str, fence: int, accepted: int):
        super().__init__(f"{what}: stale fencing token {fence}; the last accepted {what} carried {accepted}, "
                         "so the pusher's lease lapsed and a newer holder has written since")
        self.fence = fence
        self.accepted = accepted
