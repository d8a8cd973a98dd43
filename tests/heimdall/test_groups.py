"""Split groups: one split per transmitter, stable across incremental imports."""
from __future__ import annotations

import numpy as np
import pytest

from heimdall.datasets import TEST, TRAIN, VAL, SplitConfig, split_assignment
from heimdall.groups import allocate_groups, group_base


def _split_of(ids: dict[str, int], config: SplitConfig = SplitConfig()) -> dict[str, int]:
    codes = split_assignment(np.asarray(list(ids.values()), dtype=np.int64), config)
    return dict(zip(ids, codes.tolist(), strict=True))


def test_every_recording_of_a_group_shares_one_split_under_any_config() -> None:
    sizes = {f"source-{i:02d}": 5 + 3 * i for i in range(12)}
    ids = allocate_groups(sizes, {}, SplitConfig())
    recording_groups = np.repeat(np.asarray(list(ids.values()), dtype=np.int64), list(sizes.values()))
    for config in (SplitConfig(), SplitConfig(0.3, 0.2), SplitConfig(0.0, 0.5)):
        codes = split_assignment(recording_groups, config)
        owners = np.repeat(np.arange(len(sizes)), list(sizes.values()))
        for g in range(len(sizes)):
            assert np.unique(codes[owners == g]).size == 1, f"group {g} crosses splits under {config}"


@pytest.mark.parametrize("n_groups", [3, 4, 10, 40])
def test_held_out_splits_are_never_empty_with_three_or_more_groups(n_groups: int) -> None:
    splits = _split_of(allocate_groups({f"g{i}": 10 for i in range(n_groups)}, {}, SplitConfig()))
    assert {TRAIN, VAL, TEST} <= set(splits.values())


def test_two_groups_go_where_recordings_are_missing_most() -> None:
    splits = _split_of(allocate_groups({"a": 50, "b": 50}, {}, SplitConfig()))
    assert list(splits.values()) == [TRAIN, TRAIN]


def test_the_split_is_balanced_in_recordings() -> None:
    rng = np.random.default_rng(3)
    sizes = {f"src-{i:03d}": int(n) for i, n in enumerate(rng.integers(5, 30, 60))}
    splits = _split_of(allocate_groups(sizes, {}, SplitConfig()))
    total = sum(sizes.values())
    share = {s: sum(n for k, n in sizes.items() if splits[k] == s) / total for s in (TRAIN, VAL, TEST)}
    assert share[TRAIN] == pytest.approx(0.8, abs=0.05)
    assert share[VAL] == pytest.approx(0.1, abs=0.05) and share[TEST] == pytest.approx(0.1, abs=0.05)


def test_existing_keys_never_move_and_new_ids_are_unique() -> None:
    first = allocate_groups({f"g{i}": 10 for i in range(5)}, {}, SplitConfig())
    # A later import: old groups grew, new ones arrived; ids of old keys are passed back.
    sizes = {**{k: 100 for k in first}, **{f"new{i}": 7 for i in range(8)}}
    second = allocate_groups(sizes, first, SplitConfig())
    assert {k: second[k] for k in first} == first
    assert set(second) == set(sizes)
    assert len(set(second.values())) == len(second)


def test_existing_ids_the_caller_moved_are_kept_as_given() -> None:
    # Even an id an earlier import chose under another config is kept: a group never moves.
    existing = {"old": 12345}
    assert allocate_groups({"old": 3, "x": 1}, existing, SplitConfig(0.4, 0.4))["old"] == 12345


def test_ids_are_deterministic_and_near_their_key_hash() -> None:
    sizes = {"c": 1, "a": 2, "b": 3, "d": 4}
    ids = allocate_groups(sizes, {}, SplitConfig())
    assert ids == allocate_groups(dict(reversed(sizes.items())), {}, SplitConfig())
    for key, value in ids.items():
        assert 0 <= group_base(key) <= value < 2**63
        assert value - group_base(key) < 10_000


def test_bad_input_is_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match="fix:"):
        allocate_groups({"a": -1}, {}, SplitConfig())
    with pytest.raises(ValueError, match="fix:"):
        allocate_groups({"a": 1}, {"b": -5}, SplitConfig())


def test_a_split_with_no_share_gets_no_group() -> None:
    splits = _split_of(allocate_groups({f"g{i}": 5 for i in range(6)}, {}, SplitConfig(0.0, 0.2)),
                       SplitConfig(0.0, 0.2))
    assert VAL not in splits.values() and TEST in splits.values()
