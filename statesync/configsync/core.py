"""Config sync decisions, sans-I/O: who is the source, what a manifest compare yields,
and the conflict rule. No files, no sockets, no clocks: entries in, decisions out.

The rule (issue 4): the Master is the source of live changes. When versions differ,
the newer generation wins; equal generations go to the current Master. A *conflict*
is when both versions changed since the newest generation both nodes held
(`common`): it is reported, never merged, and the loser is kept aside by the node
that holds it when that node replaces it (core says so with `keep_local`). A forced
resync (`hasync resync --config`) makes the Master's version win everywhere; local
versions that changed since `common` are still kept aside.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from .manifest import ABSENT, Entry, Name


@dataclass(frozen=True)
class Decision:
    take: bool  # write the incoming version here
    conflict: bool  # both changed since the common generation
    keep_local: bool  # keep our current version aside before replacing it
    same: bool = False  # the versions already agree (content, mode and owner)


SAME = Decision(False, False, False, True)


def decide(local: Entry, incoming: Entry, *, incoming_is_source: bool, forced: bool = False) -> Decision:
    if local.same_content(incoming):
        return SAME
    common = max(local.common, incoming.common)
    local_changed = local.gen > common
    incoming_changed = incoming.gen > common
    conflict = local_changed and incoming_changed
    if forced:
        take = incoming_is_source
    elif incoming.gen != local.gen:
        take = incoming.gen > local.gen
    else:
        take = incoming_is_source
    # an absent file has nothing to keep; a local version that changed since common is kept
    keep = take and local_changed and not local.deleted
    return Decision(take, conflict, keep)


@dataclass(frozen=True)
class Plan:
    """A manifest compare, from one node's view: what to fetch from the peer, what to
    push to it, and the conflicts among them."""

    fetch: tuple[Name, ...]
    push: tuple[Name, ...]
    same: tuple[Name, ...]
    conflicts: tuple[Name, ...]
    keep_local: tuple[Name, ...]


def compare(local: Mapping[Name, Entry], remote: Mapping[Name, Entry], *, local_is_source: bool,
            forced: bool = False) -> Plan:
    fetch, push, same, conflicts, keep = [], [], [], [], []
    for name in sorted(set(local) | set(remote)):
        mine, theirs = local.get(name, ABSENT), remote.get(name, ABSENT)
        d = decide(mine, theirs, incoming_is_source=not local_is_source, forced=forced)
        if d.same:
            same.append(name)
            continue
        if d.conflict:
            conflicts.append(name)
        if d.take:
            fetch.append(name)
            if d.keep_local:
                keep.append(name)
        elif not forced or local_is_source:
            push.append(name)
    return Plan(tuple(fetch), tuple(push), tuple(same), tuple(conflicts), tuple(keep))
