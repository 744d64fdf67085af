"""Summarise a py-spy raw profile (`py-spy record --subprocesses --threads -f raw`): where each
busy thread of each process spends its samples.

    python -m benchmarks.pyspy_summary PROFILE.txt [--top 25] [--min-samples 50]

py-spy samples only threads that are running (not idle in a wait) unless told `--idle`, so a
thread's sample count is its CPU time at the sampling rate. For every (process, thread) with at
least --min-samples samples: its total, the functions with the most samples anywhere on the stack
(inclusive: a function and what it calls) and the most at the top of the stack (self), each as
`function (file)` with line numbers merged. Used for issue 14: where the host time of a decode
step goes (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import collections
import re

_LINE = re.compile(r":\d+\)$")


def _frame(f: str) -> str:
    return _LINE.sub(")", f)


def summarise(path: str, top: int, min_samples: int) -> str:
    threads: dict[tuple[str, str], collections.Counter[str]] = collections.defaultdict(collections.Counter)
    selfs: dict[tuple[str, str], collections.Counter[str]] = collections.defaultdict(collections.Counter)
    totals: collections.Counter[tuple[str, str]] = collections.Counter()
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        procs = [f for f in frames if f.startswith("process ")]
        names = [f for f in frames if f.startswith("thread ")]
        code = [_frame(f) for f in frames if not f.startswith(("process ", "thread "))]
        key = (procs[-1][:100] if procs else "?", names[-1] if names else "?")
        totals[key] += n
        for f in set(code):
            threads[key][f] += n
        if code:
            selfs[key][code[-1]] += n
    out = []
    for key, total in totals.most_common():
        if total < min_samples:
            break
        out.append(f"== {key[0]} | {key[1]}: {total} samples")
        out.append("  inclusive:")
        out += [f"    {n:6d} {100 * n / total:5.1f}%  {f}" for f, n in threads[key].most_common(top)]
        out.append("  self:")
        out += [f"    {n:6d} {100 * n / total:5.1f}%  {f}" for f, n in selfs[key].most_common(top)]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("profile")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--min-samples", type=int, default=50)
    args = ap.parse_args()
    print(summarise(args.profile, args.top, args.min_samples))


if __name__ == "__main__":
    main()
