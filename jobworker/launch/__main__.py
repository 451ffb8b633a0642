"""``python -m jobworker.launch FD``: the launcher process (started by the server)."""

from __future__ import annotations

import sys

from jobworker.launch.process import main

sys.exit(main(sys.argv))
