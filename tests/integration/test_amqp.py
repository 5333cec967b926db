"""The AMQP transport (tracker issue 9): celeriac on a private RabbitMQ node, driven by the stock Celery client
over pyamqp, with results in the session's Redis result backend (protocol doc section 4).

One RabbitMQ node serves the whole module (it takes seconds to start); every test uses queues of its own, so
what one test leaves in the broker never reaches another. The module is skipped, with the reason, only when
RabbitMQ cannot start on this machine."""

import json
import os
import re
import signal
import threading
import time
import uuid

import pytest
from celery import chain, chord, group
from kombu import Exchange, Queue

from conftest import close_client, make_client
from servers import RabbitServer
from util import TIMEOUT, wait_until

pytestmark = pytest.mark.celeriac_only("celeriac on RabbitMQ")


@pytest.fixture(scope="module")
def rabbit():
    rb = RabbitServer(tls=True)
    try:
        rb.start()
    except Exception as e:  # noqa: BLE001 - any reason it cannot start is the skip reason
        rb.cleanup()
        pytest.skip(f"RabbitMQ cannot start on this machine: {e}")
    yield rb
    rb.cleanup()


@pytest.fixture
def queue():
    return f"it-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def amqp_app(rabbit, redis_server, queue):
    """The stock client on the node, routing to this test's queue by default."""
    app = make_client(rabbit.url(), redis_server.url(1), task_default_queue=queue, broker_connection_retry=False)
    yield app
    close_client(app)


def start(workers, rabbit, queue, *args, **kw):
    return workers.celeriac("-c", "2", "-Q", queue, *args, broker_url=rabbit.url(), **kw)


def sig(app, name, *args, **options):
    return app.signature(name, args, **options)


def test_basic_round_trip_and_many_tasks(amqp_app, workers, rabbit, queue):
    w = start(workers, rabbit, queue)
    assert amqp_app.tasks["native.add"].delay(2, 3).get(timeout=TIMEOUT) == 5
    results = [amqp_app.tasks["native.add"].delay(i, i) for i in range(300)]
    assert [r.get(timeout=TIMEOUT) for r in results] == [2 * i for i in range(300)]
    assert "Connected to amqp://guest:**@127.0.0.1" in w.log()


def test_errors_and_unregistered(amqp_app, workers, rabbit, queue):
    start(workers, rabbit, queue)
    with pytest.raises(ValueError, match="boom"):
        amqp_app.tasks["native.fail"].delay("boom").get(timeout=TIMEOUT)
    r = amqp_app.send_task("native.no_such_task", (1,))
    with pytest.raises(Exception) as e:
        r.get(timeout=TIMEOUT)
    assert "NotRegistered" in type(e.value).__name__ or "NotRegistered" in repr(e.value)
    with pytest.raises(Exception, match="TimeLimitExceeded"):
        amqp_app.tasks["native.sleep_ms"].apply_async((5000,), time_limit=0.5).get(timeout=TIMEOUT)
    assert amqp_app.tasks["native.add"].delay(1, 1).get(timeout=TIMEOUT) == 2  # the pool recovered


def test_incr_counts_in_the_result_backend_redis(amqp_app, workers, rabbit, redis_server, queue):
    """native.incr's contract: the broker's Redis, or the result backend's when the broker is not Redis."""
    start(workers, rabbit, queue)
    key = f"amqp-incr-{queue}"
    results = [amqp_app.tasks["native.incr"].delay(key) for _ in range(5)]
    assert sorted(r.get(timeout=TIMEOUT) for r in results) == [1, 2, 3, 4, 5]
    assert redis_server.client(1).get(key) == b"5"


