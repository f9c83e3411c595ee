"""``--fidbench-shard I/N``: the option's value, and which cases shard I of N keeps."""

from __future__ import annotations

import argparse


def parse(value: str) -> tuple[int, int]:
    """``--fidbench-shard I/N``: shard I (1 to N) of N."""
    i, sep, n = value.partition("/")
    try:
        i, n = int(i), int(n)
    except ValueError:
        sep = ""
    if not sep or not 1 <= i <= n:
        raise argparse.ArgumentTypeError(f"must be I/N, shard I of N with 1 <= I <= N, got {value!r}")
    return i, n


def in_shard(rank: int, shard: tuple[int, int] | None) -> bool:
    """Whether the case at ``rank`` in the suite's order is in ``shard`` (I, N): round-robin, rank mod N = I - 1.

    Round-robin keeps shards even in cost as well as count: a suite lists a method's variants (often
    equally slow, e.g. every stepwise one) next to each other, and these go to different shards. Each shard
    loads each of its models once (cases run in suite order) and the reference cache is shared, so a
    reference is generated once, by whichever shard gets to it first."""
    return shard is None or rank % shard[1] == shard[0] - 1
