"""statesync.table: the Master's per-key state, completed updates, snapshots and seeding."""

import socket

from hypothesis import given, settings
from hypothesis import strategies as st

from statesync import ctbuild as cb
from statesync import ctmsg
from statesync.ctconst import EV_DESTROY, EV_NEW, EV_UPDATE, TCP_CONNTRACK_FIN_WAIT
from statesync.table import SNAPSHOT_CHUNK, StateTable, complete

T = cb.Tuple(6, "198.18.0.1", "198.19.0.1", 1000, 80)


def change(kind, attrs, family=socket.AF_INET, portid=0):
    return (kind, family, ctmsg.key_of(attrs), attrs, portid)


def test_a_mark_only_update_keeps_the_tcp_state():
    _, new = cb.encode_entry(T)  # ESTABLISHED, with protoinfo
    _, mark_only = cb.encode_entry(T, mark=7, tcp_state=None)  # what IPCT_MARK alone sends
    table = StateTable()
    table.on_changes([change(EV_NEW, new)])
    out = table.on_changes([change(EV_UPDATE, mark_only)])
    got = ctmsg.decode_entry(socket.AF_INET, out[0][3])
    assert got["mark"] == 7
    assert got["protoinfo"]["tcp"]["state"] == ctmsg.decode_entry(socket.AF_INET, new)["protoinfo"]["tcp"]["state"]
    assert table.entries[ctmsg.key_of(new)][3] == out[0][3]
    assert out[0][4] == 0 and table.completed == 1


def test_an_update_with_its_own_protoinfo_replaces_the_old_one():
    _, new = cb.encode_entry(T)
    _, fin = cb.encode_entry(T, tcp_state=TCP_CONNTRACK_FIN_WAIT)
    table = StateTable()
    table.on_changes([change(EV_NEW, new)])
    out = table.on_changes([change(EV_UPDATE, fin)])
    assert out[0][3] is fin and table.completed == 0


def test_a_new_entry_in_the_same_batch_as_its_update_is_completed():
    _, new = cb.encode_entry(T)
    _, mark_only = cb.encode_entry(T, mark=7, tcp_state=None)
    table = StateTable()
    out = table.on_changes([change(EV_NEW, new), change(EV_UPDATE, mark_only)])
    assert "protoinfo" in ctmsg.decode_entry(socket.AF_INET, out[1][3])


def test_complete_aligns_what_it_appends():
    _, old = cb.encode_entry(T)
    _, new = cb.encode_entry(T, tcp_state=None)
    tail = (5).to_bytes(2, "little") + (30).to_bytes(2, "little") + b"\x01"  # a u8, unpadded
    got = complete(old, new + tail)  # (not what the kernel sends, but legal bytes)
    assert [t for t, *_ in ctmsg.iter_attrs(got)][-2:] == [30, ctmsg.CTA_PROTOINFO]


def test_complete_leaves_malformed_bytes_alone():
    _, old = cb.encode_entry(T)
    assert complete(old, b"\xff\xff\x01\x00") == b"\xff\xff\x01\x00"


ops = st.lists(st.tuples(st.sampled_from(["new", "update", "mark", "destroy"]), st.integers(0, 5)),
               max_size=40)


@settings(max_examples=200)
@given(ops, st.integers(1, 7))
def test_table_matches_a_model_of_the_kernel(script, batch):
    """Whatever the batching, the table ends as the kernel would be: each live entry with its
    latest mark and its latest TCP state."""
    table = StateTable()
    model = {}  # port -> (mark, state)
    changes = []
    for op, port in script:
        t = cb.Tuple(6, "198.18.0.1", "198.19.0.1", 1000 + port, 80)
        mark, state = model.get(port, (None, 3))
        if op == "destroy":
            _, attrs = cb.encode_entry(t, tcp_state=None)
            changes.append(change(EV_DESTROY, attrs))
            model.pop(port, None)
            continue
        if op == "mark":
            if port not in model:
                continue
            mark = (mark or 0) + 1
            _, attrs = cb.encode_entry(t, mark=mark, tcp_state=None)
        else:
            state = 3 if op == "new" else (state % 8) + 1
            _, attrs = cb.encode_entry(t, mark=mark, tcp_state=state)
        changes.append(change(EV_NEW if op == "new" and port not in model else EV_UPDATE, attrs))
        model[port] = (mark, state)
    sent = []
    for i in range(0, len(changes), batch):
        sent += table.on_changes(changes[i:i + batch])
    assert [c[2] for c in sent] == [c[2] for c in changes]
    got = {}
    for _kind, _family, key, attrs, *_ in table.entries.values():
        d = ctmsg.decode_entry(socket.AF_INET, attrs)
        got[d["orig"]["sport"] - 1000] = (d.get("mark"), d["protoinfo"]["tcp"]["state"])
    assert got == model


