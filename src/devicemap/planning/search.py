"""The one search: cut ordered units into one contiguous run per device, and find the best limit.

Each device judges its own run, which only gets harder to accept as it grows at either end:
so ``pack`` finds a cut whenever one exists, and a binary search over a limit is exact.
"""

from collections.abc import Callable, Sequence
from typing import TypeVar

Packed = TypeVar("Packed")
Take = Callable[[int], bool]  # grows a run by unit ``index`` if the device accepts it; never asked again after False
Open = Callable[[int], Take | None]  # opens a device's run at a unit index; None if even an empty run is refused


def pack(count: int, devices: Sequence[Open], min_run: int = 0) -> list[range] | None:
    """Cut ``count`` ordered units into one run per device, in order, each ``min_run`` long or more; None if none fits.

    Whenever each device in turn taking the longest run it accepts (leaving ``min_run`` units
    to each later device) makes a cut, that is the cut; otherwise, from the last device back,
    each run ends as late as the runs after it allow. Here the third device needs the second
    to take one unit only, so the first takes one too:

    >>> sizes = [3, 2, 4, 1]
    >>> def up_to(room):  # a device holding units whose sizes add to at most ``room``
    ...     def open_run(start):
    ...         held = []
    ...         return lambda index: held.append(sizes[index]) or sum(held) <= room
    ...     return open_run
    >>> pack(len(sizes), [up_to(5), up_to(2), up_to(5)], min_run=1)
    [range(0, 1), range(1, 2), range(2, 4)]
    """
    reached, starts = {0}, []
    for position, open_run in enumerate(devices):
        last = count - min_run * (len(devices) - position - 1)
        starts.append(_run_starts(reached, open_run, min_run, last))
        reached = set(starts[-1])
    if count not in reached:
        return None
    runs, end = [], count
    for device_starts in reversed(starts):
        runs.append(range(device_starts[end], end))
        end = device_starts[end]
    return runs[::-1]


def _run_starts(reached: set[int], open_run: Open, min_run: int, last: int) -> dict[int, int]:
    """Each end up to ``last`` that a run from a reached position gets to, and the latest start that does.

    A later start leaves a shorter run, never a worse one: so the run restarts at each reached position.
    """
    starts: dict[int, int] = {}
    take, start = None, 0
    for end in range(min(reached, default=last + 1) + min_run, last + 1):
        if end - min_run in reached:
            start, take = end - min_run, open_run(end - min_run)
            if take is not None and not all(take(index) for index in range(start, end)):
                take = None
        elif take is not None and not take(end - 1):
            take = None
        if take is not None:
            starts[end] = start
    return starts


def smallest_limit(pack: Callable[[int], Packed | None], low: int, high: int) -> Packed | None:
    """``pack(limit)`` at the smallest limit in [low, high] where it packs (not None); None if none does.

    >>> smallest_limit(lambda limit: [limit] if limit >= 7 else None, 0, 100)
    [7]
    """
    if pack(high) is None:
        return None
    while low < high:
        middle = (low + high) // 2
        low, high = (middle + 1, high) if pack(middle) is None else (low, middle)
    return pack(high)


def largest_limit(pack: Callable[[int], Packed | None], low: int, high: int) -> Packed | None:
    """``pack(limit)`` at the largest limit in [low, high] where it packs (not None); None if none does.

    >>> largest_limit(lambda limit: [limit] if limit <= 7 else None, 0, 100)
    [7]
    """
    return smallest_limit(lambda negated: pack(-negated), -high, -low)

