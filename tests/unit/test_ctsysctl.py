"""nf_conntrack_events: set to 1 (every entry reports its changes), or a clear problem."""

from statesync import ctsysctl


def test_autodetect_becomes_always(tmp_path):
    path = tmp_path / "nf_conntrack_events"
    path.write_text("2\n")
    assert ctsysctl.ensure_events(str(path)) is None
    assert path.read_text() == "1\n"


def test_already_always_is_left_alone(tmp_path):
    path = tmp_path / "nf_conntrack_events"
    path.write_text("1")  # a write would leave "1\n"
    assert ctsysctl.ensure_events(str(path)) is None
    assert path.read_text() == "1"


def test_unreadable_is_a_problem(tmp_path):
    assert "cannot read" in ctsysctl.ensure_events(str(tmp_path / "absent"))
    garbage = tmp_path / "garbage"
    garbage.write_text("yes\n")
    assert "cannot read" in ctsysctl.ensure_events(str(garbage))


def test_unwritable_is_a_problem_that_names_the_setting():
    # a read-only sysctl holding one number: refused even to root, like a read-only /proc/sys
    path = "/proc/sys/kernel/ngroups_max"
    with open(path) as f:
        value = int(f.read())
    problem = ctsysctl.ensure_events(path)
    assert problem and problem.startswith(f"nf_conntrack_events is {value} and cannot be set to 1")