def test_unusable_messages_are_rejected_to_the_dead_letter_exchange(amqp_app, workers, rabbit, queue):
    """As the stock consumer: an unknown task is rejected (not acked), so a queue's dead-letter exchange keeps
    it, after its NotRegistered FAILURE is stored; a task that ran is acked and never dead-lettered."""
    from kombu import Connection
    dlx = Exchange(f"{queue}-dlx", type="fanout", durable=True)
    dead = Queue(f"{queue}-dead", exchange=dlx, durable=True)
    q = Queue(queue, Exchange(queue, type="direct", durable=True), routing_key=queue,
              queue_arguments={"x-dead-letter-exchange": f"{queue}-dlx"})
    amqp_app.conf.task_queues = [q]  # so that the client declares it as it is
    with Connection(rabbit.url()) as conn:
        dead.bind(conn.default_channel).declare()
        q.bind(conn.default_channel).declare()
    start(workers, rabbit, queue)
    r = amqp_app.send_task("native.no_such_task", (1,), queue=q)
    with pytest.raises(Exception) as e:
        r.get(timeout=TIMEOUT)
    assert "NotRegistered" in type(e.value).__name__ or "NotRegistered" in repr(e.value)
    assert amqp_app.tasks["native.add"].apply_async((2, 3), queue=q).get(timeout=TIMEOUT) == 5
    with Connection(rabbit.url()) as conn:
        channel = conn.default_channel
        got = wait_until(lambda: dead.bind(channel).get(no_ack=True), what="the rejected message dead-lettered")
        assert got.headers["task"] == "native.no_such_task" and got.headers["id"] == r.id
        assert dead.bind(channel).get(no_ack=True) is None  # only that one


def test_priority_on_a_priority_queue_higher_wins(rabbit, redis_server, workers, queue, backend):
    """The client declares the queue with x-max-priority; celeriac consumes it as it is (no
    PRECONDITION_FAILED) and, one at a time, runs the highest priority first."""
    app = make_client(rabbit.url(), redis_server.url(1), task_default_queue=queue,
                      task_queues=[Queue(queue, Exchange(queue), routing_key=queue,
                                         queue_arguments={"x-max-priority": 10})])
    try:
        with app.connection_for_write() as conn:
            app.amqp.queues[queue].bind(conn.default_channel).declare()
        rs = [app.tasks["native.echo"].apply_async((p,), priority=p) for p in (1, 5, 9, 3, 7, 0)]
        w = workers.celeriac("-c", "1", "--prefetch-multiplier", "1", "-Q", queue, broker_url=rabbit.url())
        for r in rs:
            r.get(timeout=TIMEOUT)
        prio = {r.id: p for r, p in zip(rs, (1, 5, 9, 3, 7, 0))}
        order = [prio[i] for i in re.findall(r"native\.echo\[([0-9a-f-]+)\] succeeded", w.log())]
        assert order == sorted(order, reverse=True), order
    finally:
        close_client(app)


def test_eta_tasks_wait_and_do_not_block_the_queue(amqp_app, workers, rabbit, queue):
    start(workers, rabbit, queue, "--prefetch-multiplier", "1")
    t0 = time.time()
    later = [amqp_app.tasks["native.add"].apply_async((i, 0), countdown=2) for i in range(6)]
    assert amqp_app.tasks["native.add"].delay(1, 2).get(timeout=TIMEOUT) == 3
    assert time.time() - t0 < 2, "ETA tasks held the queue (prefetch window not raised)"
    assert [r.get(timeout=TIMEOUT) for r in later] == list(range(6))
    assert time.time() - t0 >= 2


def _ctl_rows(rabbit, what, *items):
    return json.loads(rabbit.ctl(what, *items, "--formatter", "json").stdout)


def test_prefetch_is_the_consumers_own_until_the_window_moves(amqp_app, workers, rabbit, queue):
    """One queue consumed and the window where it started: the limit sits on the one consumer (the same bound,
    which RabbitMQ keeps more cheaply than a channel-wide one). An ETA task moves the window: from then on it is
    the channel's, as Celery sets it, with no per-consumer limit left behind, and RabbitMQ never has more unacked
    than prefetch + the ETA task held."""
    start(workers, rabbit, queue, "--prefetch-multiplier", "2")  # -c 2: a window of 4

    def consumer_limits():
        return [c["prefetch_count"] for c in _ctl_rows(rabbit, "list_consumers", "queue_name", "prefetch_count")
                if c["queue_name"] == queue]

    def unacked():
        rows = _ctl_rows(rabbit, "list_queues", "name", "messages_unacknowledged")
        return [q["messages_unacknowledged"] for q in rows if q["name"] == queue][0]

    assert amqp_app.tasks["native.add"].delay(1, 2).get(timeout=TIMEOUT) == 3
    assert consumer_limits() == [4]
    # Held for the whole test (each rabbitmqctl call takes seconds on a loaded machine); never run: the worker
    # stops first and RabbitMQ puts it back on this test's own queue.
    later = amqp_app.tasks["native.add"].apply_async((2, 2), countdown=120)
    wait_until(lambda: consumer_limits() == [0], what="the consumer made again under the channel's window")
    assert 5 in [c["global_prefetch_count"] for c in _ctl_rows(rabbit, "list_channels", "global_prefetch_count")]
    slow = [amqp_app.tasks["native.sleep_ms"].delay(100) for _ in range(24)]
    seen = []
    while not all(r.ready() for r in slow):
        seen.append(unacked())
        time.sleep(0.05)
    assert seen and max(seen) <= 5, seen
    assert not later.ready()


