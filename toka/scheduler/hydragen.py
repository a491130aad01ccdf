"""Hydragen grouping: decode rows whose sequences start with the same cached pages (n samples of one
prompt, a shared system prompt) form a group; the ranks attend to the group's shared prefix once for
all its queries and merge that with each row's own suffix (workers/attention).

Pages in the prefix cache are full and never written again, and a key names everything before its
page, so sequences holding the same page at some index hold the same pages before it too.
"""

from __future__ import annotations

from collections import defaultdict


def group_by_prefix(rows: list, min_group: int, min_pages: int) -> tuple[list, list[int], list[int]]:
    """rows: sequences decoding this step, each with `pages` and `keyed` (how many leading pages
    are cached pages). Returns the rows reordered so each group is contiguous and first, the groups'
    row counts, and their shared prefix lengths in pages. Rows are grouped by their first page, and
    a group's prefix is what all its members share (a member that diverged early shortens it)."""
    by_first = defaultdict(list)
    for seq in rows:
        if seq.keyed >= min_pages:
            by_first[seq.pages[0]].append(seq)
    ordered, counts, prefixes = [], [], []
    for members in by_first.values():
        if len(members) < min_group:
            continue
        lead = members[0].pages
        k = min(s.keyed for s in members)
        for s in members[1:]:
            while k >= min_pages and s.pages[:k] != lead[:k]:
                k //= 2
        if k < min_pages:
            continue
        ordered += members
        counts.append(len(members))
        prefixes.append(k)
    if not counts:
        return rows, [], []
    grouped = {id(s) for s in ordered}
    return ordered + [s for s in rows if id(s) not in grouped], counts, prefixes
