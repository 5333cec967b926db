"""Remote control over the pidbox (tracker issue 5): every inspect command's reply as the stock client parses
it, the `celery inspect` CLI, addressing, revoke (waiting, terminate, across restarts) and shutdown
(protocol doc sections 7, 9, 10, 11)."""

import re
import subprocess
import sys
import time
from datetime import datetime, timezone

import pytest
from celery.exceptions import TaskRevokedError

from util import TIMEOUT, exc_name_of, result_doc, wait_until

pytestmark = pytest.mark.celeriac_only("celeriac's remote control; the node names are celeriac's")


def inspect(app, node, timeout=1.0):
    return app.control.inspect(destination=[node], timeout=timeout)


def only(replies, node):
    """The value of node's reply in an inspect() result, which must hold exactly that node."""
    assert replies is not None and list(replies) == [node], replies
    return replies[node]


def test_inspect_commands(app, workers):
    node = "ctl1@it"
    workers.start("-c", "1", "-n", node, "--prefetch-multiplier", "4")
    running = app.send_task("native.sleep_ms", args=[3000])
    waiting = app.send_task("native.add", args=[1, 2])
    later = app.send_task("native.add", args=[3, 4], countdown=30)
    i = inspect(app, node)
    wait_until(lambda: only(i.active(), node), what="the sleep running")

    assert only(i.ping(), node) == {"ok": "pong"}
    [act] = only(i.active(), node)
    assert act["id"] == running.id and act["name"] == act["type"] == "native.sleep_ms"
    assert act["args"] == [3000] and act["kwargs"] == {} and act["hostname"] == node
    assert act["acknowledged"] is True and isinstance(act["worker_pid"], int)
    assert abs(act["time_start"] - time.time()) < 10
    assert act["delivery_info"]["routing_key"] == "celery"
    reserved = only(i.reserved(), node)
    assert [r["id"] for r in reserved] == [waiting.id] and reserved[0]["args"] == [1, 2]
    [sched] = only(i.scheduled(), node)
    assert sched["request"]["id"] == later.id and sched["request"]["name"] == "native.add"
    assert sched["eta"].startswith(time.strftime("%Y-", time.gmtime()))

    stats = only(i.stats(), node)
    for key in ("total", "pid", "clock", "uptime", "pool", "broker", "prefetch_count", "rusage"):
        assert key in stats, key
    assert stats["total"] == {"native.sleep_ms": 1} and stats["prefetch_count"] == 4
    assert stats["pool"]["max-concurrency"] == 1 and len(stats["pool"]["processes"]) == 1
    # The prefork pool's human_write_stats(): one task written so far (the waiting one is not: fair strategy).
    assert stats["pool"]["writes"] == {"total": 1, "avg": "1.00", "all": "1.00", "raw": "1", "strategy": "fair",
                                       "inqueues": {"total": 1, "active": 0}}
    assert isinstance(stats["clock"], str) and stats["broker"]["transport"] == "redis"
    assert stats["rusage"]["maxrss"] > 0

    registered = only(i.registered(), node)
    assert "native.add" in registered and registered == sorted(registered)
    [queue] = only(i.active_queues(), node)
    assert queue["name"] == queue["routing_key"] == "celery" and queue["exchange"]["type"] == "direct"
    conf = only(i.conf(), node)
    assert conf["broker_url"].startswith("redis://")
    assert "ok" in only(i.report(), node)
    assert isinstance(only(i.clock(), node)["clock"], int)
    assert only(i.revoked(), node) == []
    assert only(i.query_task(running.id), node)[running.id][0] == "active"
    hello = only(i.hello("other@it", {}), node)
    assert hello["revoked"] == {} and isinstance(hello["clock"], int)
    later.revoke()  # leaves nothing held at teardown
    assert running.get(timeout=TIMEOUT) == 3000 and waiting.get(timeout=TIMEOUT) == 3