def test_eta_cap_returns_the_latest_without_spinning(amqp_app, workers, rabbit, queue):
    """--max-eta-reserved on AMQP: the tasks over the cap go back to the queue's tail, and the window closes for
    the pause after each scan (the broker would otherwise hand them straight back, in a loop)."""
    w = workers.celeriac("-c", "1", "-Q", queue, "--max-eta-reserved", "2", "-l", "debug", broker_url=rabbit.url())
    later = [amqp_app.tasks["native.add"].apply_async((i, 0), countdown=3) for i in range(6)]
    t0 = time.time()
    assert amqp_app.tasks["native.add"].delay(1, 2).get(timeout=TIMEOUT) == 3
    assert time.time() - t0 < 2.5
    assert [r.get(timeout=TIMEOUT) for r in later] == list(range(6))
    assert w.log().count("ETA task(s) over --max-eta-reserved to their queues") <= 10


def test_a_returned_eta_task_keeps_what_is_left_of_its_time_to_live(amqp_app, workers, rabbit, queue):
    """The ETA cap publishes a task again on AMQP. Sent with expires, Celery gave its message a time to live (the
    expiration property): the copy put back keeps what is left of it, so RabbitMQ still drops (or dead-letters)
    it once expired, instead of keeping it for good."""
    w = workers.celeriac("-c", "1", "-Q", queue, "--max-eta-reserved", "1", broker_url=rabbit.url())
    later = [amqp_app.tasks["native.add"].apply_async((i, 0), countdown=60, expires=120) for i in range(3)]
    wait_until(lambda: "ETA tasks are held (--max-eta-reserved)" in w.log(), what="the cap to return a task")
    time.sleep(0.3)
    assert workers.stop(w) == 0  # the one held goes back by reject: the broker keeps its properties
    ttls = []
    with amqp_app.connection_for_write() as conn:
        channel = conn.default_channel
        while (m := channel.basic_get(queue, no_ack=True)) is not None:
            ttls.append(m.properties.get("expiration"))
    assert len(ttls) == len(later), ttls
    assert all(t is not None and 0 < int(t) <= 120000 for t in ttls), ttls
    assert any(int(t) < 120000 for t in ttls), ttls  # at least one was published again, with less time left


def test_retry_chain_chord(amqp_app, workers, rabbit, queue):
    w = start(workers, rabbit, queue)
    r = amqp_app.send_task("native.retry_n", (2,))
    r.get(timeout=TIMEOUT)
    assert w.log().count(f"native.retry_n[{r.id}] received") == 3
    c = chain(sig(amqp_app, "native.add", 1, 2), sig(amqp_app, "native.add", 10), sig(amqp_app, "native.add", 100))
    assert c.delay().get(timeout=TIMEOUT) == 113
    ch = chord([sig(amqp_app, "native.add", i, i) for i in range(8)], sig(amqp_app, "native.xsum"))
    assert ch.delay().get(timeout=TIMEOUT) == sum(2 * i for i in range(8))
    g = group(sig(amqp_app, "native.add", i, 1) for i in range(5)).delay()
    assert g.get(timeout=TIMEOUT) == [i + 1 for i in range(5)]


