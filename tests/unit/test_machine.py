"""The failover state machine, one node at a time and as a pair joined in memory."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from failover import advert as wire
from failover.actions import AddFloatingIPs, Announce, RemoveFloatingIPs, SendAdvert, Transition
from failover.machine import (
    BACKUP, DISABLED, FAULT, INIT, MASTER, STOPPED, FailoverMachine, Timing,
)
from tests.unit.pairsim import PairSim

T = Timing(interval=0.01, dead_count=3)


def machine(priority: int = 150, **kw) -> FailoverMachine:
    return FailoverMachine(hostname="fw1", priority=priority, timing=kw.pop("timing", T),
                           monitored=("wan1", "lan1"), **kw)


def peer_advert(state: str, counter: int = 1, priority: int = 100, flags: int = 0) -> wire.Advert:
    return wire.Advert(group=1, state=state, priority=priority, hostname="fw2", version="1",
                       counter=counter, path=0, flags=flags)


UP = {"wan1": True, "lan1": True}


def kinds(actions) -> list[type]:
    return [type(a) for a in actions]


# ---- one node ----------------------------------------------------------------------


def test_alone_becomes_master_after_dead_interval():
    m = machine()
    assert kinds(m.start(0.0, UP)) == [SendAdvert]
    assert m.state == INIT
    m.on_timer(0.029)
    assert m.state == INIT
    actions = m.on_timer(0.031)
    assert m.state == MASTER and m.cause == "no peer seen"
    # takeover order: tell the shell (sync first), then floating IPs, then announce
    assert kinds(actions)[:4] == [Transition, AddFloatingIPs, Announce, SendAdvert]


def test_hears_master_goes_backup_without_taking_ips():
    m = machine(priority=200)
    m.start(0.0, UP)
    actions = m.on_advert(peer_advert(MASTER), 0.001)
    assert m.state == BACKUP
    assert AddFloatingIPs() not in actions


def test_backup_takes_over_when_master_resigns_at_once():
    m = machine(priority=100)
    m.start(0.0, UP)
    m.on_advert(peer_advert(MASTER, priority=150), 0.001)
    actions = m.on_advert(peer_advert(MASTER, counter=2, priority=150, flags=wire.FLAG_RESIGN), 0.002)
    assert m.state == MASTER and "resigned" in m.cause
    assert AddFloatingIPs() in actions


def test_backup_takes_over_when_master_reports_fault():
    m = machine(priority=100)
    m.start(0.0, UP)
    m.on_advert(peer_advert(MASTER, priority=150), 0.001)
    m.on_advert(peer_advert(FAULT, counter=2, priority=0, flags=wire.FLAG_RESIGN), 0.002)
    assert m.state == MASTER


def test_backup_takes_over_after_dead_interval_not_before():
    m = machine(priority=100)
    m.start(0.0, UP)
    m.on_advert(peer_advert(MASTER, priority=150), 0.001)
    m.on_timer(0.030)
    assert m.state == BACKUP
    assert m.next_deadline() <= 0.0311
    m.on_timer(0.0312)
    assert m.state == MASTER and m.cause == "peer lost"


def test_monitored_link_down_on_master_faults_and_resigns():
    m = machine()
    m.start(0.0, UP)
    m.on_timer(0.05)
    assert m.state == MASTER
    actions = m.on_link("wan1", False, 0.06)
    assert m.state == FAULT
    assert kinds(actions)[0] is RemoveFloatingIPs  # demotion removes the IPs first
    assert any(isinstance(a, SendAdvert) and a.flags & wire.FLAG_RESIGN for a in actions)
    assert m.effective_priority() == 0
    m.on_link("wan1", True, 0.07)
    assert m.state == INIT  # decides on fresh news from the peer, or alone after the dead time
    m.on_timer(0.101)
    assert m.state == MASTER


def test_link_down_at_start_is_fault():
    m = machine()
    m.start(0.0, {"wan1": True, "lan1": False})
    assert m.state == FAULT and "lan1" in m.cause


def test_unmonitored_link_is_ignored():
    m = machine()
    m.start(0.0, UP)
    assert m.on_link("lan2", False, 0.01) == []
    assert m.state == INIT


def test_disable_releases_and_enable_restarts():
    m = machine()
    m.start(0.0, UP)
    m.on_timer(0.05)
    actions = m.set_enabled(False, 0.06)
    assert m.state == DISABLED and RemoveFloatingIPs() in actions
    assert m.wire_state() == DISABLED
    m.set_enabled(True, 0.07)
    assert m.state == INIT


def test_disabled_at_start_stays_disabled():
    m = machine(enabled=False)
    m.start(0.0, UP)
    m.on_timer(1.0)
    assert m.state == DISABLED


def test_shutdown_of_backup_is_immediate():
    m = machine(priority=100)
    m.start(0.0, UP)
    m.on_advert(peer_advert(MASTER, priority=150), 0.001)
    m.shutdown(0.002)
    assert m.state == STOPPED
    assert m.advert_flags() & wire.FLAG_SHUTDOWN


def test_master_shutdown_waits_for_peer_then_times_out():
    m = machine()
    m.start(0.0, UP)
    m.on_advert(peer_advert(BACKUP), 0.001)
    assert m.state == MASTER
    m.shutdown(0.01)
    assert m.resigning and m.state == MASTER
    m.on_timer(0.05)
    assert m.state == STOPPED


def test_switchover_refused_without_live_peer():
    m = machine()
    m.start(0.0, UP)
    m.on_timer(0.05)
    ok, message, actions = m.switchover(0.06)
    assert not ok and "peer" in message and actions == []


def test_preempt_off_keeps_lower_master():
    m = machine(priority=200, timing=Timing(interval=0.01, dead_count=3, preempt="off"))
    m.start(0.0, UP)
    for i in range(1, 100):
        m.on_advert(peer_advert(MASTER, counter=i, priority=100), i * 0.01)
        m.on_timer(i * 0.01)
    assert m.state == BACKUP and not m.takeover_requested


def test_preempt_delay_waits():
    m = machine(priority=200, timing=Timing(interval=0.01, dead_count=3, preempt="delay",
                                            preempt_delay=0.5))
    m.start(0.0, UP)
    m.on_advert(peer_advert(MASTER, priority=100), 0.001)
    for i in range(2, 40):
        m.on_advert(peer_advert(MASTER, counter=i, priority=100), i * 0.01)
        m.on_timer(i * 0.01)
    assert not m.takeover_requested
    for i in range(40, 60):
        m.on_advert(peer_advert(MASTER, counter=i, priority=100), i * 0.01)
        m.on_timer(i * 0.01)
    assert m.takeover_requested
    assert m.advert_flags() & wire.FLAG_TAKEOVER_REQ


# ---- the pair ------------------------------------------------------------------------


def test_pair_elects_the_preferred_master():
    sim = PairSim()
    sim.run_until(0.2)
    assert sim.states() == {"fw1": MASTER, "fw2": BACKUP}
    assert sim.vip_holders() == ["fw1"]


def test_pair_elects_when_backup_starts_first():
    sim = PairSim(stagger=0.0)
    sim._start_at = {"fw1": 0.5, "fw2": 0.0}
    sim.run_until(1.0)
    # fw2 took over alone, then fw1 (higher priority) preempts gracefully
    assert sim.states() == {"fw1": MASTER, "fw2": BACKUP}


def test_master_crash_backup_takes_over_within_dead_interval():
    sim = PairSim()
    sim.run_until(0.2)
    sim.crash("fw1")
    t0 = sim.now
    sim.run_until(t0 + 0.045)
    assert sim.nodes["fw2"].machine.state == MASTER
    takeover = sim.nodes["fw2"].transitions[-1]
    assert takeover.new == MASTER and takeover.cause == "peer lost"


def test_ha_link_cut_alone_never_makes_two_masters():
    sim = PairSim()
    sim.run_until(0.2)
    sim.cut.add(0)
    sim.run_until(1.0)
    assert sim.states() == {"fw1": MASTER, "fw2": BACKUP}
    assert sim.both_master_time == 0


def test_all_paths_cut_splits_then_heals_to_one_master():
    sim = PairSim()
    sim.run_until(0.2)
    sim.cut.update({0, 1, 2})
    sim.run_until(0.4)
    assert sim.states() == {"fw1": MASTER, "fw2": MASTER}  # a real split: both serve
    sim.cut.clear()
    sim.run_until(0.5)
    assert sim.states() == {"fw1": MASTER, "fw2": BACKUP}


def test_wan_down_on_master_moves_role_without_dead_wait():
    sim = PairSim()
    sim.run_until(0.2)
    sim.link("fw1", "wan1", False)
    t0 = sim.now
    sim.run_until(t0 + 0.003)  # far less than the 30 ms dead interval
    assert sim.states() == {"fw1": FAULT, "fw2": MASTER}
    sim.link("fw1", "wan1", True)
    sim.run_until(sim.now + 0.2)
    # preemption on: the preferred Master takes its role back, gracefully
    assert sim.states() == {"fw1": MASTER, "fw2": BACKUP}


def test_switchover_hands_over_and_sticks():
    sim = PairSim()
    sim.run_until(0.2)
    sim.none_master_time = 0.0
    ok, _, actions = sim.nodes["fw1"].machine.switchover(sim.now)
    assert ok
    sim._apply(sim.nodes["fw1"], actions)
    sim.run_until(sim.now + 0.005)
    assert sim.states() == {"fw1": BACKUP, "fw2": MASTER}
    assert sim.none_master_time == 0  # the old Master kept its IPs until the new one had them
    sim.run_until(sim.now + 1.0)
    assert sim.states() == {"fw1": BACKUP, "fw2": MASTER}  # no preemption back


def switched_over_to_fw2(asked_by: str = "fw1") -> PairSim:
    """A settled pair after the operator, on `asked_by`, moved the Master role to fw2."""
    sim = PairSim()
    sim.run_until(0.2)
    ok, _, actions = sim.nodes[asked_by].machine.switchover(sim.now)
    assert ok
    sim._apply(sim.nodes[asked_by], actions)
    sim.run_until(sim.now + 0.01)
    assert sim.states() == {"fw1": BACKUP, "fw2": MASTER}
    return sim


def test_a_switchover_survives_a_moment_of_silence_from_the_new_master():
    """The new Master goes quiet for longer than the dead time (a stalled machine, seen in
    CI 40 ms after a switchover): the old one takes over, and when both are heard as Master
    the operator's choice stands, whatever the priorities."""
    sim = switched_over_to_fw2()
    sim.cut.update({0, 1, 2})
    sim.run_until(sim.now + 0.05)
    assert sim.states() == {"fw1": MASTER, "fw2": MASTER}
    assert sim.nodes["fw1"].transitions[-1].cause == "peer lost"
    sim.cut.clear()
    sim.run_until(sim.now + 0.05)
    assert sim.states() == {"fw1": BACKUP, "fw2": MASTER}
    sim.run_until(sim.now + 1.0)
    assert sim.states() == {"fw1": BACKUP, "fw2": MASTER}  # and no preemption back


