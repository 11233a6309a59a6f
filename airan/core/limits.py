"""Bounds on everything a caller sends: one table, checked before any work is done.

Every string and list field of every RPC's request has a bound here (tests walk the
proto descriptors to keep it so), and the README's "Bounds" table is this table.
A request past a bound is refused with INVALID_ARGUMENT naming the field, its size
and the bound, before anything is stored, echoed, tokenised or routed; the gRPC
server's max receive size (server.max_receive_message_bytes) refuses, before
parsing, any request larger than one within all of these bounds can be.

Plain data and plain checks (no protobuf, no gRPC): airan/serving/api/convert.py
reads the proto fields and calls these.
"""
from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Mapping, Sized
from dataclasses import dataclass

from airan.config import LimitsConfig
from airan.errors import invalid

# identifiers are echoed in metadata and logs and looked up in tables: short, no control characters
ID_MAX_CHARS = 128
SITE_ID_MAX_CHARS = 63  # as configured sites' ids (airan/config.py SiteConfig.id)
CELL_ID_MAX_CHARS = 64
MODEL_MAX_CHARS = 128
KPI_NAME_MAX_CHARS = 64
KPI_UNIT_MAX_CHARS = 32
EVENT_MAX_CHARS = 256
MAX_SITE_IDS = 64
MAX_CELL_IDS = 256
MAX_RECENT_EVENTS = 64
MAX_RAN_LOADS = 1024  # one ReportRanLoad batch
# google.protobuf.Timestamp's valid range: 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59.999999999Z
TIMESTAMP_MIN_S = -62_135_596_800
TIMESTAMP_MAX_S = 253_402_300_799

# A request id is an idempotency key and a gRPC metadata value: printable ASCII, no spaces.
_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,%d}" % ID_MAX_CHARS)


@dataclass(frozen=True)
class Bound:
    """One documented bound: `field` as the proto names it (`[]` marks each element of a list)."""

    field: str
    limit: str  # what is allowed, for people ("<= 128 characters")
    setting: str = ""  # the config key that sets it; "" = fixed by the API
    status: str = "INVALID_ARGUMENT"  # what a caller past the bound gets

    def row(self) -> str:
        where = f" (`{self.setting}`)" if self.setting else ""
        return f"| `{self.field}` | {self.limit}{where} | {self.status} |"


def bounds(limits: LimitsConfig) -> list[Bound]:
    """Every request field's bound, in proto order (the README's table; tests check it covers
    every string and repeated field of every request message)."""
    chars = lambda n: f"<= {n} characters"  # noqa: E731
    items = lambda n: f"<= {n} items"  # noqa: E731
    ident = lambda n: f"<= {n} characters, no control characters"  # noqa: E731
    timestamp = "a valid Timestamp (years 1-9999, nanos 0-999,999,999)"
    return [
        Bound("AskRequest.controller_id", ident(ID_MAX_CHARS)),
        Bound("AskRequest.site_ids", items(MAX_SITE_IDS)),
        Bound("AskRequest.site_ids[]", ident(SITE_ID_MAX_CHARS) + "; unknown: NOT_FOUND"),
        Bound("AskRequest.cell_ids", items(MAX_CELL_IDS)),
        Bound("AskRequest.cell_ids[]", ident(CELL_ID_MAX_CHARS)),
        Bound("AskRequest.question", f"1 to {limits.max_question_chars} characters (not blank)",
              "limits.max_question_chars"),  # fmt: skip
        Bound("AskRequest.kpi_context", items(limits.max_kpi_samples), "limits.max_kpi_samples"),
        Bound("AskRequest.kpi_context[].name", f"1 to {KPI_NAME_MAX_CHARS} characters, no control characters"),
        Bound("AskRequest.kpi_context[].unit", ident(KPI_UNIT_MAX_CHARS)),
        Bound("AskRequest.kpi_context[].cell_id", ident(CELL_ID_MAX_CHARS)),
        Bound("AskRequest.kpi_context[].value", "any double; NaN or infinite reads as not reported", status="none"),
        Bound("AskRequest.kpi_context[].time", timestamp),
        Bound("AskRequest.priority", "a PriorityClass value (0-3)"),
        Bound("AskRequest.max_tokens", f"<= {limits.max_tokens_limit} (0 = the default)", "limits.max_tokens_limit"),
        Bound("AskRequest.temperature", f"0 to {limits.max_temperature}, finite", "limits.max_temperature"),
        Bound("AskRequest.request_id", f"empty, or 1 to {ID_MAX_CHARS} printable ASCII characters, no spaces"),
        Bound("AskRequest.deadline", timestamp + "; already passed: DEADLINE_EXCEEDED"),
        Bound("AskRequest.response_mode", "a ResponseMode value (0-1)"),
        Bound("AskRequest.model", ident(MODEL_MAX_CHARS) + "; unknown: NOT_FOUND"),
        Bound("AskRequest.recent_events", items(MAX_RECENT_EVENTS)),
        Bound("AskRequest.recent_events[]", chars(EVENT_MAX_CHARS)),
        Bound("ListReplicasRequest.site_id", ident(SITE_ID_MAX_CHARS) + "; unknown: NOT_FOUND"),
        Bound("DrainSiteRequest.site_id", f"1 to {SITE_ID_MAX_CHARS} characters, no control characters; "
              "unknown: NOT_FOUND"),  # fmt: skip
        Bound("ReportRanLoadRequest.loads", f"<= {MAX_RAN_LOADS} items; a batch is applied whole or not at all"),
        Bound("ReportRanLoadRequest.loads[].site_id", f"1 to {SITE_ID_MAX_CHARS} characters, no control "
              "characters; unknown: NOT_FOUND"),  # fmt: skip
        Bound("ReportRanLoadRequest.loads[].ran_compute_share", "0 to 1, finite"),
        Bound("ReportRanLoadRequest.loads[].time", timestamp),
        Bound("metadata x-request-id", f"1 to {ID_MAX_CHARS} printable ASCII characters, no spaces",
              status="none: ignored, the call gets a fresh id"),  # fmt: skip
    ]


