"""Broker and backend faults: an ACL user and password (Redis 6+) for every connection, connections dropped by
the server, Redis restarted under load or while a task runs. Nothing may be lost; the worker must reconnect
and go on."""

import json
import re
import time

import pytest

from conftest import close_client, make_client, private_redis
from servers import Celeriac
from util import TIMEOUT, task_envelope, wait_until

pytestmark = pytest.mark.celeriac_only("celeriac's reconnects, log lines and ACL-configured connections")


@pytest.fixture
def aof_redis(workers):
    """A private redis-server with an append-only file, so that its data (queues included) survives the
    restarts these tests do. Workers started on it are stopped before it is."""
    yield from private_redis(workers, ("--appendonly", "yes", "--appendfsync", "always"))


def test_acl_user_and_password(workers, redis_server):
    """The broker, the backend and the tasks' own connection (native.incr) all authenticate as that user."""
    admin = redis_server.client(0)
    admin.execute_command("ACL", "SETUSER", "celeriac-user", "on", ">s3cr3t-pw", "~*", "&*", "+@all")
    try:
        port = redis_server.port
        broker = f"redis://celeriac-user:s3cr3t-pw@127.0.0.1:{port}/0"
        backend = f"redis://celeriac-user:s3cr3t-pw@127.0.0.1:{port}/1"
        w = workers.start("-c", "1", "-l", "debug", broker_url=broker, backend_url=backend)
        app = make_client(broker, backend)
        try:
            assert app.send_task("native.add", args=[20, 22]).get(timeout=TIMEOUT) == 42
            assert app.send_task("native.incr", args=["acl-counter"]).get(timeout=TIMEOUT) == 1
        finally:
            close_client(app)
        assert "s3cr3t-pw" not in w.log()
        assert admin.get("acl-counter") == b"1"
    finally:
        admin.execute_command("ACL", "DELUSER", "celeriac-user")


def test_without_blmove_the_idle_worker_waits_on_invalidations(workers, redis_server):
    """An ACL that forbids BLMOVE: the idle wait falls back to the key invalidations (of the queue's own list
    too, from then on), with a warning."""
    admin = redis_server.client(0)
    admin.execute_command("ACL", "SETUSER", "celeriac-noblock", "on", ">pw", "~*", "&*", "+@all", "-blmove")
    try:
        port = redis_server.port
        broker = f"redis://celeriac-noblock:pw@127.0.0.1:{port}/0"
        backend = f"redis://celeriac-noblock:pw@127.0.0.1:{port}/1"
        w = workers.start("-c", "1", "-l", "debug", broker_url=broker, backend_url=backend)
        app = make_client(broker, backend)
        try:
            for i in range(3):  # the worker idle before each one
                assert app.send_task("native.add", args=[i, 1]).get(timeout=TIMEOUT) == i + 1
                time.sleep(0.2)
        finally:
            close_client(app)
        assert "BLMOVE failed" in w.log() and "waiting on invalidations alone" in w.log()
        # The queue's own list is tracked again once BLMOVE failed (else only the once-a-second poll finds them).
        assert "Woken by a message in queue celery (priority 0)" in w.log()
        assert admin.llen("celery") == 0 and admin.hlen("unacked") == 0
    finally:
        admin.execute_command("ACL", "DELUSER", "celeriac-noblock")


def test_wrong_password_is_a_clear_error(workers, redis_server):
    admin = redis_server.client(0)
    admin.execute_command("ACL", "SETUSER", "celeriac-user2", "on", ">right-pw", "~*", "&*", "+@all")
    try:
        url = f"redis://celeriac-user2:wrong-pw@127.0.0.1:{redis_server.port}/0"
        w = Celeriac(["-c", "1"], broker_url=url, backend_url=url)
        w.start()
        try:
            rc = w.proc.wait(timeout=TIMEOUT)
            log = w.log()
        finally:
            w.cleanup()
        assert rc == 1
        assert "authentication" in log and "wrong-pw" not in log
    finally:
        admin.execute_command("ACL", "DELUSER", "celeriac-user2")


