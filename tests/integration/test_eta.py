"""ETA, countdown and expires (tracker issue 4, scheduling): an ETA task is held by the worker, unacked and
without taking a pool slot or a prefetch slot, until it is due; `expires` in the past, or reached while the
task waits, gives REVOKED TaskRevokedError('expired') and the task does not run; --max-eta-reserved caps how
many ETA tasks one worker holds, leaving the rest in the queue (protocol doc sections 2.2, 3.3, 3.5, 7)."""

import json
import signal
import time
from datetime import datetime, timedelta, timezone

import pytest
from celery.exceptions import TaskRevokedError

from util import (TIMEOUT, broker_snapshot, exc_name_of, push_raw, queue_messages, result_doc, task_envelope,
                  unacked, unacked_index, wait_until)


def done_at(backend, task_id):
    """date_done of a stored result (naive UTC ISO) as epoch seconds."""
    doc = result_doc(backend, task_id)
    assert doc is not None, f"no result stored for {task_id}"
    return datetime.fromisoformat(doc["date_done"]).replace(tzinfo=timezone.utc).timestamp()


def assert_revoked_expired(backend, r):
    name, exc = exc_name_of(r)
    assert name == "TaskRevokedError" and isinstance(exc, TaskRevokedError), (name, exc)
    doc = result_doc(backend, r.id)
    assert doc["status"] == "REVOKED"
    assert doc["result"] == {"exc_type": "TaskRevokedError", "exc_message": ["expired"],
                             "exc_module": "celery.exceptions"}
    assert doc["traceback"] is None


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


# -- countdown and eta ---------------------------------------------------------------------------------------

def test_countdown_not_ready_before_and_ready_after(app, workers, broker, backend):
    workers.start("-c", "2")
    sent = time.time()
    r = app.send_task("native.add", args=[1, 2], countdown=1.5)
    # Taken by the worker and held (its unacked record exists), but not run yet.
    wait_until(lambda: broker_snapshot(broker) == (0, 1), what="the ETA message held in unacked")
    time.sleep(max(0.0, sent + 0.75 - time.time()))
    assert not r.ready() and result_doc(backend, r.id) is None
    assert r.get(timeout=TIMEOUT) == 3
    assert done_at(backend, r.id) >= sent + 1.5
    wait_until(lambda: broker_snapshot(broker) == (0, 0), what="the ETA message acked")


def test_eta_absolute_time_with_an_offset(app, workers, backend):
    workers.start("-c", "2")
    eta = datetime.now(timezone(timedelta(hours=2))) + timedelta(seconds=1.5)
    r = app.send_task("native.add", args=[2, 3], eta=eta)
    time.sleep(0.5)
    assert not r.ready()
    assert r.get(timeout=TIMEOUT) == 5
    assert done_at(backend, r.id) >= eta.timestamp()


def test_eta_in_the_past_runs_at_once(app, workers):
    workers.start("-c", "2")
    r = app.send_task("native.add", args=[4, 5], eta=datetime.now(timezone.utc) - timedelta(hours=1))
    assert r.get(timeout=TIMEOUT) == 9


def test_eta_task_does_not_block_a_plain_task(app, workers, backend):
    # Prefetch 1 and one process: were held ETA tasks counted against prefetch, the plain task would wait 3 s.
    workers.start("-c", "1", "--prefetch-multiplier", "1")
    later = [app.send_task("native.add", args=[i, 0], countdown=3) for i in range(3)]
    plain = app.send_task("native.add", args=[10, 10])
    assert plain.get(timeout=2.5) == 20
    assert not any(r.ready() for r in later)
    assert [r.get(timeout=TIMEOUT) for r in later] == [0, 1, 2]
    assert done_at(backend, plain.id) < min(done_at(backend, r.id) for r in later)


# -- expires ---------------------------------------------------------------------------------------------------

