"""Garbage collection on a timer in worker processes, instead of Python's allocation counter.

A worker holds thousands of requests, tries and rows at once and allocates several objects per
postback. With the collector's own trigger it ran hundreds of times a second and took a fifth
of a busy worker's CPU walking objects that stay alive until their request lands (perf, the
`slow` benchmark at 2,000 in flight: `gc_collect_main` and `visit_*` 20-25 % of samples).
Nearly everything a worker frees goes by reference counting; what only the collector frees
(reference cycles: exceptions holding their frames, objects pointing at each other) waits at
most a second for the young generations and a minute for everything.
"""

import gc
import time

YOUNG_EVERY_SECONDS = 1.0
FULL_EVERY_SECONDS = 60.0

_last_young = _last_full = 0.0


def take_over_from_the_allocation_counter() -> None:
    """Collect once, set aside what the process has built so far (Django, code, settings: it
    lives as long as the process) and turn the automatic collector off."""
    global _last_young, _last_full
    gc.collect()
    gc.freeze()
    gc.disable()
    _last_young = _last_full = time.monotonic()


def collect_when_due() -> None:
    """Called often (each turn of a worker's housekeeping): collects what is due."""
    global _last_young, _last_full
    if gc.isenabled():
        return  # not a worker process: Python's own trigger runs
    now = time.monotonic()
    if now - _last_full >= FULL_EVERY_SECONDS:
        gc.collect()
        _last_full = _last_young = now
    elif now - _last_young >= YOUNG_EVERY_SECONDS:
        gc.collect(1)
        _last_young = now