def test_events_on_celeryev(amqp_app, workers, rabbit, queue):
    events = []
    ready = threading.Event()
    stop = threading.Event()

    def run():
        with amqp_app.connection_for_read() as conn:
            recv = amqp_app.events.Receiver(conn, handlers={"*": events.append})
            ready.set()
            while not stop.is_set():
                try:
                    for _ in recv.itercapture(limit=None, timeout=0.2, wakeup=False):
                        if stop.is_set():
                            break
                except Exception:  # noqa: BLE001 - a quiet 0.2 s
                    pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    ready.wait(10)
    time.sleep(0.5)
    try:
        w = start(workers, rabbit, queue, "-E", "-n", f"ev-{queue}@h")
        r = amqp_app.tasks["native.add"].delay(4, 4)
        r.get(timeout=TIMEOUT)
        kinds = lambda: {e["type"] for e in list(events) if e.get("hostname") == f"ev-{queue}@h"}  # noqa: E731
        wait_until(lambda: {"worker-online", "task-received", "task-succeeded"} <= kinds(), what="events")
        wait_until(lambda: "worker-heartbeat" in kinds(), what="a heartbeat")
        ok = [e for e in list(events) if e["type"] == "task-succeeded" and e.get("uuid") == r.id]
        assert ok and ok[0]["result"] == "8"
        workers.stop(w)
        wait_until(lambda: "worker-offline" in kinds(), what="worker-offline")
    finally:
        stop.set()
        t.join(5)


def test_inspect_and_control(amqp_app, workers, rabbit, queue):
    node = f"ctl-{queue}@h"
    start(workers, rabbit, queue, "-n", node)
    insp = amqp_app.control.inspect(destination=[node], timeout=3)
    assert insp.ping() == {node: {"ok": "pong"}}
    stats = insp.stats()[node]
    assert stats["broker"]["transport"] == "amqp" and stats["broker"]["virtual_host"] == "/"
    assert [q["name"] for q in insp.active_queues()[node]] == [queue]
    other = queue + "-b"
    reply = amqp_app.control.add_consumer(other, destination=[node], reply=True, timeout=3)
    assert reply == [{node: {"ok": f"add consumer {other}"}}]
    assert amqp_app.tasks["native.add"].apply_async((5, 5), queue=other).get(timeout=TIMEOUT) == 10
    # The second queue moved the window from the first queue's consumer to the channel: that consumer was
    # cancelled and made again, and still takes work.
    assert amqp_app.tasks["native.add"].delay(6, 6).get(timeout=TIMEOUT) == 12
    amqp_app.control.cancel_consumer(other, destination=[node], reply=True, timeout=3)
    assert [q["name"] for q in insp.active_queues()[node]] == [queue]
    assert amqp_app.tasks["native.add"].delay(7, 7).get(timeout=TIMEOUT) == 14
    assert amqp_app.control.rate_limit("native.add", "100/s", destination=[node], reply=True, timeout=3)


def test_revoke(amqp_app, workers, rabbit, queue):
    node = f"rv-{queue}@h"
    start(workers, rabbit, queue, "-n", node)
    r = amqp_app.tasks["native.add"].apply_async((1, 1), countdown=3)
    amqp_app.control.revoke(r.id, destination=[node], reply=True, timeout=3)
    with pytest.raises(Exception, match="revoked|Revoked"):
        r.get(timeout=TIMEOUT)
    assert r.state == "REVOKED"
    running = amqp_app.tasks["native.sleep_ms"].delay(20000)
    wait_until(lambda: running.state == "STARTED" or node in str(amqp_app.control.inspect(
        destination=[node], timeout=1).active() or {}), what="the sleep to start")
    amqp_app.control.revoke(running.id, terminate=True, destination=[node], reply=True, timeout=3)
    with pytest.raises(Exception):
        running.get(timeout=TIMEOUT)
    assert running.state == "REVOKED"


def test_revoke_while_stopped_applies_after_restart(amqp_app, workers, rabbit, queue):
    """RabbitMQ keeps no revoked set: the one a worker hears is kept in the result backend's Redis, where a
    worker that was down finds it when it comes back."""
    other = f"{queue}-other"
    w1 = start(workers, rabbit, queue, "-n", f"one-{queue}@h")
    start(workers, rabbit, other, "-n", f"two-{queue}@h")
    assert workers.stop(w1) == 0
    r = amqp_app.tasks["native.add"].apply_async((5, 5))  # waits in the queue of the stopped worker
    amqp_app.control.revoke(r.id)  # only two@ hears it
    time.sleep(0.3)
    w = start(workers, rabbit, queue, "-n", f"one-{queue}@h")
    with pytest.raises(Exception, match="revoked|Revoked"):
        r.get(timeout=TIMEOUT)
    assert r.state == "REVOKED"
    assert "Loaded 1 revoked task id(s) from Redis" in w.log()


