"""Client-supplied text in log lines: one log line stays one line, short, and free of
terminal escapes.

Job ids, commands and arguments come from clients, certificate names from whoever the CA
signed: written raw, a newline would end the line and start a forged one, and an ANSI escape
would reach the terminal of whoever reads the log. Plain values are written as they are;
anything else is JSON-quoted (every control character and non-ASCII escaped) and clipped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

FIELD_CHARS = 64  # a quoted field (an id, a name) keeps this many characters
WORDS_CHARS = 200  # a quoted command line keeps this many characters of its JSON form
_PLAIN = re.compile(r"[A-Za-z0-9._@:+-]{1,64}")


def field(text: str, limit: int = FIELD_CHARS) -> str:
    """``text`` as it is if plain, else JSON-quoted and clipped to ``limit`` characters."""
    if len(text) <= limit and _PLAIN.fullmatch(text):
        return text
    return json.dumps(text[:limit]) + ("..." if len(text) > limit else "")


def words(items: Sequence[str], limit: int = WORDS_CHARS) -> str:
    """A command line as a JSON array of its words, clipped to about ``limit`` characters
    (the count of words is then added). Only what can show is encoded: a megabyte of
    arguments costs no more than a short command line."""
    parts: list[str] = []
    used = 0
    for item in items:
        parts.append(json.dumps(item[: limit + 1]))  # a longer word is clipped anyway
        used += len(parts[-1]) + 2
        if used > limit:
            break
    text = "[" + ", ".join(parts) + "]"
    if len(text) <= limit and len(parts) == len(items):
        return text
    return f"{text[:limit]}... ({len(items)} words)"
