"""`hasync status` as text: the sync lines an operator reads after a takeover."""

import time

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


def test_the_state_table_line_says_what_a_takeover_costs():
    table = {"entries": 1200, "seeded": True, "backup_copy": True, "snapshots": 3, "completed": 0}
    master = render_status(status(role="master", dumps=1, table=table))
    assert "sync table: 1200 entries, resyncs served from it; conntrack dumps so far: 1" in master
    backup = render_status(status(role="backup", table=table))
    assert "sync table: a copy of 1200 entries, which a takeover adopts without a dump" in backup
    no_copy = render_status(status(role="backup", table={**table, "entries": 0, "backup_copy": False}))
    assert "no copy kept (sync.backup_copy = false): a takeover dumps" in no_copy
    assert "sync table" not in render_status(status())  # a sync service too old to report one


def test_the_last_resync_reads_as_an_age():
    assert "last resync never" in render_status(status())
    text = render_status(status(last_resync={"at": time.time() - 42, "id": 3, "entries": 204}))
    assert ("last resync 42 s ago (204 entries)" in text  # 43 if this machine stalled half a second
            or "last resync 43 s ago (204 entries)" in text), text