def test_sigkill_redelivers_unacked(amqp_app, workers, rabbit, queue):
    """--acks-late: a killed worker's unacked messages come back through the broker, to the next worker."""
    w = start(workers, rabbit, queue, "--acks-late")
    slow = amqp_app.tasks["native.sleep_ms"].delay(3000)
    quick = [amqp_app.tasks["native.add"].delay(i, 100) for i in range(4)]
    wait_until(lambda: f"native.sleep_ms[{slow.id}] received" in w.log(), what="the sleep to be received")
    time.sleep(0.3)
    w.kill_group()
    w2 = start(workers, rabbit, queue, "--acks-late")
    assert slow.get(timeout=TIMEOUT) == 3000
    assert [r.get(timeout=TIMEOUT) for r in quick] == [100 + i for i in range(4)]
    assert f"native.sleep_ms[{slow.id}] received" in w2.log()


def test_warm_shutdown_returns_prefetched(amqp_app, workers, rabbit, queue):
    w = workers.celeriac("-c", "1", "-Q", queue, broker_url=rabbit.url())
    slow = amqp_app.tasks["native.sleep_ms"].delay(1500)
    waiting = [amqp_app.tasks["native.add"].delay(i, 0) for i in range(3)]
    wait_until(lambda: f"native.sleep_ms[{slow.id}] received" in w.log(), what="the sleep to be received")
    time.sleep(0.2)
    assert workers.stop(w) == 0
    assert slow.get(timeout=TIMEOUT) == 1500  # finished before the worker left
    start(workers, rabbit, queue)
    assert [r.get(timeout=TIMEOUT) for r in waiting] == [0, 1, 2]


def test_worker_survives_a_broker_restart(amqp_app, workers, rabbit, queue):
    w = start(workers, rabbit, queue)
    assert amqp_app.tasks["native.add"].delay(1, 2).get(timeout=TIMEOUT) == 3
    # Held (unacked) when the connection goes: the broker delivers it again, so the worker must let go of its
    # copy, or it would run twice.
    eta = amqp_app.tasks["native.add"].apply_async((7, 7), countdown=4)
    wait_until(lambda: f"native.add[{eta.id}] received" in w.log(), what="the ETA task to be held")
    rabbit.restart()
    wait_until(lambda: w.log().count("Connected to amqp://") >= 2, timeout=max(TIMEOUT, 60),
               what="celeriac to reconnect")
    assert amqp_app.tasks["native.add"].delay(2, 2).get(timeout=TIMEOUT) == 4
    r = chain(sig(amqp_app, "native.add", 1, 1), sig(amqp_app, "native.add", 1)).delay()
    assert r.get(timeout=TIMEOUT) == 3  # pool children reopen their producer connection too
    assert eta.get(timeout=TIMEOUT) == 14
    time.sleep(0.5)
    assert w.log().count(f"native.add[{eta.id}] succeeded") == 1
    assert "Dropped 1 held ETA task(s)" in w.log()
    assert w.running()


def test_connection_closed_by_the_server(amqp_app, workers, rabbit, queue):
    """rabbitmqctl close_all_connections: the server closes every connection; celeriac reconnects."""
    w = start(workers, rabbit, queue)
    assert amqp_app.tasks["native.add"].delay(1, 2).get(timeout=TIMEOUT) == 3
    rabbit.ctl("close_all_connections", "test")
    wait_until(lambda: "Connection to broker lost" in w.log(), what="the loss to be noticed")
    wait_until(lambda: w.log().count("Connected to amqp://") >= 2, what="celeriac to reconnect")
    assert amqp_app.tasks["native.add"].delay(2, 2).get(timeout=TIMEOUT) == 4


def test_bad_url_and_unreachable_broker():
    from servers import Celeriac, free_port

    out = Celeriac.run(["worker", "-b", "amqp://h:notaport//"])
    assert out.returncode == 2 and "invalid AMQP URL" in (out.stdout + out.stderr)
    out = Celeriac.run(["worker", "-b", f"amqp://127.0.0.1:{free_port()}//"])
    assert out.returncode != 0 and "Cannot connect" in (out.stdout + out.stderr)


