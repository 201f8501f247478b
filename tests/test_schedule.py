"""The scheduling state of a map stage (workers/schedule.py), driven by hand: no Ray."""

from __future__ import annotations

from seglab.pipeline.base.errors import InputError, TransientError
from seglab.pipeline.core.ledger import Receipt
from seglab.stages.base import Unit
from seglab.workers.schedule import BatchSchedule, failure_of

UNITS = [Unit(f"u{i}", f"/data/u{i}.png") for i in range(7)]


def done(batch):
    return [Receipt(unit=u.id, outputs={}, signature="s") for u in batch]


def cut(units, size):
    """Batches of ``size`` units in order (what the runner makes of a plan's shards)."""
    return [units[i : i + size] for i in range(0, len(units), size)]


def ids(batch):
    return [u.id for u in batch]


def test_batches_go_to_the_least_loaded_live_worker_up_to_in_flight_each():
    schedule = BatchSchedule(cut(UNITS, 2), workers=3, in_flight=2, max_retries=1)
    sent = []
    while (step := schedule.dispatch([0, 2])) is not None:  # worker 1 is not live
        worker, batch = step
        schedule.sent(len(sent), worker, batch)
        sent.append((worker, ids(batch)))
    assert sent == [(0, ["u0", "u1"]), (2, ["u2", "u3"]), (0, ["u4", "u5"]), (2, ["u6"])]
    assert schedule.dispatch([0, 2]) is None and schedule.load == [2, 0, 2]
    assert schedule.dispatch([1]) is None  # nothing queued any more
    assert schedule.returned(1) == (2, UNITS[2:4]) and schedule.load == [2, 0, 1]
    assert schedule.active and sorted(schedule.waiting()) == ["u0", "u1", "u4", "u5", "u6"]


def test_a_transient_failure_is_retried_until_its_attempts_run_out():
    schedule = BatchSchedule(cut(UNITS[:2], 2), workers=1, in_flight=1, max_retries=2)
    flaky = failure_of(UNITS[0], TransientError("storage hiccup"))
    worker, batch = schedule.dispatch([0])
    schedule.sent("a", worker, batch)
    schedule.returned("a")
    assert schedule.settle(batch, [flaky, *done(batch[1:])]) == done(batch[1:])
    for attempt in range(2):
        worker, again = schedule.dispatch([0])
        assert ids(again) == ["u0"]
        schedule.sent(attempt, worker, again)
        schedule.returned(attempt)
        final = schedule.settle(again, [flaky])
    assert final == [flaky] and not schedule.active and schedule.attempts["u0"] == 3
    assert schedule.stats.resubmitted == 0  # only units of a lost worker count as resubmitted


def test_an_input_error_is_final_at_once():
    schedule = BatchSchedule(cut(UNITS[:1], 1), workers=1, in_flight=1, max_retries=5)
    bad = failure_of(UNITS[0], InputError("/data/u0.png", "cannot identify image file"))
    assert not bad.transient
    worker, batch = schedule.dispatch([0])
    schedule.sent("a", worker, batch)
    schedule.returned("a")
    assert schedule.settle(batch, [bad]) == [bad] and not schedule.active


def test_a_lost_worker_gives_back_its_other_batches_and_they_are_resubmitted():
    schedule = BatchSchedule(cut(UNITS[:6], 2), workers=2, in_flight=2, max_retries=1)
    for token in range(3):
        worker, batch = schedule.dispatch([0, 1])
        schedule.sent(token, worker, batch)
    assert {t: (w, ids(b)) for t, (w, b) in schedule.pending.items()} == {
        0: (0, ["u0", "u1"]),
        1: (1, ["u2", "u3"]),
        2: (0, ["u4", "u5"]),
    }
    worker, batch = schedule.returned(0)
    others = schedule.lose_worker(worker)
    assert [(t, ids(b)) for t, b in others] == [(2, ["u4", "u5"])] and list(schedule.pending) == [1]
    assert schedule.load == [0, 1]
    assert schedule.resubmit_or_fail(batch + others[0][1], TransientError("worker lost")) == []
    # resubmitted together: one new batch, not a batch per unit
    assert [ids(b) for b in schedule.queue] == [["u0", "u1", "u4", "u5"]] and schedule.stats.resubmitted == 4
    final = schedule.resubmit_or_fail(UNITS[:1], TransientError("worker lost"))  # u0's second loss
    assert [r.unit for r in final] == ["u0"] and "after 2 attempts" in final[0].message
    assert final[0].transient


def test_the_transient_failures_of_one_batch_are_retried_together():
    schedule = BatchSchedule(cut(UNITS[:3], 3), workers=1, in_flight=1, max_retries=1)
    worker, batch = schedule.dispatch([0])
    schedule.sent("a", worker, batch)
    schedule.returned("a")
    flaky = [failure_of(u, TransientError("storage hiccup")) for u in batch[:2]]
    assert schedule.settle(batch, [*flaky, *done(batch[2:])]) == done(batch[2:])
    assert [ids(b) for b in schedule.queue] == [["u0", "u1"]]  # one batch of both, not one each
