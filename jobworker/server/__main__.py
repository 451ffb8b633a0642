"""``python -m jobworker.server``: the same as the ``jobworker-server`` command."""

from __future__ import annotations

from jobworker.server.main import main

if __name__ == "__main__":
    main()
