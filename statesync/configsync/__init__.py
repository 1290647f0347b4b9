"""Config sync (issue 4): the Master's replicated paths copied to the Backup.

One concept per module: pathguard (which names belong to the set), manifest
(versions: generations, digests), diff (content-defined deltas), core (the
sans-I/O decisions: compare, conflicts, who wins), frames (the wire types 32..63),
watcher (watchdog, debounce), apply (atomic write, kept-aside losers), hooks
(reload commands), node (the I/O around them, driven by statesync.service).
"""