def test_snapshot_is_the_table_at_the_call_in_chunks():
    table = StateTable()
    news = [cb.encode_entry(cb.Tuple(17, "198.18.0.1", "198.19.0.1", p, 53)) for p in range(1, 301)]
    table.on_changes([change(EV_NEW, a) for _, a in news])
    snap = table.snapshot()
    table.on_changes([change(EV_DESTROY, news[0][1])])  # after the call: reaches the peer live
    chunks = list(snap)
    assert [len(c) for c in chunks] == [SNAPSHOT_CHUNK, SNAPSHOT_CHUNK, 300 - 2 * SNAPSHOT_CHUNK]
    assert {e[1] for c in chunks for e in c} == {ctmsg.key_of(a) for _, a in news}
    assert all(len(e) == 3 and e[2] is table.entries.get(e[1], (0, 0, 0, e[2]))[3] for c in chunks for e in c)


def test_seeding_keeps_live_changes_over_the_dump():
    _, a = cb.encode_entry(T)
    _, b = cb.encode_entry(cb.Tuple(6, "198.18.0.2", "198.19.0.1", 1000, 80))
    _, a_fin = cb.encode_entry(T, tcp_state=TCP_CONNTRACK_FIN_WAIT)
    table = StateTable()
    table.on_changes([change(EV_NEW, b)])  # from before: the seed replaces all
    table.begin_seed()
    assert not table.seeded and len(table) == 0
    table.on_changes([change(EV_UPDATE, a_fin)])  # live, newer than the dump's copy of a
    table.on_changes([change(EV_DESTROY, b)])  # gone live: the dump's copy is stale
    table.seed([change(EV_NEW, a), change(EV_NEW, b)])
    table.end_seed()
    assert table.seeded
    assert list(table.entries) == [ctmsg.key_of(a)]
    assert table.entries[ctmsg.key_of(a)][3] == a_fin


def test_a_partial_live_update_during_seeding_is_completed_from_the_dump():
    """A mark-only update that came before the dump reached its key had nothing to be
    completed from: the dump's row completes it, and seed returns it to be sent again."""
    _, a = cb.encode_entry(T)  # ESTABLISHED, with protoinfo (what the dump reads)
    _, mark_only = cb.encode_entry(T, mark=7, tcp_state=None)
    _, b = cb.encode_entry(cb.Tuple(6, "198.18.0.2", "198.19.0.1", 1000, 80))
    _, b_mark = cb.encode_entry(cb.Tuple(6, "198.18.0.2", "198.19.0.1", 1000, 80), mark=3,
                                tcp_state=None)
    table = StateTable()
    table.begin_seed()
    sent = table.on_changes([change(EV_UPDATE, mark_only), change(EV_UPDATE, b_mark)])
    assert "protoinfo" not in ctmsg.decode_entry(socket.AF_INET, sent[0][3])  # nothing to complete from
    table.on_changes([change(EV_DESTROY, b_mark)])  # b is gone live: the dump must not revive it
    repaired = table.seed([change(EV_NEW, a), change(EV_NEW, b)])
    table.end_seed()
    assert [r[2] for r in repaired] == [ctmsg.key_of(a)]
    got = ctmsg.decode_entry(socket.AF_INET, table.entries[ctmsg.key_of(a)][3])
    assert got["mark"] == 7  # the live update's news stays
    assert got["protoinfo"]["tcp"]["state"] == ctmsg.decode_entry(socket.AF_INET, a)["protoinfo"]["tcp"]["state"]
    assert repaired[0] == table.entries[ctmsg.key_of(a)] and repaired[0][0] == EV_UPDATE
    assert list(table.entries) == [ctmsg.key_of(a)] and table.completed == 1