def test_after_a_real_loss_the_yield_ends_once_the_peer_is_heard_as_backup():
    """The yield kept through a peer-lost takeover only settles a meeting of two Masters: a
    peer that comes back as Backup ends it, so a later split heals by priority again."""
    sim = switched_over_to_fw2()
    sim.crash("fw2")
    sim.run_until(sim.now + 0.1)
    assert sim.nodes["fw1"].machine.state == MASTER and sim.nodes["fw1"].machine.yielded
    sim.restart("fw2")
    sim.run_until(sim.now + 0.3)
    assert sim.states() == {"fw1": MASTER, "fw2": BACKUP}
    assert not sim.nodes["fw1"].machine.yielded
    sim.cut.update({0, 1, 2})
    sim.run_until(sim.now + 0.1)
    sim.cut.clear()
    sim.run_until(sim.now + 0.1)
    assert sim.states() == {"fw1": MASTER, "fw2": BACKUP}


def test_switchover_requested_from_backup():
    switched_over_to_fw2(asked_by="fw2")  # asserts the hand-over


def test_restarted_master_preempts_back():
    sim = PairSim()
    sim.run_until(0.2)
    sim.crash("fw1")
    sim.run_until(0.3)
    sim.restart("fw1")
    sim.run_until(0.6)
    assert sim.states() == {"fw1": MASTER, "fw2": BACKUP}


