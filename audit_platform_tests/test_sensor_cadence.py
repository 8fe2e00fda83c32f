"""The capture sensor ticks at the configured interval under the sensor daemon's timing rule."""

from __future__ import annotations

import random

import pytest

from audit_platform.defs.capture.sensors import tick_spacing

#: The sensor daemon's loop period (dagster/_daemon/sensor.py, MIN_INTERVAL_LOOP_TIME).
LOOP = 5.0


def tick_gaps(declared: int, seed: int, loops: int = 200) -> set[int]:
    """Whole seconds between ticks when the daemon looks about every LOOP s (a loop may run a
    little long) and skips a sensor whose last tick, stamped a few milliseconds into its own
    look, is less than ``declared`` s ago."""
    jitter = random.Random(seed)
    now, last, gaps = 0.0, None, set()
    for _ in range(loops):
        now += LOOP + jitter.uniform(0, 0.05)
        if last is not None and now - last < declared:
            continue
        if last is not None:
            gaps.add(round(now - last))
        last = now + jitter.uniform(0.001, 0.2)
    return gaps


@pytest.mark.parametrize("interval", [5, 10, 15, 30])
@pytest.mark.parametrize("seed", range(5))
def test_ticks_come_every_interval_not_a_loop_later(interval, seed):
    assert max(tick_gaps(interval, seed)) == interval + LOOP  # declared as is: late ticks
    assert tick_gaps(tick_spacing(interval), seed) == {interval}


def test_an_interval_of_a_second_stays_valid():
    assert tick_spacing(1) == 1
