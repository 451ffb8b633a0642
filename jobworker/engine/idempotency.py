"""Idempotent creates: which job each recent request id (idempotency key) started.

A key is the pair (owner, request id): two clients that happen to pick the same request id
have two keys. A key is bound to a job from the moment the job has an id (its record
carries the request id and the time it was used, so the binding survives a restart) until
the key is older than the window (REQUEST_ID_TTL_S) or the job is deleted. A create whose
key is bound returns that job instead of starting another.

While a create with a key is under way (checks, then the spawn), every other create with
that key waits for it (``claim``), then finds the job it made, or, if it made none (the
request was refused), makes its own: a refused create does not use up its key.

Plain bookkeeping on the event loop, no I/O: the records are the durable copy.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import trio

from jobworker.engine.model import JobRecord, utc_now
from jobworker.errors import InvalidJobSpec

__all__ = [
    "MAX_REQUEST_ID_CHARS",
    "REQUEST_ID_TTL_S",
    "RequestIds",
    "check_request_id",
]

# The API promises that a key is remembered for 24 h after the create that used it: longer
# than any client retries, short enough that the index stays small.
REQUEST_ID_TTL_S = 24 * 60 * 60
# Room for a UUID in any spelling, or a client's own structured key; the server echoes it in
# no message, but stores it in every record that has one.
MAX_REQUEST_ID_CHARS = 128
PRINTABLE_ASCII = range(0x20, 0x7F)  # space to tilde: what fits any header, log or terminal

Key = tuple[str, str]  # (owner, request id)


def check_request_id(request_id: str) -> None:
    """Raise InvalidJobSpec (``requestId ...``) unless ``request_id`` is at most
    MAX_REQUEST_ID_CHARS characters of printable ASCII. The empty id (no key) passes."""
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidJobSpec(
            f"requestId must be at most {MAX_REQUEST_ID_CHARS} characters, got {len(request_id)}"
        )
    for position, char in enumerate(request_id, start=1):
        if ord(char) not in PRINTABLE_ASCII:
            raise InvalidJobSpec(
                f"requestId must be printable ASCII: character {position} is U+{ord(char):04X}"
            )


class RequestIds:
    """The keys of the last ``ttl_s`` seconds (wall clock: a key's time is stored in its
    job's record and compared after a restart), each with the id of the job it started."""

    def __init__(self, ttl_s: float = REQUEST_ID_TTL_S) -> None:
        self._ttl = dt.timedelta(seconds=ttl_s)
        # In the order the keys were bound, which is (nearly) their time order: expired keys
        # are dropped from the front as new ones come (``bind``), at no cost per lookup.
        self._bound: dict[Key, tuple[str, dt.datetime]] = {}
        self._busy: dict[Key, trio.Event] = {}  # keys whose create is under way

    def _expired(self, used: dt.datetime, now: dt.datetime) -> bool:
        return now - used >= self._ttl

    def bind(self, record: JobRecord) -> None:
        """Bind the job's key (if it has one in the window) to it; drop expired keys."""
        now = utc_now()
        while self._bound:
            oldest = next(iter(self._bound))
            if not self._expired(self._bound[oldest][1], now):
                break
            del self._bound[oldest]
        if not record.request_id or record.request_time is None:
            return
        if self._expired(record.request_time, now):
            return
        key = (record.owner, record.request_id)
        self._bound.pop(key, None)  # a rebind goes to the back, in time order
        self._bound[key] = (record.id, record.request_time)

    def forget(self, record: JobRecord) -> None:
        """Unbind the job's key (the job is deleted, or was never made after all)."""
        key = (record.owner, record.request_id)
        found = self._bound.get(key)
        if found is not None and found[0] == record.id:
            del self._bound[key]

    def _find(self, key: Key, known: Callable[[str], bool]) -> str | None:
        """The id of the job this key started within the window, None if none (or if that
        job is no longer ``known``: gone by a way that did not unbind it)."""
        found = self._bound.get(key)
        if found is None:
            return None
        job_id, used = found
        if self._expired(used, utc_now()) or not known(job_id):
            del self._bound[key]
            return None
        return job_id

    @asynccontextmanager
    async def claim(
        self, owner: str, request_id: str, known: Callable[[str], bool]
    ) -> AsyncIterator[str | None]:
        """Wait until no other create with this key is under way; then yield the id of the
        job the key is bound to (one that is ``known``), or None: the caller then holds the
        key (others wait) until it leaves the block, and binds it to the job it makes, if
        any. Cancellation while waiting leaves nothing held."""
        key = (owner, request_id)
        while (busy := self._busy.get(key)) is not None:
            await busy.wait()
        job_id = self._find(key, known)
        if job_id is not None:
            yield job_id
            return
        done = trio.Event()
        self._busy[key] = done
        try:
            yield None
        finally:
            del self._busy[key]
            done.set()