@pytest.mark.parametrize("prio_b", [100, 150, 200])
def test_equal_or_higher_backup_priority_is_deterministic(prio_b):
    sim = PairSim(prio_b=prio_b)
    sim.run_until(0.3)
    masters = [n for n, s in sim.states().items() if s == MASTER]
    assert len(masters) == 1
    expected = "fw2" if prio_b > 150 else "fw1"
    assert masters == [expected]


# ---- property: whatever happens, once things are quiet there is exactly one Master ----

fault = st.one_of(
    st.tuples(st.just("cut"), st.integers(0, 2)),
    st.tuples(st.just("heal"), st.integers(0, 2)),
    st.tuples(st.just("link"), st.sampled_from(["fw1", "fw2"]), st.sampled_from(["wan1", "lan1"]),
              st.booleans()),
    st.tuples(st.just("crash"), st.sampled_from(["fw1", "fw2"])),
    st.tuples(st.just("restart"), st.sampled_from(["fw1", "fw2"])),
    st.tuples(st.just("switchover"), st.sampled_from(["fw1", "fw2"])),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(fault, st.floats(0.001, 0.08)), max_size=12),
       st.integers(90, 210))
def test_converges_to_exactly_one_master(events, prio_b):
    sim = PairSim(prio_b=prio_b)
    sim.run_until(0.15)
    for ev, wait in events:
        kind = ev[0]
        if kind == "cut":
            sim.cut.add(ev[1])
        elif kind == "heal":
            sim.cut.discard(ev[1])
        elif kind == "link":
            sim.link(ev[1], ev[2], ev[3])
        elif kind == "crash":
            sim.crash(ev[1])
        elif kind == "restart" and sim.nodes[ev[1]].crashed:
            sim.restart(ev[1])
        elif kind == "switchover" and not sim.nodes[ev[1]].crashed:
            _, _, actions = sim.nodes[ev[1]].machine.switchover(sim.now)
            sim._apply(sim.nodes[ev[1]], actions)
        sim.run_until(sim.now + wait)
    # quiet: heal everything that is not a crash, and wait
    sim.cut.clear()
    for name in ("fw1", "fw2"):
        for ifname in ("wan1", "lan1"):
            if ifname in sim.links_down[name]:
                sim.link(name, ifname, True)
    sim.run_until(sim.now + 0.3)
    alive = [n for n, node in sim.nodes.items() if not node.crashed]
    masters = [n for n in alive if sim.nodes[n].machine.state == MASTER]
    if alive:
        assert len(masters) == 1, sim.states()
        assert sim.vip_holders() == masters
    for n in alive:
        assert sim.nodes[n].machine.state in (MASTER, BACKUP)