def test_expires_in_the_past_is_revoked_and_not_run(app, workers, broker, backend):
    w = workers.start("-c", "2")
    r = app.send_task("native.incr", args=["expired-ran"], expires=datetime.now(timezone.utc) - timedelta(seconds=5))
    assert_revoked_expired(backend, r)
    assert broker.get("expired-ran") is None
    wait_until(lambda: broker_snapshot(broker) == (0, 0), what="the expired message acked")
    assert "Discarding revoked task: native.incr[" + r.id + "]" in w.log()


def test_expires_reached_while_waiting_for_eta(app, workers, broker, backend):
    workers.start("-c", "2")
    r = app.send_task("native.incr", args=["eta-expired-ran"], countdown=1, expires=0.5)
    plain = app.send_task("native.incr", args=["plain-ran"])
    assert plain.get(timeout=TIMEOUT) == 1  # the worker took both; the first is held, not refused at once
    assert_revoked_expired(backend, r)
    assert broker.get("eta-expired-ran") is None
    wait_until(lambda: broker_snapshot(broker) == (0, 0), what="the expired message acked")


def test_expires_reached_while_waiting_for_a_free_process(app, workers, broker, backend):
    workers.start("-c", "1", "--track-started")
    busy = app.send_task("native.sleep_ms", args=[1500])
    wait_until(lambda: (d := result_doc(backend, busy.id)) and d["status"] == "STARTED", what="sleep_ms started")
    r = app.send_task("native.incr", args=["queued-expired-ran"], expires=0.5)
    assert busy.get(timeout=TIMEOUT) == 1500
    assert_revoked_expired(backend, r)
    assert broker.get("queued-expired-ran") is None


@pytest.mark.celeriac_only("the stock worker logs and drops such a message without storing a result, so its "
                           "client waits forever")
@pytest.mark.parametrize("field", ["eta", "expires"])
def test_unreadable_time_fails_the_task_with_invalid_task_error(app, workers, broker, backend, field):
    w = workers.start("-c", "2")
    m = task_envelope("native.incr", args=["bad-time-ran"])
    m["headers"][field] = "next tuesday"
    push_raw(broker, m)
    r = app.AsyncResult(m["headers"]["id"])
    name, exc = exc_name_of(r)
    label = "ETA" if field == "eta" else "expires"
    assert name == "InvalidTaskError"
    assert str(exc) == f"invalid {label} value 'next tuesday': unable to parse date string 'next tuesday'"
    assert result_doc(backend, r.id)["status"] == "FAILURE"
    assert broker.get("bad-time-ran") is None
    wait_until(lambda: broker_snapshot(broker) == (0, 0), what="the message acked")
    assert "Received invalid task message: invalid " + label in w.log()
    # And the worker goes on serving.
    assert app.send_task("native.add", args=[1, 1]).get(timeout=TIMEOUT) == 2


# -- visibility timeout ----------------------------------------------------------------------------------------

@pytest.mark.celeriac_only("the stock worker leaves the score of a held ETA task as it was, so any consumer "
                           "restores it after visibility_timeout and it runs twice (celery #2599)")
def test_held_eta_task_is_not_restored_by_the_visibility_timeout(app, workers, broker, backend):
    workers.start("-c", "1", "--visibility-timeout", "2")
    sent = time.time()
    r = app.send_task("native.incr", args=["eta-vt"], countdown=5)
    wait_until(lambda: broker_snapshot(broker) == (0, 1), what="the ETA message held in unacked")
    # A second worker, which restores records older than 2 s every 2 s, would take the message and run it
    # early (and the first would run it again) if the holder let its record age.
    workers.start("-c", "1", "--visibility-timeout", "2")
    time.sleep(3.5)
    assert broker_snapshot(broker) == (0, 1)
    assert time.time() - max(unacked_index(broker).values()) < 2
    assert r.get(timeout=TIMEOUT) == 1
    assert done_at(backend, r.id) >= sent + 5
    time.sleep(0.5)
    assert broker.get("eta-vt") == b"1"


