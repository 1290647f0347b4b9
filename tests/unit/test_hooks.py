"""HookRunner: order under bursts, environment, timeouts kill the whole group, failures counted."""

from __future__ import annotations

import json
import sys
import time

import pytest

from failover.hooks import HOOK_VARIABLES, HookRunner, transition_env


def _runner(commands, timeout_s=10.0):
    messages: list[str] = []
    return HookRunner(commands, timeout_s, messages.append), messages


def _script(tmp_path, name, body):
    path = tmp_path / name
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(0o755)
    return str(path)


def test_burst_of_transitions_runs_in_order_one_at_a_time(tmp_path):
    journal = tmp_path / "journal"
    lock = tmp_path / "running"
    # each hook claims a lock directory (mkdir is atomic): an overlap with another hook fails it
    hook = tmp_path / "hook.sh"
    hook.write_text(f"""#!/bin/sh
mkdir {lock} || exit 1
echo "$HASYNC_STATE $HOOK_ID" >> {journal}
rmdir {lock}
""")
    hook.chmod(0o755)
    runner, messages = _runner([f"{hook}", f"{hook} second"])
    for n in range(50):
        env = transition_env(f"S{n}", f"S{n - 1}", "test", 1, ())
        env["HOOK_ID"] = str(n)
        runner.notify(env)
    assert runner.close(wait_s=120)
    lines = journal.read_text().splitlines()
    expected = [f"S{n} {n}" for n in range(50) for _ in range(2)]
    assert lines == expected
    assert runner.runs == 100 and runner.failures == 0 and runner.timeouts == 0
    assert all("ok" in m for m in messages), messages


def test_every_hook_variable_is_set_and_caller_values_pass_through(tmp_path):
    out = tmp_path / "env"
    hook = _script(tmp_path, "env.py", f"""
import json, os
json.dump({{k: v for k, v in os.environ.items() if k.startswith(("HASYNC_", "EXTRA"))}}, open({str(out)!r}, "w"))
""")
    runner, _ = _runner([hook])
    runner.notify({"HASYNC_STATE": "MASTER", "EXTRA": "x y"})
    assert runner.close(wait_s=30)
    seen = json.loads(out.read_text())
    assert set(HOOK_VARIABLES) <= set(seen)
    assert seen["HASYNC_STATE"] == "MASTER" and seen["HASYNC_CAUSE"] == "" and seen["EXTRA"] == "x y"


def test_transition_env_formats_floating_ips():
    env = transition_env("MASTER", "BACKUP", "peer-lost", 7, ["192.0.2.1/24", "2001:db8::1/64"])
    assert env == {
        "HASYNC_STATE": "MASTER", "HASYNC_OLD_STATE": "BACKUP", "HASYNC_CAUSE": "peer-lost",
        "HASYNC_GROUP": "7", "HASYNC_FLOATING_IPS": "192.0.2.1/24 2001:db8::1/64",
    }


def test_timeout_kills_the_hook_and_its_children(tmp_path):
    pidfile = tmp_path / "child.pid"
    after = tmp_path / "after"
    # the hook starts a grandchild then sleeps; both must die at the timeout
    hook = _script(tmp_path, "slow.py", f"""
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
open({str(pidfile)!r}, "w").write(str(child.pid))
time.sleep(60)
""")
    marker = _script(tmp_path, "after.py", f"open({str(after)!r}, 'w').write('ran')")
    runner, messages = _runner([hook, marker], timeout_s=0.5)
    runner.notify(transition_env("FAULT", "MASTER", "link", 1))
    assert runner.close(wait_s=30)
    assert runner.timeouts == 1 and runner.failures == 1 and runner.runs == 2
    assert any("timeout" in m for m in messages), messages
    assert after.read_text() == "ran"  # the next hook still runs after a timeout
    grandchild = int(pidfile.read_text())
    deadline = time.monotonic() + 10
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_failures_are_counted_and_logged_with_stderr(tmp_path):
    bad = _script(tmp_path, "bad.py", "import sys; sys.stderr.write('boom\\n'); sys.exit(3)")
    runner, messages = _runner([bad, str(tmp_path / "missing-command"), "true"])
    runner.notify(transition_env("BACKUP", "INIT", "start", 1))
    assert runner.close(wait_s=30)
    assert runner.runs == 3 and runner.failures == 2 and runner.timeouts == 0
    assert any("exit status 3" in m and "boom" in m for m in messages), messages
    assert any("could not start" in m for m in messages), messages


def test_commands_are_split_with_shlex_not_a_shell(tmp_path):
    out = tmp_path / "args"
    hook = _script(tmp_path, "args.py", f"import sys, json; json.dump(sys.argv[1:], open({str(out)!r}, 'w'))")
    runner, _ = _runner([f"{hook} 'a b' '$HOME' ';' c"])
    runner.notify(transition_env("MASTER", "BACKUP", "x", 1))
    assert runner.close(wait_s=30)
    assert json.loads(out.read_text()) == ["a b", "$HOME", ";", "c"]


def test_close_gives_up_after_wait_and_kills_the_running_hook(tmp_path):
    hook = _script(tmp_path, "hang.py", "import time; time.sleep(60)")
    runner, _ = _runner([hook], timeout_s=60)
    for _ in range(3):
        runner.notify(transition_env("MASTER", "BACKUP", "x", 1))
    started = time.monotonic()
    assert runner.close(wait_s=0.5) is False
    assert time.monotonic() - started < 30  # not the hook's 60 s: it was killed
    assert runner.runs == 1 and runner.dropped == 2


def test_notify_never_blocks_even_with_a_stuck_hook(tmp_path):
    hook = _script(tmp_path, "hang.py", "import time; time.sleep(60)")
    runner, messages = _runner([hook], timeout_s=60)
    try:
        from failover import hooks
        for _ in range(hooks.MAX_PENDING + 5):
            runner.notify(transition_env("MASTER", "BACKUP", "x", 1))
        assert runner.dropped >= 4
        assert any("queue full" in m for m in messages)
    finally:
        runner.close(wait_s=0.1)


def test_bad_quoting_is_refused_at_start():
    with pytest.raises(ValueError):
        HookRunner(["echo 'unterminated"], 1.0, print)