def test_no_preemption_before_the_state_is_in():
    m = machine(priority=200)
    m.state_ready = False
    m.start(0.0, UP)
    for i in range(1, 30):
        m.on_advert(peer_advert(MASTER, counter=i, priority=100), i * 0.01)
        m.on_timer(i * 0.01)
    assert m.state == BACKUP and not m.takeover_requested
    m.state_ready = True
    m.on_advert(peer_advert(MASTER, counter=31, priority=100), 0.31)
    m.on_timer(0.31)
    assert m.takeover_requested


def test_switchover_refused_while_the_peer_is_not_in_sync():
    m = machine()
    m.start(0.0, UP)
    m.on_advert(peer_advert(BACKUP), 0.001)  # a Backup whose table is still resyncing
    assert m.state == MASTER
    ok, message, actions = m.switchover(0.002)
    assert not ok and "not in sync" in message and actions == []
    m.on_advert(peer_advert(BACKUP, counter=2, flags=wire.FLAG_STATE_READY), 0.003)
    ok, _, actions = m.switchover(0.004)
    assert ok and m.resigning


def test_takeover_request_ignored_from_an_unsynced_peer():
    m = machine()
    m.start(0.0, UP)
    m.on_advert(peer_advert(BACKUP), 0.001)
    m.on_advert(peer_advert(BACKUP, counter=2, flags=wire.FLAG_TAKEOVER_REQ), 0.002)
    assert not m.resigning
    m.on_advert(peer_advert(BACKUP, counter=3,
                           flags=wire.FLAG_TAKEOVER_REQ | wire.FLAG_STATE_READY), 0.003)
    assert m.resigning


def test_a_local_stall_is_not_held_against_the_peer():
    m = machine(priority=100)
    m.start(0.0, UP)
    m.on_advert(peer_advert(MASTER, priority=150), 0.010)
    # frozen from 0.012 to 0.112: the dead time (30 ms) passed while we could not listen
    m.on_stall(0.100, 0.112)
    m.on_timer(0.112)
    assert m.state == BACKUP
    m.on_timer(0.141)  # but real silence after the stall still counts
    assert m.state == MASTER and m.cause == "peer lost"


def test_after_a_split_the_node_without_state_yields_whatever_its_priority():
    m = machine(priority=200)  # the preferred Master, just restarted: its table is empty
    m.state_ready = False
    m.start(0.0, UP)
    m.on_timer(0.05)  # heard nobody: takes over alone
    assert m.state == MASTER
    m.on_advert(peer_advert(MASTER, priority=100, flags=wire.FLAG_STATE_READY), 0.06)
    assert m.state == BACKUP  # the peer carries the sessions: it keeps the role
