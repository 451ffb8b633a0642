"""``python -m jobworker ...``: the jobworker CLI."""

from __future__ import annotations

from jobworker.cli import main

raise SystemExit(main())