# -- warm shutdown ---------------------------------------------------------------------------------------------

def test_warm_shutdown_returns_held_eta_tasks(app, workers, broker):
    w = workers.start("-c", "1")
    sent = [app.send_task("native.add", args=[i, i], countdown=60) for i in range(3)]
    wait_until(lambda: broker_snapshot(broker) == (0, 3), what="three ETA messages held in unacked")
    assert workers.stop(w) in (0, None)  # None: a stock worker that hung at shutdown (python mode only)
    assert broker_snapshot(broker) == (3, 0)
    assert broker.zcard("unacked_index") == 0
    back = queue_messages(broker)
    assert sorted(m["headers"]["id"] for m in back) == sorted(r.id for r in sent)
    assert all(m["headers"]["eta"] and m["headers"].get("redelivered") is True for m in back)


# -- the cap ---------------------------------------------------------------------------------------------------

BACKLOG = 5000
CAP = 100
PAD = 4000  # bytes of argument per ETA message (twice in it: body and argsrepr), so that holding shows in RSS


@pytest.mark.celeriac_only("--max-eta-reserved is celeriac's (the stock worker holds every ETA task it sees)")
def test_eta_backlog_stays_in_the_queue_beyond_the_cap(app, workers, broker, backend):
    # ASan keeps freed memory in a quarantine (256 MB by default), which would make RSS follow the number of
    # messages that passed through rather than the number held; a small one keeps RSS meaningful.
    w = workers.start("-c", "2", "--max-eta-reserved", CAP,
                      env={"ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0:quarantine_size_mb=4"})
    prefetch = 2 * 4
    time.sleep(0.5)
    rss_idle = rss_kib(w.pid)

    eta = (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat()
    pipe = broker.pipeline(transaction=False)
    for _ in range(BACKLOG):
        m = task_envelope("native.echo", args=["x" * PAD])
        m["headers"]["eta"] = eta
        raw = json.dumps(m)
        pipe.lpush("celery", raw)
    pipe.execute()
    plain = app.send_task("native.add", args=[20, 22])

    # The plain task, queued behind the whole backlog, is still reached within a few seconds.
    assert plain.get(timeout=10) == 42
    # (The plain task's ack may still be on its way, behind the worker's writes.)
    wait_until(lambda: sum(broker_snapshot(broker)) == BACKLOG, what="the plain task acked")
    # Sampled for a while: the worker holds the CAP ETA tasks due first (plus at most a fetch's worth on their
    # way back); the rest stay in the queue.
    rss_max, held_max = 0, 0
    end = time.monotonic() + 4
    while time.monotonic() < end:
        waiting, held = broker_snapshot(broker)
        assert waiting + held == BACKLOG
        assert held <= CAP + prefetch, f"{held} messages unacked"
        held_max = max(held_max, held)
        rss_max = max(rss_max, rss_kib(w.pid))
        time.sleep(0.05)
    assert held_max >= CAP, "the worker did not hold ETA tasks up to its cap"
    assert broker.llen("celery") >= BACKLOG - CAP - prefetch
    # Holding the whole backlog would take at least its raw bytes (~10 KB a message, ~50 MB in all; the decoded
    # body comes on top; without the cap an ASan build grows by ~145 MB here). Allow a third of the raw bytes
    # for the CAP messages held (~2 MB), buffers, ASan's quarantine and allocator slack (~8 MB measured).
    bound_kib = BACKLOG * len(raw) // 3 // 1024
    assert rss_max - rss_idle < bound_kib, f"RSS grew by {rss_max - rss_idle} KiB (idle {rss_idle} KiB)"
    # None of them ran, and the worker stops cleanly, giving back what it held.
    assert workers.stop(w) == 0
    assert broker_snapshot(broker) == (BACKLOG, 0)
    assert len(unacked(broker)) == 0
