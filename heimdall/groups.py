"""Split groups for real data: every recording of one transmitter lands in one split.

Real recordings repeat: the chunks of a session and the sessions of one known
transmitter share a position, so a split by recording id would put the same
transmitter in train *and* test and flatter the test score. An import gives
each group (a known source, or a session without one) one int64
``split_group`` id, and :func:`heimdall.datasets.split_assignment` of that id
is the split of every recording in the group, under any :class:`SplitConfig`.

:func:`allocate_groups` chooses the ids so the import's own split is balanced
and its held-out splits are never empty, and never moves a group it was given
before, so an incremental import keeps every transmitter where it was.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np

from heimdall.datasets import TEST, TRAIN, VAL, SplitConfig, split_assignment

__all__ = ["allocate_groups", "group_base"]

#: Held-out splits are filled first, in this order, when there are enough groups.
_HELD_OUT = (TEST, VAL)
_MIN_GROUPS_FOR_HELD_OUT = 3
_SEARCH_BLOCK = 1024


def group_base(key: str) -> int:
    """The first candidate id of a group: the top 62 bits of ``sha256(key)``."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") >> 2


def _shares(config: SplitConfig) -> dict[int, float]:
    return {TRAIN: 1.0 - config.val_fraction - config.test_fraction, VAL: config.val_fraction, TEST: config.test_fraction}


def _id_in_split(base: int, wanted: int, config: SplitConfig, taken: set[int]) -> int:
    """The smallest free ``k >= base`` whose split is ``wanted``."""
    start = base
    while True:
        candidates = np.arange(start, start + _SEARCH_BLOCK, dtype=np.int64)
        for k in candidates[split_assignment(candidates, config) == wanted].tolist():
            if k not in taken:
                return int(k)
        start += _SEARCH_BLOCK


def _wanted_split(counts: dict[int, int], groups: dict[int, int], total: int, n_groups: int,
                  shares: dict[int, float]) -> int:
    if n_groups >= _MIN_GROUPS_FOR_HELD_OUT:
        for split in _HELD_OUT:
            if shares[split] > 0.0 and groups[split] == 0:
                return split
    # Largest deficit against the target share; ties go to train, then val.
    return max((s for s in (TRAIN, VAL, TEST) if shares[s] > 0.0),
               key=lambda s: (shares[s] * total - counts[s], -s))


def allocate_groups(sizes: Mapping[str, int], existing: Mapping[str, int],
                    config: SplitConfig = SplitConfig()) -> dict[str, int]:
    """Give every group key an int64 ``split_group`` id.

    Keys already in ``existing`` keep their id. New keys, in sorted order, go to an
    empty held-out split (test, then val) while there are at least three groups in
    all, else to the split furthest below its target share of recordings; the id is
    the smallest unused ``k >= group_base(key)`` that ``split_assignment`` puts in
    that split.

    Args:
        sizes: recordings per group key, for new groups and (where known) old ones.
        existing: ids given to groups by earlier imports.
        config: the split the balance aims at (ids stay leak-free under any other).

    Returns:
        ``{key: id}`` for every key of ``existing`` and ``sizes``.

    Raises:
        ValueError: a negative size, or an existing id outside [0, 2**63).
    """
    bad = {k: v for k, v in sizes.items() if v < 0}
    bad_ids = {k: v for k, v in existing.items() if not 0 <= v < 2**63}
    if bad or bad_ids:
        raise ValueError(f"group sizes must be >= 0 and ids in [0, 2**63), got sizes {bad} and ids {bad_ids}; "
                         f"fix: pass recording counts and the ids an earlier import recorded")
    out = {k: int(v) for k, v in existing.items()}
    shares = _shares(config)
    splits = split_assignment(np.asarray(list(out.values()), dtype=np.int64), config).tolist() if out else []
    counts = {s: 0 for s in shares}
    groups = {s: 0 for s in shares}
    for key, split in zip(out, splits, strict=True):
        counts[split] += int(sizes.get(key, 0))
        groups[split] += 1
    new = sorted(k for k in sizes if k not in out)
    total, n_groups, taken = sum(int(v) for v in sizes.values()), len(out) + len(new), set(out.values())
    for key in new:
        split = _wanted_split(counts, groups, total, n_groups, shares)
        out[key] = _id_in_split(group_base(key), split, config, taken)
        taken.add(out[key])
        counts[split] += int(sizes[key])
        groups[split] += 1
    return out
