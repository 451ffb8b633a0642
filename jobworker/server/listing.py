"""Listing jobs within the message limit: GetJobs answers all at once or refuses, ListJobs pages.

Both work on encoded entries: one job encoded as a one-element ``Jobs`` message. Encodings of
messages concatenate into one message whose repeated field holds every element, and ``jobs``
is field 1 of both ``Jobs`` and ``ListJobsRes``, so an answer is the join of its entries and
its size is known exactly before anything is sent.

A page token names the last id of its page and the order it was issued for, base64url-encoded
so that clients treat it as opaque. Ids are ordered and never reused: a token stays valid
however many jobs are added (or removed) between two pages, and no job is listed twice.
"""

from __future__ import annotations

import base64
import binascii
import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from purerpc.grpclib.status import StatusCode

from jobworker.engine import JobRecord, JobStatus
from jobworker.errors import RpcError, echo

DEFAULT_PAGE_SIZE = 1000  # jobs per page when the request says 0
MAX_PAGE_SIZE = 10_000  # a larger pageSize is served as this many (not an error)
# Room kept in each page for its nextPageToken field: tag, length and a token of an int64 id.
TOKEN_FIELD_BYTES = 64
_ASCENDING, _DESCENDING = "a", "d"
MAX_ID_DIGITS = 19  # an int64: more digits cannot be one of our ids

Entry = Callable[[JobRecord], bytes]


def too_many(count: int) -> RpcError:
    """GetJobs' answer for a listing that does not fit one message."""
    return RpcError(
        StatusCode.RESOURCE_EXHAUSTED,
        f"too many jobs to list in one message ({count} jobs): use ListJobs",
    )


@dataclass(frozen=True)
class PageRequest:
    """A validated ListJobsReq."""

    size: int
    after: int | None  # the last id of the previous page; None for the first page
    statuses: frozenset[JobStatus]
    newest_first: bool
    owner: str = ""  # only this CN's jobs; "" for every owner

    @classmethod
    def parse(
        cls,
        page_size: int,
        page_token: str,
        statuses: Sequence[str],
        owner: str,
        newest_first: bool,
    ) -> PageRequest:
        """Validate the fields of a ListJobsReq; raise RpcError(INVALID_ARGUMENT) naming the
        field at fault."""
        if page_size < 0:
            raise _invalid(f"pageSize must not be negative: {page_size}")
        wanted = frozenset(_status(name) for name in statuses)
        after = _decode_token(page_token, newest_first) if page_token else None
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        return cls(size=size, after=after, statuses=wanted, newest_first=newest_first, owner=owner)


def page(
    records: Sequence[JobRecord], request: PageRequest, entry: Entry, budget: int
) -> tuple[bytes, str]:
    """The encoded jobs of one page (at most ``budget`` bytes with its token) and the
    nextPageToken ("" on the last page). ``records`` are in id order.

    A single job too large for a page of its own is RESOURCE_EXHAUSTED naming it.
    """
    ids = [int(record.id) for record in records]
    if request.newest_first:
        end = len(ids) if request.after is None else bisect.bisect_left(ids, request.after)
        candidates: Sequence[JobRecord] = records[:end][::-1]
    else:
        start = 0 if request.after is None else bisect.bisect_right(ids, request.after)
        candidates = records[start:]
    parts: list[bytes] = []
    used = TOKEN_FIELD_BYTES
    last = ""
    for record in candidates:
        if request.statuses and record.status not in request.statuses:
            continue
        if request.owner and record.owner != request.owner:
            continue
        if len(parts) == request.size:
            return b"".join(parts), _encode_token(last, request.newest_first)
        encoded = entry(record)
        if used + len(encoded) > budget:
            if not parts:
                raise RpcError(
                    StatusCode.RESOURCE_EXHAUSTED,
                    f"job {record.id} is too large to list ({len(encoded)} bytes, "
                    f"limit {budget - TOKEN_FIELD_BYTES})",
                )
            return b"".join(parts), _encode_token(last, request.newest_first)
        parts.append(encoded)
        used += len(encoded)
        last = record.id
    return b"".join(parts), ""


def _status(name: str) -> JobStatus:
    try:
        return JobStatus(name.upper())
    except ValueError:
        expected = ", ".join(status.value for status in JobStatus)
        raise _invalid(f"unknown status: {echo(name)} (expected one of {expected})") from None


def _encode_token(last_id: str, newest_first: bool) -> str:
    order = _DESCENDING if newest_first else _ASCENDING
    return base64.urlsafe_b64encode(f"{order}:{last_id}".encode()).decode().rstrip("=")


def _decode_token(token: str, newest_first: bool) -> int:
    try:
        padded = token + "=" * (-len(token) % 4)
        order, _, last = base64.urlsafe_b64decode(padded.encode("ascii")).decode().partition(":")
    except (binascii.Error, UnicodeError, ValueError):
        raise _invalid("invalid page token") from None
    valid_id = last.isascii() and last.isdecimal() and len(last) <= MAX_ID_DIGITS
    if order not in (_ASCENDING, _DESCENDING) or not valid_id:
        raise _invalid("invalid page token")
    if (order == _DESCENDING) != newest_first:
        raise _invalid("invalid page token: it was issued for the other order")
    return int(last)


def _invalid(message: str) -> RpcError:
    return RpcError(StatusCode.INVALID_ARGUMENT, message)