# -- checks (each raises AiranError INVALID_ARGUMENT naming the field, its size and the bound) ----------
def _preview(value: str) -> str:
    return repr(value[:40]) + ("..." if len(value) > 40 else "")


def valid_request_id(request_id: str) -> bool:
    return bool(_REQUEST_ID.fullmatch(request_id))


def check_request_id(field: str, value: str) -> None:
    """Empty (none given) or a valid request id."""
    if value and not valid_request_id(value):
        raise invalid(
            f"{field} must be 1-{ID_MAX_CHARS} printable ASCII characters without spaces "
            f"(got {len(value)} characters: {_preview(value)}); leave it empty for a one-off query"
        )


def check_items(field: str, values: Sized, max_items: int, hint: str = "") -> None:
    if len(values) > max_items:
        raise invalid(f"{field} has {len(values)} items; the bound is {max_items}" + (f": {hint}" if hint else ""))


def check_text(field: str, value: str, max_chars: int, *, required: bool = False, identifier: bool = False) -> None:
    """Length in characters; `identifier`: no control characters either (ids reach logs and prompts)."""
    if len(value) > max_chars:
        raise invalid(f"{field} is {len(value)} characters ({_preview(value)}); the bound is {max_chars}")
    if required and not value.strip():
        raise invalid(f"{field} is empty")
    if identifier and not value.isprintable() and any(unicodedata.category(c) == "Cc" for c in value):
        raise invalid(f"{field} has control characters ({_preview(value)}): use printable text")


def check_enum(field: str, value: int, names: Mapping[int, str]) -> None:
    if value not in names:
        known = ", ".join(f"{n} ({v})" for v, n in sorted(names.items()))
        raise invalid(f"{field} {value} is not a known value; use one of {known}")


def check_timestamp(field: str, seconds: int, nanos: int) -> None:
    if not (TIMESTAMP_MIN_S <= seconds <= TIMESTAMP_MAX_S and 0 <= nanos <= 999_999_999):
        raise invalid(
            f"{field} is not a valid Timestamp (seconds {seconds}, nanos {nanos}): seconds must be within "
            f"[{TIMESTAMP_MIN_S}, {TIMESTAMP_MAX_S}] (years 1-9999) and nanos within [0, 999999999]"
        )


def check_number(field: str, value: float, low: float, high: float, hint: str = "") -> None:
    if not (math.isfinite(value) and low <= value <= high):
        raise invalid(f"{field} must be between {low} and {high}, got {value}" + (f" ({hint})" if hint else ""))


def check_share(field: str, value: float) -> None:
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise invalid(f"{field} must be within [0, 1], got {value}")