def test_cold_shutdown_leaves_messages_to_the_broker(amqp_app, workers, rabbit, queue):
    w = workers.celeriac("-c", "1", "-Q", queue, "--acks-late", broker_url=rabbit.url())
    slow = amqp_app.tasks["native.sleep_ms"].delay(2000)
    wait_until(lambda: f"native.sleep_ms[{slow.id}] received" in w.log(), what="the sleep to be received")
    workers.expect_clean_exit = False
    w.stop(signal.SIGQUIT)
    start(workers, rabbit, queue)
    assert slow.get(timeout=TIMEOUT) == 2000


def test_amqps_with_a_client_certificate(amqp_app, workers, rabbit, queue):
    """TLS (amqps://) with the CA, client certificate and key given as broker_use_ssl-named URL options; the
    node requires a client certificate (fail_if_no_peer_cert)."""
    from servers import Celeriac

    c = rabbit.certs
    base = f"amqps://guest:guest@localhost:{rabbit.tls_port}//?ssl_ca_certs={c['ca']}"
    url = f"{base}&ssl_certfile={c['client_cert']}&ssl_keyfile={c['client_key']}"
    w = workers.celeriac("-c", "1", "-Q", queue, "-n", f"tls-{queue}@h", broker_url=url)
    assert amqp_app.tasks["native.add"].delay(20, 22).get(timeout=TIMEOUT) == 42
    insp = amqp_app.control.inspect(destination=[f"tls-{queue}@h"], timeout=3)
    assert insp.stats()[f"tls-{queue}@h"]["broker"]["ssl"] is True
    assert "Connected to amqps://guest:**@localhost" in w.log()
    out = Celeriac.run(["worker", "-Q", queue, "-b", base])  # no client certificate: refused
    assert out.returncode != 0 and "Cannot connect" in out.stdout + out.stderr


def test_missed_heartbeats_reconnect(amqp_app, workers, rabbit, queue):
    """The node freezes (SIGSTOP): with heartbeat=1 celeriac notices within a few seconds, keeps trying, and
    consumes again once the node is back."""
    w = workers.celeriac("-c", "1", "-Q", queue, broker_url=rabbit.url() + "?heartbeat=1")
    assert amqp_app.tasks["native.add"].delay(1, 1).get(timeout=TIMEOUT) == 2
    with open(os.path.join(rabbit.tmpdir, "rabbit.pid")) as f:
        beam = int(f.read().strip())
    os.kill(beam, signal.SIGSTOP)
    try:
        wait_until(lambda: "Connection to broker lost" in w.log(), timeout=20, what="the missed heartbeats")
    finally:
        os.kill(beam, signal.SIGCONT)
    assert "heartbeat" in w.log().split("Connection to broker lost", 1)[1].splitlines()[0]
    wait_until(lambda: w.log().count("Connected to amqp://") >= 2, timeout=max(TIMEOUT, 60), what="a reconnect")
    assert amqp_app.tasks["native.add"].delay(2, 2).get(timeout=TIMEOUT) == 4


def test_mixed_workflow_with_a_stock_worker(rabbit, redis_server, workers, queue):
    """A stock Python worker on the same node, declaring the same objects (no PRECONDITION_FAILED either way):
    a chain native -> python -> native crosses both, each link published by the worker that ran the previous."""
    native_q, py_q = queue + "-native", queue + "-py"
    nat = workers.celeriac("-c", "2", "-Q", native_q, "--default-queue", py_q, broker_url=rabbit.url())
    py = workers.python("-Q", py_q, "-c", "1", broker_url=rabbit.url(), env={"PYWORKER_NATIVE_QUEUE": native_q})
    app = make_client(rabbit.url(), redis_server.url(1), task_default_queue=py_q,
                      task_routes={"native.*": {"queue": native_q}})
    try:
        r = chain(sig(app, "native.add", 1, 2), sig(app, "py.mul", 10), sig(app, "native.add", 5)).delay()
        assert r.get(timeout=TIMEOUT) == 35
        assert f"[{r.parent.parent.id}]" in nat.log() and f"[{r.id}]" in nat.log()
        wait_until(lambda: f"[{r.parent.id}]" in py.log(), what="py.mul in the stock worker's log")
    finally:
        close_client(app)
