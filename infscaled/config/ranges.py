"""Checks of `pipeline.layers` unit ranges, shared by the load-time and the model-aware pass."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

UnitRange = tuple[int, int]


def layers_allowed(n_units: int | None = None) -> str:
    """What a valid `pipeline.layers` looks like, for the "allowed" part of a message."""
    cover = f"units 0..{n_units - 1} of the model" if n_units is not None else "units from 0"
    return (
        f"[first, last] ranges (inclusive) in ascending order that cover {cover} "
        "with no gap and no overlap, e.g. [[0, 3], [4, 11]]"
    )


def range_problem(ranges: Sequence[UnitRange], n_units: int | None = None) -> str | None:
    """The first problem with stage unit ranges, or None; `n_units` also checks the model's end.

    Expects well-formed pairs (0 <= first <= last); those are checked where the ranges are read.
    """
    assert ranges, "ranges are checked non-empty where they are read"
    for (prev_first, prev_last), (first, last) in pairwise(ranges):
        if first < prev_first:
            return (
                f"range [{first}, {last}] comes after [{prev_first}, {prev_last}]; "
                "ranges must be in ascending order"
            )
    if ranges[0][0] > 0:
        return f"units 0..{ranges[0][0] - 1} are in no stage"
    for (_, prev_last), (first, last) in pairwise(ranges):
        if first <= prev_last:
            return f"units {first}..{min(prev_last, last)} are in two stages"
        if first > prev_last + 1:
            return f"units {prev_last + 1}..{first - 1} are in no stage"
    if n_units is not None:
        top = max(last for _, last in ranges)
        if top >= n_units:
            return f"unit {top} does not exist; the model has {n_units} units, 0..{n_units - 1}"
        end = ranges[-1][1]
        if end < n_units - 1:
            return f"units {end + 1}..{n_units - 1} are in no stage"
    return None
