"""Cut a model's ordered units into contiguous stages of balanced weight.

A stage is an inclusive range (first_unit, last_unit). Weights are whatever the caller
measures per unit (parameter count, FLOPs, measured milliseconds); they must be >= 0.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from fractions import Fraction

Range = tuple[int, int]


def balance(weights: Sequence[int | float], stages: int) -> tuple[Range, ...]:
    """Split units 0..n-1 into `stages` contiguous, non-empty ranges minimising the heaviest stage.

    The optimum is exact: sums are computed with `Fraction`, so float rounding cannot pick a
    worse split. Among optimal splits the one with the earliest boundaries wins (the tuple of
    each stage's last unit is lexicographically smallest), i.e. earlier stages take as few
    units as the optimum allows and surplus units drift towards the last stages.

    Raises ValueError if stages < 1, stages > len(weights), or a weight is negative or not finite.
    """
    n = len(weights)
    if stages < 1:
        raise ValueError(f"stages must be >= 1, got {stages}")
    if stages > n:
        raise ValueError(f"cannot cut {n} units into {stages} non-empty stages (stages must be <= units)")
    exact = [_exact(i, w) for i, w in enumerate(weights)]
    prefix = [Fraction(0)]
    for w in exact:
        prefix.append(prefix[-1] + w)

    def seg(first: int, last: int) -> Fraction:
        return prefix[last + 1] - prefix[first]

    # The optimal maximum is some segment sum: binary-search the sorted candidates for the
    # smallest cap that a greedy cut meets with at most `stages` stages. Fewer stages are fine
    # because splitting a stage never raises the maximum and stages <= n.
    candidates = sorted({seg(i, j) for i in range(n) for j in range(i, n)})
    lo, hi = 0, len(candidates) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if _min_stages(exact, 0, candidates[mid]) <= stages:
            hi = mid
        else:
            lo = mid + 1
    cap = candidates[lo]

    # Rebuild the split with the earliest feasible boundary for each stage in turn. A suffix
    # starting at unit j fits r stages under `cap` iff min_stages(j) <= r <= n - j.
    min_from = [_min_stages(exact, j, cap) for j in range(n)] + [0]
    ranges: list[Range] = []
    first = 0
    for s in range(stages):
        left = stages - s - 1
        last = first
        while True:
            assert seg(first, last) <= cap, "balance: no feasible boundary (bug)"
            rest = last + 1
            if min_from[rest] <= left <= n - rest:
                break
            last += 1
        ranges.append((first, last))
        first = last + 1
    result = tuple(ranges)
    check_cover(result, n)
    return result


def check_cover(ranges: Sequence[Range], n_units: int) -> None:
    """Raise ValueError unless `ranges` cover 0..n_units-1 exactly once, in order, each non-empty.

    The last line of defence: a split can never drop or duplicate a unit.
    """
    if n_units < 1:
        raise ValueError(f"a model needs at least one unit, got n_units={n_units}")
    if not ranges:
        raise ValueError(f"no stages: ranges must cover units 0..{n_units - 1}")
    expected_first = 0
    for index, (first, last) in enumerate(ranges):
        if first != expected_first:
            what = "overlaps the previous stage" if first < expected_first else "leaves a gap"
            raise ValueError(
                f"stage {index} starts at unit {first} but must start at {expected_first} ({what})"
            )
        if last < first:
            raise ValueError(f"stage {index} is empty or reversed: ({first}, {last})")
        expected_first = last + 1
    if expected_first != n_units:
        raise ValueError(
            f"stages end at unit {expected_first - 1} but the model has units 0..{n_units - 1}"
        )


def stage_weights(weights: Sequence[int | float], ranges: Sequence[Range]) -> list[float]:
    """Total weight of each stage's units."""
    return [float(math.fsum(weights[first : last + 1])) for first, last in ranges]


def _exact(index: int, weight: int | float) -> Fraction:
    # Integral weights (incl. numpy ints) stay exact; anything else goes through float, exactly.
    value = weight if isinstance(weight, numbers.Rational) else float(weight)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"unit {index} has a non-finite weight {weight!r}")
    if value < 0:
        raise ValueError(f"unit {index} has a negative weight {weight!r} (weights must be >= 0)")
    return Fraction(value)


def _min_stages(weights: Sequence[Fraction], start: int, cap: Fraction) -> int | float:
    """Fewest stages covering units start.. with none above `cap` (greedy is optimal).

    Infinite if a single unit exceeds `cap`.
    """
    count, load = 0, None
    for w in weights[start:]:
        if w > cap:
            return math.inf
        if load is None or load + w > cap:
            count, load = count + 1, w
        else:
            load += w
    return count
