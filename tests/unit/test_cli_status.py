"""`hasync status` as text: the sync lines an operator reads after a takeover."""

from hasync.cli import render_status

SYNC = {"connected": True, "entries_applied": 5, "entries_sent": 0, "lag_ms": 0.0, "last_resync": None}


def status(**sync):
    return {"icon": "green", "role": "Master", "hostname": "fw2", "state": "MASTER", "group": 1,
            "sync": {**SYNC, **sync}}


def test_a_cache_mode_takeover_shows_what_its_commit_cost():
    text = render_status(status(last_commit={"at": 0, "entries": 200004, "ms": 4245.5, "frame_ms": 610.0}))
    assert "sync cache: 200004 entries committed at the last takeover in 4245.5 ms" in text


def test_kernel_mode_has_no_commit_line():
    assert "sync cache" not in render_status(status(last_commit=None))
    assert "sync: connected, 5 applied" in render_status(status())