def test_cli_inspect_ping(redis_server, workers):
    node = "cli@it"
    workers.start("-c", "1", "-n", node)
    out = subprocess.run([sys.executable, "-m", "celery", "-b", redis_server.url(0), "inspect", "ping", "-d", node],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert re.search(rf"->\s+{re.escape(node)}: OK\s+pong", out.stdout) and "1 node online." in out.stdout, out.stdout


def test_addressing_and_unknown_command(app, workers):
    workers.start("-c", "1", "-n", "a@it")
    workers.start("-c", "1", "-n", "b@it")
    replies = app.control.ping(timeout=1)
    assert sorted(next(iter(r)) for r in replies) == ["a@it", "b@it"]
    assert app.control.ping(destination=["b@it"], timeout=1) == [{"b@it": {"ok": "pong"}}]
    assert app.control.broadcast("nosuch", reply=True, destination=["a@it"], timeout=1) == \
        [{"a@it": {"error": "KeyError('nosuch')"}}]


def assert_revoked(backend, r, reason):
    name, exc = exc_name_of(r)
    assert name == "TaskRevokedError" and isinstance(exc, TaskRevokedError), (name, exc)
    doc = result_doc(backend, r.id)
    assert doc["status"] == "REVOKED" and doc["result"]["exc_message"] == [reason], doc


def test_revoke_countdown_task_is_not_run(app, workers, broker, backend):
    node = "rv@it"
    workers.start("-c", "1", "-n", node)
    r = app.send_task("native.incr", args=["revoked-ran"], countdown=2)
    wait_until(lambda: only(inspect(app, node).scheduled(), node), what="the countdown task held")
    reply = app.control.revoke(r.id, reply=True, destination=[node], timeout=1)
    assert reply == [{node: {"ok": f"tasks {r.id} flagged as revoked"}}]
    assert_revoked(backend, r, "revoked")
    assert only(inspect(app, node).revoked(), node) == [r.id]
    time.sleep(2.5)
    assert broker.get("revoked-ran") is None
    # Revoked before it arrives: not run either.
    rid = "00000000-0000-4000-8000-00000000beef"
    app.control.revoke(rid, destination=[node])
    time.sleep(0.3)
    r2 = app.send_task("native.incr", args=["revoked-ran"], task_id=rid)
    assert_revoked(backend, r2, "revoked")
    assert broker.get("revoked-ran") is None


def test_revoke_terminate_stops_a_running_task(app, workers, backend):
    node = "term@it"
    workers.start("-c", "1", "-n", node)
    r = app.send_task("native.sleep_ms", args=[10000])
    wait_until(lambda: only(inspect(app, node).active(), node), what="the task running")
    t0 = time.monotonic()
    reply = app.control.revoke(r.id, terminate=True, reply=True, destination=[node], timeout=1)
    assert reply == [{node: {"ok": f"terminate: {r.id}"}}]
    assert_revoked(backend, r, "terminated")
    assert time.monotonic() - t0 < 2
    assert app.send_task("native.add", args=[1, 1]).get(timeout=TIMEOUT) == 2  # the process was replaced


def test_revoke_while_stopped_applies_after_restart(app, workers, broker, backend):
    w1 = workers.start("-c", "1", "-n", "one@it", "-Q", "q1")
    workers.start("-c", "1", "-n", "two@it", "-Q", "q2")
    assert workers.stop(w1) == 0
    r = app.send_task("native.incr", args=["restart-ran"], queue="q1")
    app.control.revoke(r.id)  # only two@it hears it; it keeps it in Redis
    time.sleep(0.3)
    workers.start("-c", "1", "-n", "one@it", "-Q", "q1")
    assert_revoked(backend, r, "revoked")
    assert broker.get("restart-ran") is None


def test_shutdown_command(app, workers):
    w = workers.start("-c", "1", "-n", "down@it")
    r = app.send_task("native.sleep_ms", args=[500])
    wait_until(lambda: only(inspect(app, "down@it").active(), "down@it"), what="the task running")
    assert app.control.shutdown(destination=["down@it"]) is None  # no reply expected, none waited for
    wait_until(lambda: not w.running(), what="the worker exiting")
    assert w.proc.returncode == 0
    assert r.get(timeout=TIMEOUT) == 500  # warm: the running task finished first
    assert "Got shutdown from remote" in w.log()


def test_rate_limit_spreads_a_burst(app, workers, backend):
    node = "rate@it"
    workers.start("-c", "2", "-n", node, "--prefetch-multiplier", "16")
    assert app.control.rate_limit("native.add", "5/s", destination=[node], reply=True, timeout=1) == \
        [{node: {"ok": "new rate limit set successfully"}}]
    assert app.control.rate_limit("no.such", "5/s", destination=[node], reply=True, timeout=1) == \
        [{node: {"error": "unknown task"}}]
    t0 = time.time()
    burst = [app.send_task("native.add", args=[i, 0]) for i in range(20)]
    other = app.send_task("native.noop")  # another task type is not held up behind them
    assert other.get(timeout=TIMEOUT) is None and time.time() - t0 < 1.5
    assert [r.get(timeout=TIMEOUT) for r in burst] == list(range(20))
    done = sorted(datetime.fromisoformat(result_doc(backend, r.id)["date_done"]).replace(tzinfo=timezone.utc)
                  .timestamp() for r in burst)
    assert 3.4 <= done[-1] - done[0] <= 4.6, done[-1] - done[0]  # 19 gaps of 0.2 s
    assert app.control.rate_limit("native.add", "0", destination=[node], reply=True, timeout=1) == \
        [{node: {"ok": "rate limit disabled successfully"}}]
    t1 = time.time()
    assert [r.get(timeout=TIMEOUT) for r in [app.send_task("native.add", args=[1, i]) for i in range(20)]] == \
        [1 + i for i in range(20)]
    assert time.time() - t1 < 2


def test_time_limit_hard_and_soft(app, workers, backend):
    node = "tl@it"
    workers.start("-c", "1", "-n", node)
    assert app.control.time_limit("native.sleep_ms", hard=1, destination=[node], reply=True, timeout=1) == \
        [{node: {"ok": "time limits set successfully"}}]
    name, _ = exc_name_of(app.send_task("native.sleep_ms", args=[5000]))
    assert name == "TimeLimitExceeded"
    # The soft limit travels with each task of that type to the pool process.
    app.control.time_limit("native.sleep_ms", soft=0.3, hard=10, destination=[node], reply=True, timeout=1)
    name, _ = exc_name_of(app.send_task("native.sleep_ms", args=[1500]))
    assert name == "SoftTimeLimitExceeded"
    assert app.send_task("native.sleep_ms", args=[10]).get(timeout=TIMEOUT) == 10  # under it
    # A message's own limit wins over the type's, as in Celery.
    assert app.send_task("native.sleep_ms", args=[600], soft_time_limit=5).get(timeout=TIMEOUT) == 600
    [reply] = app.control.autoscale(4, 1, destination=[node], reply=True, timeout=1)
    assert "Autoscale not enabled" in reply[node]["error"]


def _pool(app, node):
    return only(inspect(app, node).stats(), node)


def test_pool_grow_shrink_restart(app, workers, backend):
    node = "grow@it"
    workers.start("-c", "1", "-n", node, "--prefetch-multiplier", "2")
    assert app.control.pool_grow(2, destination=[node], reply=True, timeout=1) == [{node: {"ok": "pool will grow"}}]
    stats = _pool(app, node)
    assert stats["pool"]["max-concurrency"] == 3 and len(stats["pool"]["processes"]) == 3
    assert stats["prefetch_count"] == 6  # follows the pool, as Celery's _update_prefetch_count
    sleeps = [app.send_task("native.sleep_ms", args=[1500]) for _ in range(3)]
    wait_until(lambda: len(only(inspect(app, node).active(), node)) == 3, what="three tasks running at once")
    assert [r.get(timeout=TIMEOUT) for r in sleeps] == [1500] * 3

    assert app.control.pool_shrink(2, destination=[node], reply=True, timeout=1) == \
        [{node: {"ok": "pool will shrink"}}]
    wait_until(lambda: len(_pool(app, node)["pool"]["processes"]) == 1, what="two processes leaving")
    stats = _pool(app, node)
    assert stats["pool"]["max-concurrency"] == 1 and stats["prefetch_count"] == 2
    assert [app.send_task("native.add", args=[i, i]).get(timeout=TIMEOUT) for i in range(5)] == [0, 2, 4, 6, 8]
    [reply] = app.control.pool_shrink(1, destination=[node], reply=True, timeout=1)
    assert "below one process" in reply[node]["error"]

    # Restart: the running task finishes in its old process; new tasks run in a new one.
    [old_pid] = _pool(app, node)["pool"]["processes"]
    running = app.send_task("native.sleep_ms", args=[1000])
    wait_until(lambda: only(inspect(app, node).active(), node), what="the sleep running")
    assert app.control.pool_restart(destination=[node], reply=True, timeout=1) == \
        [{node: {"ok": "reload started"}}]
    after = app.send_task("native.add", args=[2, 3])
    assert running.get(timeout=TIMEOUT) == 1000 and after.get(timeout=TIMEOUT) == 5
    wait_until(lambda: _pool(app, node)["pool"]["processes"] not in ([], [old_pid]), what="a new process")
    assert app.control.pool_grow(1, destination=[node], reply=True, timeout=1)  # reuses the shrunk indexes
    wait_until(lambda: len(_pool(app, node)["pool"]["processes"]) == 2, what="grown again")
    assert [r.get(timeout=TIMEOUT) for r in [app.send_task("native.add", args=[1, i]) for i in range(20)]] == \
        [1 + i for i in range(20)]


def test_autoscale(app, workers, backend):
    """--autoscale MAX,MIN as Celery's: start at MIN, one process per reserved task up to MAX, back to MIN once
    AUTOSCALE_KEEPALIVE seconds have passed since the last scale-up; the autoscale command moves the bounds."""
    node = "auto@it"
    workers.start("--autoscale", "3,1", "-n", node, "--prefetch-multiplier", "2", env={"AUTOSCALE_KEEPALIVE": "1"})
    stats = _pool(app, node)
    assert len(stats["pool"]["processes"]) == 1 and stats["prefetch_count"] == 6  # sized for the maximum
    assert stats["autoscaler"] == {"max": 3, "min": 1, "current": 1, "qty": 0}
    sleeps = [app.send_task("native.sleep_ms", args=[1500]) for _ in range(5)]
    wait_until(lambda: len(only(inspect(app, node).active(), node)) == 3, what="grown to three processes")
    assert [r.get(timeout=TIMEOUT) for r in sleeps] == [1500] * 5
    wait_until(lambda: len(_pool(app, node)["pool"]["processes"]) == 1, what="back to one after the keepalive")
    [reply] = app.control.pool_grow(1, destination=[node], reply=True, timeout=1)
    assert reply[node]["error"].startswith("pool_grow is not supported with autoscale")
    assert app.control.autoscale(4, 2, destination=[node], reply=True, timeout=1) == \
        [{node: {"ok": "autoscale now max=4 min=2"}}]
    wait_until(lambda: len(_pool(app, node)["pool"]["processes"]) == 2, what="raised to the new minimum")
    stats = _pool(app, node)
    assert stats["autoscaler"]["max"] == 4 and stats["prefetch_count"] == 8
    assert app.send_task("native.add", args=[2, 2]).get(timeout=TIMEOUT) == 4


def test_add_and_cancel_consumer(app, workers, broker):
    node = "queues@it"
    w = workers.start("-c", "1", "-n", node, "-Q", "q1,q1x")  # q1 is a prefix of q1x: tracking prefixes merge
    i = inspect(app, node)
    assert [q["name"] for q in only(i.active_queues(), node)] == ["q1", "q1x"]
    extra = app.send_task("native.add", args=[5, 5], queue="extra")
    time.sleep(0.5)
    assert not extra.ready()
    assert app.control.add_consumer("extra", destination=[node], reply=True, timeout=1) == \
        [{node: {"ok": "add consumer extra"}}]
    assert extra.get(timeout=TIMEOUT) == 10  # the backlog is taken
    assert app.send_task("native.add", args=[6, 6], queue="extra").get(timeout=TIMEOUT) == 12  # and new ones
    assert [q["name"] for q in only(i.active_queues(), node)] == ["q1", "q1x", "extra"]

    assert app.control.cancel_consumer("q1", destination=[node], reply=True, timeout=1) == \
        [{node: {"ok": "no longer consuming from q1"}}]
    assert [q["name"] for q in only(i.active_queues(), node)] == ["q1x", "extra"]
    left = app.send_task("native.add", args=[1, 1], queue="q1")
    assert app.send_task("native.add", args=[2, 2], queue="q1x").get(timeout=TIMEOUT) == 4
    time.sleep(0.5)
    assert not left.ready() and broker.llen("q1") == 1  # left in its queue for others
    app.control.add_consumer("q1", destination=[node], reply=True, timeout=1)
    assert left.get(timeout=TIMEOUT) == 2
    assert "CLIENT TRACKING unavailable" not in w.log()  # still woken by invalidations, not polling