def test_redis_restart_in_the_middle_of_a_stream_loses_nothing(workers, aof_redis):
    """5,000 acks_late native.incr tasks, each on its own counter; Redis (with an append-only file, so that
    the queue itself survives) is restarted while celeriac works through them. Every task gets its SUCCESS
    result and every counter is at least 1: nothing is lost. A task running at the restart may run again
    (that is what acks_late promises), so counters above 1 are bounded by what the worker held."""
    rs = aof_redis
    broker, backend = rs.client(0), rs.client(1)
    n, ids, pipe = 5000, [], broker.pipeline(transaction=False)
    for i in range(n):
        env = task_envelope("native.incr", args=[f"stream:{i}"])
        ids.append(env["headers"]["id"])
        pipe.lpush("celery", json.dumps(env))
    pipe.execute()
    w = workers.start("-c", "2", "--acks-late", "--visibility-timeout", "2", "--prefetch-multiplier", "1",
                      broker_url=rs.url(0), backend_url=rs.url(1))
    wait_until(lambda: broker.llen("celery") < n - 500, what="the worker under way")
    rs.restart()
    def finished():
        return (broker.llen("celery") == 0 and broker.hlen("unacked") == 0 and
                sum(1 for v in backend.mget([f"celery-task-meta-{t}" for t in ids]) if v) == n)
    wait_until(finished, timeout=120, what="every task run and its result stored after the restart")
    counts = [int(v or 0) for v in broker.mget([f"stream:{i}" for i in range(n)])]
    zero = [i for i, c in enumerate(counts) if c == 0]
    assert not zero, f"{len(zero)} tasks lost: " + str([backend.get(f"celery-task-meta-{ids[i]}") for i in zero[:3]])
    assert sum(c - 1 for c in counts) <= 4  # at most what -c 2 with multiplier 1 held at the restart
    docs = [json.loads(v) for v in backend.mget([f"celery-task-meta-{t}" for t in ids])]
    assert {d["status"] for d in docs} == {"SUCCESS"}
    assert w.running()
    assert "Reconnected" in w.log()


def test_dropped_connections_are_reopened(app, workers, broker):
    """Every connection of the worker killed by the server (CLIENT KILL): it reconnects, says so, and
    consumes again; no silent stall (celery #8091)."""
    w = workers.start("-c", "2")
    assert app.send_task("native.add", args=[1, 1]).get(timeout=TIMEOUT) == 2
    broker.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
    broker.execute_command("CLIENT", "KILL", "TYPE", "pubsub", "SKIPME", "yes")
    results = [app.send_task("native.add", args=[i, i]) for i in range(50)]
    assert [r.get(timeout=TIMEOUT) for r in results] == [2 * i for i in range(50)]
    w.wait_log(re.compile(r"Connection to broker lost"), TIMEOUT)
    w.wait_log(re.compile(r"Reconnected to"), TIMEOUT)


def test_result_computed_while_redis_is_down_is_written_when_it_is_back(workers, aof_redis):
    rs = aof_redis
    env = task_envelope("native.sleep_ms", args=[1500])
    rs.client(0).lpush("celery", json.dumps(env))
    w = workers.start("-c", "1", broker_url=rs.url(0), backend_url=rs.url(1))
    w.wait_log(re.compile(re.escape(f"native.sleep_ms[{env['headers']['id']}] received")), TIMEOUT)
    rs.stop()
    w.wait_log(re.compile(re.escape(f"native.sleep_ms[{env['headers']['id']}] succeeded")), TIMEOUT)
    time.sleep(0.5)
    rs.start()
    backend = rs.client(1)
    wait_until(lambda: backend.get(f"celery-task-meta-{env['headers']['id']}"), timeout=TIMEOUT,
               what="the result stored after Redis came back")
    doc = json.loads(backend.get(f"celery-task-meta-{env['headers']['id']}"))
    assert doc["status"] == "SUCCESS" and doc["result"] == 1500
    assert w.running()
