"""The web page seen from the daemon: a child process, restarted with backoff if it dies.

The web server must never share a loop (or a scheduling class) with the
heartbeats, so it runs as `python -m hasync.web.server` in its own process, like
the sync service; the daemon only starts it, restarts it and stops it.
"""

from __future__ import annotations

import sys

from hasync.child import ChildProcess
from hasync.config import NodeConfig

MAX_BACKOFF_S = 30.0  # exit 1 is "cannot listen" (address not there yet, port taken): retry slowly


class WebChild(ChildProcess):
    def __init__(self, cfg: NodeConfig):
        if cfg.path is None:
            raise ValueError("the web page needs the daemon's config file (cfg.path)")
        super().__init__("web page", [sys.executable, "-m", "hasync.web.server", "--config",
                                      str(cfg.path)], max_backoff_s=MAX_BACKOFF_S)