def test_a_whole_live_entry_during_seeding_is_not_sent_again():
    _, a = cb.encode_entry(T)
    _, a_fin = cb.encode_entry(T, tcp_state=TCP_CONNTRACK_FIN_WAIT)
    table = StateTable()
    table.begin_seed()
    table.on_changes([change(EV_UPDATE, a_fin)])  # has its own protoinfo
    assert table.seed([change(EV_NEW, a)]) == []
    assert table.entries[ctmsg.key_of(a)][3] == a_fin


def test_an_unseed_during_a_seed_voids_that_dump():
    _, a = cb.encode_entry(T)
    table = StateTable()
    table.begin_seed()
    table.unseed()
    table.seed([change(EV_NEW, a)])
    table.end_seed()
    assert not table.seeded and len(table) == 0


def test_a_backup_copy_follows_the_records_it_is_sent():
    from statesync.wire import OP_DELETE, OP_UPSERT

    _, a = cb.encode_entry(T)
    _, b = cb.encode_entry(cb.Tuple(6, "198.18.0.2", "198.19.0.1", 1000, 80))
    _, a2 = cb.encode_entry(T, tcp_state=TCP_CONNTRACK_FIN_WAIT)
    ka, kb = ctmsg.key_of(a), ctmsg.key_of(b)
    table = StateTable()
    table.on_records([(OP_UPSERT, socket.AF_INET, ka, a), (OP_UPSERT, socket.AF_INET, kb, b)])
    assert table.entries == {ka: (OP_UPSERT, socket.AF_INET, ka, a), kb: (OP_UPSERT, socket.AF_INET, kb, b)}
    table.on_records([(OP_DELETE, socket.AF_INET, kb, b""), (OP_UPSERT, socket.AF_INET, ka, a2)])
    assert table.entries == {ka: (OP_UPSERT, socket.AF_INET, ka, a2)}
    assert list(table.snapshot()) == [[(socket.AF_INET, ka, a2)]]
    table.remove([ka, kb])
    assert not table.entries and not table.seeded
    table.adopt()
    assert table.seeded


def test_kernel_made_keys_leave_out_adopted_records_the_kernel_has_not_changed():
    """A former Master makes its own TCP entries liberal (their windows go stale): not those it
    wrote as Backup (liberal already) and took over untouched; every row an event or a dump
    gave since is the kernel's."""
    from statesync.wire import OP_UPSERT

    entries = [cb.encode_entry(cb.Tuple(6, f"198.18.0.{i}", "198.19.0.1", 1000, 80))[1] for i in range(1, 6)]
    keys = [ctmsg.key_of(a) for a in entries]
    table = StateTable()
    table.on_records([(OP_UPSERT, socket.AF_INET, k, a) for k, a in zip(keys[:4], entries[:4])])
    table.adopt()
    assert table.kernel_made_keys() == []
    table.on_changes([change(EV_UPDATE, entries[0]),  # a state change of an adopted entry
                      change(EV_DESTROY, entries[1]), change(EV_NEW, entries[1]),  # re-created
                      change(EV_NEW, entries[4])])  # a session of our own
    assert sorted(table.kernel_made_keys()) == sorted([keys[0], keys[1], keys[4]])
    table.begin_seed()  # after an overrun, a dump reseeds: every row is the kernel's
    table.seed([change(EV_NEW, a) for a in entries])
    table.end_seed()
    assert sorted(table.kernel_made_keys()) == sorted(keys)


def test_held_entries_are_released_from_their_records():
    """Records from a state table carry the old Master's timeouts, the kernel holds the
    entries at the hold: with `held`, the hold is what is compared."""
    from statesync import holdrelease

    ceilings = {(6, 3): 432000, (6, 7): 120, (17, 1): 120}
    rows = [cb.encode_entry(T, timeout=100),  # ESTABLISHED: its default is the hold
            cb.encode_entry(cb.Tuple(6, "198.18.0.2", "198.19.0.1", 1000, 80), timeout=30, tcp_state=7),
            cb.encode_entry(cb.Tuple(17, "198.18.0.3", "198.19.0.1", 1000, 53), timeout=60)]
    entries = [(f, ctmsg.key_of(a), a) for f, a in rows]
    assert holdrelease.releases(entries, ceilings) == []  # their own timeouts are all below
    assert holdrelease.releases(entries, ceilings, held=432000) == [(entries[1][1], 120), (entries[2][1], 120)]
