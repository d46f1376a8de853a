"""Stable-study detection (node.stability): the quiet period counts from the last instance, and
a study receiving instance after instance does not reschedule its job on every one of them."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from apscheduler.schedulers.background import BackgroundScheduler

from node.index import Index
from node.stability import StabilityMonitor
from tests.node.test_followup import add_mr_study

QUIET_S = 0.4


class CountingScheduler(BackgroundScheduler):
    """APScheduler's background scheduler, counting how often a job is armed."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.armed = 0

    def add_job(self, *args: Any, **kwargs: Any) -> Any:
        job = super().add_job(*args, **kwargs)
        self.armed += 1
        return job

    def reschedule_job(self, *args: Any, **kwargs: Any) -> Any:
        job = super().reschedule_job(*args, **kwargs)  # JobLookupError: not counted
        self.armed += 1
        return job


@pytest.fixture
def scheduler() -> Iterator[CountingScheduler]:
    sched = CountingScheduler(timezone=dt.timezone.utc)
    sched.start()
    yield sched
    sched.shutdown(wait=True)


def test_quiet_period_counts_from_the_last_instance_with_few_reschedules(tmp_path, scheduler):
    index = Index(tmp_path / "index.sqlite")
    study = "1.2.826.0.1.3680043.10.1"
    add_mr_study(index, study, dt.date(2026, 1, 5))
    fired: list[tuple[str, bool, float]] = []
    done = threading.Event()

    def listener(study_uid: str, amended: bool) -> None:
        fired.append((study_uid, amended, time.monotonic()))
        done.set()

    monitor = StabilityMonitor(index, scheduler, quiet_period_s=QUIET_S, on_stable=listener)
    touches = 0
    start = time.monotonic()
    while time.monotonic() - start < 3 * QUIET_S:  # instances keep arriving for 3 quiet periods
        monitor.touch(study)
        touches += 1
        last = time.monotonic()
        time.sleep(0.02)
    assert done.wait(5 * QUIET_S)
    time.sleep(QUIET_S)  # nothing further fires
    assert [(s, a) for s, a, _ in fired] == [(study, False)]
    assert fired[0][2] - last >= QUIET_S - 0.01  # not before a whole quiet period after the last
    # one job armed, then re-armed once per quiet period at most (not once per instance)
    assert touches > 40 and scheduler.armed <= 5
    assert [e["study_uid"] for e in index.events("study_stable")] == [study]
