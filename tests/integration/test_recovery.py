"""Never losing a message: warm shutdown, crash recovery through kombu's unacked records and visibility
timeout, in both directions between celeriac and the stock Python worker (protocol doc sections 3.4, 3.5)."""

import json
import os
import re
import signal
import time
import uuid

import pytest

from conftest import close_client, make_client
from servers import RedisServer
from util import (TIMEOUT, broker_snapshot, exc_name_of, queue_messages, result_doc, task_envelope, unacked,
                  wait_unacked_older_than, wait_until)


def wait_started(backend, task_id):
    wait_until(lambda: (d := result_doc(backend, task_id)) and d["status"] == "STARTED",
               what=f"task {task_id} STARTED")


def wait_drained(broker):
    wait_until(lambda: broker_snapshot(broker) == (0, 0) and broker.zcard("unacked_index") == 0,
               what="queue drained and nothing left unacked")


# -- warm shutdown ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_warm_shutdown_finishes_running_and_returns_prefetched(app, workers, broker, backend, sig):
    running = app.send_task("native.sleep_ms", args=[1500])
    later = [app.send_task("native.incr", args=["after"]) for _ in range(4)]
    originals = {json.loads(m)["headers"]["id"]: json.loads(m) for m in broker.lrange("celery", 0, -1)}
    w = workers.start("-c", "1", "--prefetch-multiplier", "2", "--track-started")
    wait_started(backend, running.id)
    held = wait_until(lambda: unacked(broker), what="a prefetched message held in unacked")
    assert w.stop(sig, TIMEOUT) == 0, f"exit code after {sig!s}"

    # The running task finished and its result is stored.
    doc = result_doc(backend, running.id)
    assert doc["status"] == "SUCCESS" and doc["result"] == 1500
    # Nothing else ran; the four others are all back on the queue and nothing is left unacked.
    assert broker.get("after") is None
    assert broker_snapshot(broker) == (4, 0)
    assert broker.zcard("unacked_index") == 0
    back = queue_messages(broker)
    assert sorted(m["headers"]["id"] for m in back) == sorted(r.id for r in later)
    for m in back:
        orig = originals[m["headers"]["id"]]
        assert m["body"] == orig["body"]
        assert m["properties"]["delivery_tag"] == orig["properties"]["delivery_tag"]
        if m["properties"]["delivery_tag"] in held:  # restored ones carry kombu's redelivered marks
            assert m["headers"].get("redelivered") is True
            assert m["properties"]["delivery_info"].get("redelivered") is True
    # And they are whole: a new worker runs each exactly once.
    workers.start("-c", "1")
    assert sorted(r.get(timeout=TIMEOUT) for r in later) == [1, 2, 3, 4]
    wait_drained(broker)


def test_warm_shutdown_when_idle(workers):
    w = workers.start("-c", "2")
    assert w.stop(signal.SIGTERM, TIMEOUT) == 0


# -- crash recovery --------------------------------------------------------------------------------------

def crash_holding_messages(app, broker, backend, start, kill, acks_late):
    """Publishes sleep_ms(1200) + 3 x incr('crash'), starts a worker (-c 1, multiplier 2), waits until it runs
    the sleep and holds prefetched messages in `unacked`, then kills it. Returns (sleep result, incr results,
    tags left in unacked)."""
    running = app.send_task("native.sleep_ms", args=[1200])
    incrs = [app.send_task("native.incr", args=["crash"]) for _ in range(3)]
    sleep_tag = json.loads(broker.lrange("celery", -1, -1)[0])["properties"]["delivery_tag"]
    flags = ["-c", "1", "--prefetch-multiplier", "2", "--track-started"] + (["--acks-late"] if acks_late else [])
    w = start(*flags)
    wait_started(backend, running.id)
    wait_until(lambda: any(t != sleep_tag for t in unacked(broker)), what="a prefetched message in unacked")
    held = set(unacked(broker))
    kill(w)
    assert set(unacked(broker)) >= held, "records disappeared when the worker was killed"
    if acks_late:
        assert sleep_tag in held, "acks-late: the running task must still be unacked"
    return running, incrs, set(unacked(broker))


@pytest.mark.parametrize("acks_late", [True, False], ids=["acks-late", "early-ack"])
@pytest.mark.parametrize("restorer", ["python", "same"])
def test_restore_after_a_killed_worker(app, workers, broker, backend, acks_late, restorer):
    """(a) A SIGKILLed celeriac leaves kombu-format records that a stock Python worker (visibility_timeout 2)
    restores and runs; and a second celeriac does the same ("same")."""
    running, incrs, held = crash_holding_messages(app, broker, backend, workers.start, lambda w: w.kill(),
                                                  acks_late)
    assert broker.get("crash") is None
    wait_unacked_older_than(broker, 2)
    if restorer == "python":
        workers.python("-c", "1", "--visibility-timeout", "2")
    else:
        workers.start("-c", "1", "--visibility-timeout", "2")
    assert sorted(r.get(timeout=TIMEOUT) for r in incrs) == [1, 2, 3]
    if acks_late:
        assert running.get(timeout=TIMEOUT) == 1200
    wait_drained(broker)
    assert int(broker.get("crash")) == 3


def test_celeriac_restores_what_a_killed_python_worker_left(app, workers, broker, backend):
    """(b) A stock Python worker (acks_late) is killed with its children; celeriac first leaves the records
    alone while they are younger than its visibility timeout, then with --visibility-timeout 2 restores and
    runs them."""
    running, incrs, held = crash_holding_messages(app, broker, backend, workers.python,
                                                  lambda w: w.kill_group(), acks_late=True)
    # Default visibility timeout (3600 s): the records are too young to restore.
    w1 = workers.start("-c", "1")
    assert app.send_task("native.noop").get(timeout=TIMEOUT) is None
    assert set(unacked(broker)) == held, "a 3600 s visibility timeout restored records a few seconds old"
    assert running.state in ("STARTED", "PENDING")
    assert workers.stop(w1) in (0, None)  # None: a stock worker that hung at shutdown (python mode only)
    assert set(unacked(broker)) == held
    # Now old enough for --visibility-timeout 2.
    wait_unacked_older_than(broker, 2)
    workers.start("-c", "1", "--visibility-timeout", "2")
    assert sorted(r.get(timeout=TIMEOUT) for r in incrs) == [1, 2, 3]
    assert running.get(timeout=TIMEOUT) == 1200
    wait_drained(broker)


def _plant_unacked(broker, env, age, queue="celery"):
    """An unacked record exactly as kombu writes it (section 3.4), delivered `age` seconds ago."""
    tag = env["properties"]["delivery_tag"]
    broker.hset("unacked", tag, json.dumps([env, "", queue]))
    broker.zadd("unacked_index", {tag: time.time() - age})
    return tag


def test_restore_puts_the_message_back_with_redelivered_marks(app, workers, broker):
    env = task_envelope("native.incr", args=["planted"])
    tag = _plant_unacked(broker, env, age=60)
    # The worker consumes another queue, so the restored message stays where it can be inspected.
    workers.start("-c", "1", "-Q", "elsewhere", "--visibility-timeout", "2")
    assert app.send_task("native.noop", queue="elsewhere").get(timeout=TIMEOUT) is None
    wait_until(lambda: broker.llen("celery") == 1, what="the restored message on queue celery")
    [m] = queue_messages(broker)
    assert m["headers"]["redelivered"] is True
    assert m["properties"]["delivery_info"]["redelivered"] is True
    assert m["properties"]["delivery_tag"] == tag
    assert m["body"] == env["body"] and m["headers"]["id"] == env["headers"]["id"]
    wait_until(lambda: not broker.hexists("unacked", tag) and broker.zscore("unacked_index", tag) is None,
               what="the record removed")
    wait_until(lambda: not broker.exists("unacked_mutex"), what="unacked_mutex released")
    assert broker.get("planted") is None


def test_young_records_are_not_restored(app, workers, broker):
    env = task_envelope("native.incr", args=["young"])
    tag = _plant_unacked(broker, env, age=0)
    workers.start("-c", "1", "--visibility-timeout", "60")
    assert app.send_task("native.noop").get(timeout=TIMEOUT) is None
    assert broker.hexists("unacked", tag) and broker.zscore("unacked_index", tag) is not None
    assert broker.get("young") is None


def test_restore_respects_the_unacked_mutex(app, workers, broker):
    """Someone else holds unacked_mutex: no restore, and the mutex is left as it is."""
    env = task_envelope("native.incr", args=["mutex"])
    tag = _plant_unacked(broker, env, age=60)
    token = "another-restorer-" + uuid.uuid4().hex
    broker.set("unacked_mutex", token, px=300000)
    workers.start("-c", "1", "--visibility-timeout", "2")
    assert app.send_task("native.noop").get(timeout=TIMEOUT) is None
    assert broker.hexists("unacked", tag)
    assert broker.get("unacked_mutex") == token.encode()
    assert broker.get("mutex") is None


def test_planted_record_is_restored_and_run_once(app, workers, broker):
    env = task_envelope("native.incr", args=["planted-run"])
    _plant_unacked(broker, env, age=60)
    workers.start("-c", "1", "--visibility-timeout", "2")
    assert app.AsyncResult(env["headers"]["id"]).get(timeout=TIMEOUT) == 1
    wait_drained(broker)
    assert broker.get("planted-run") == b"1"


# -- the broker goes away ---------------------------------------------------------------------------------

def test_worker_survives_a_redis_restart(workers):
    rs = RedisServer()
    rs.start()
    try:
        w = workers.start("-c", "1", broker_url=rs.url(0), backend_url=rs.url(1))
        c1 = make_client(rs.url(0), rs.url(1))
        try:
            assert c1.send_task("native.add", args=[1, 2]).get(timeout=TIMEOUT) == 3
        finally:
            close_client(c1)
        rs.restart()
        c2 = make_client(rs.url(0), rs.url(1))
        try:
            assert c2.send_task("native.add", args=[2, 2]).get(timeout=2 * TIMEOUT) == 4
        finally:
            close_client(c2)
        assert w.running()
        # Stopped here, while its Redis is still up; the exit code must be 0 as at any warm shutdown
        # (None: the stock worker hung in its pool shutdown and was killed; python mode only).
        assert workers.stop(w) in (0, None)
    finally:
        for w in workers.workers:
            if w.running():
                w.stop()
        rs.cleanup()


# -- the idle wait: BLMOVE into the worker's inbox (broker.h, DESIGN) --------------------------------------

_inbox_only = pytest.mark.celeriac_only("celeriac's own idle wait (kombu waits in BRPOP)")

INBOXES = "celeriac.inboxes"


def fd_links(pid):
    links = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:  # closed meanwhile
            pass
    return links


def pool_children(w):
    return [int(p) for p in open(f"/proc/{w.proc.pid}/task/{w.proc.pid}/children").read().split()]


def inbox_keys(broker):
    return sorted(k.decode() for k in broker.scan_iter("celeriac.inbox.*"))


@_inbox_only
def test_idle_wait_registers_its_inbox_and_leaves_nothing_behind(app, workers, broker):
    w = workers.start("-c", "1")
    for i in range(3):  # each one taken by the waiting BLMOVE, the worker idle in between
        assert app.send_task("native.add", args=[i, 1]).get(timeout=TIMEOUT) == i + 1
        time.sleep(0.1)
    [(inbox, value)] = broker.hgetall(INBOXES).items()
    deadline, queue = value.decode().split(" ", 1)
    assert queue == "celery" and float(deadline) > time.time()
    assert inbox.decode().startswith("celeriac.inbox.") and broker.llen(inbox) == 0
    wait_drained(broker)
    assert w.stop(signal.SIGTERM, TIMEOUT) == 0
    assert broker.hlen(INBOXES) == 0 and inbox_keys(broker) == []
    assert broker_snapshot(broker) == (0, 0)


@_inbox_only
def test_priority_message_reaches_a_worker_waiting_on_the_base_list(app, workers, broker):
    """The BLMOVE waits on the queue's base list; a message in a priority sub-list wakes the worker through the
    key invalidations."""
    workers.start("-c", "1")
    assert app.send_task("native.noop").get(timeout=TIMEOUT) is None
    time.sleep(0.2)
    r = app.send_task("native.add", args=[40, 2], priority=9)
    assert r.get(timeout=TIMEOUT) == 42


@_inbox_only
def test_an_idle_worker_is_woken_only_by_what_its_wait_does_not_take(app, workers, broker):
    """While a BLMOVE waits on the queue's base list, pushes to that list (and the result keys, which start with
    the queue's name) wake nobody but the BLMOVE: only the priority sub-lists are tracked."""
    w = workers.start("-c", "1", "-l", "debug")
    for i in range(3):  # the worker idle before each one
        time.sleep(0.2)
        assert app.send_task("native.add", args=[i, 1]).get(timeout=TIMEOUT) == i + 1
    time.sleep(0.2)
    assert app.send_task("native.add", args=[40, 2], priority=9).get(timeout=TIMEOUT) == 42
    woken = [line.split("] ", 1)[1] for line in w.log().splitlines() if "Woken by" in line]
    assert woken and set(woken) == {"Woken by a message in queue celery (priority 9)"}, woken


@_inbox_only
def test_a_killed_idle_worker_takes_nothing_with_it(app, workers, broker):
    w = workers.start("-c", "1")
    assert app.send_task("native.noop").get(timeout=TIMEOUT) is None
    time.sleep(0.2)  # waiting in BLMOVE now
    w.kill()
    r = app.send_task("native.incr", args=["after-kill"])
    time.sleep(0.3)
    assert broker_snapshot(broker) == (1, 0), "the dead worker's BLMOVE took a message"
    workers.start("-c", "1")
    assert r.get(timeout=TIMEOUT) == 1


@_inbox_only
def test_an_orphaned_inbox_goes_back_to_its_queue_once_its_lease_ran_out(app, workers, broker):
    """A worker killed between its BLMOVE and the record leaves the message in its inbox; any worker puts it
    back on the queue (oldest next) once the lease is past, and leaves a live worker's inbox alone."""
    first = task_envelope("native.incr", args=["orphan-1"])
    second = task_envelope("native.incr", args=["orphan-2"])
    dead, alive = "celeriac.inbox.deadbeef", "celeriac.inbox.alive"
    broker.lpush(dead, json.dumps(first))   # BLMOVE pushes at the left: first is the oldest (right end)
    broker.lpush(dead, json.dumps(second))
    broker.hset(INBOXES, dead, f"{time.time() - 1:.6f} celery")
    kept = task_envelope("native.incr", args=["alive"])
    broker.lpush(alive, json.dumps(kept))
    broker.hset(INBOXES, alive, f"{time.time() + 600:.6f} celery")
    # Consuming another queue, so the messages put back stay where their order can be seen.
    w = workers.start("-c", "1", "-Q", "elsewhere", "--visibility-timeout", "2")
    wait_until(lambda: broker.llen("celery") == 2, what="the orphaned inbox back on its queue")
    assert [m["headers"]["id"] for m in queue_messages(broker)] == \
        [first["headers"]["id"], second["headers"]["id"]], "not in the order they were taken"
    assert not broker.exists(dead) and not broker.hexists(INBOXES, dead)
    assert broker.llen(alive) == 1 and broker.hexists(INBOXES, alive)
    assert "inboxes of workers gone back" in w.log()
    workers.stop(w)
    workers.start("-c", "1")
    assert app.AsyncResult(first["headers"]["id"]).get(timeout=TIMEOUT) == 1
    assert app.AsyncResult(second["headers"]["id"]).get(timeout=TIMEOUT) == 1
    assert broker.get("orphan-1") == b"1" and broker.get("orphan-2") == b"1" and broker.get("alive") is None


@_inbox_only
def test_a_big_message_taken_by_the_idle_wait_is_recorded_in_kombus_format(app, workers, broker):
    """From 1 MiB on, the worker writes the unacked record itself (MULTI: HSET, ZADD, LTRIM of the inbox) instead
    of the record script: the record must be byte for byte what kombu (and the script) would write."""
    w = workers.start("-c", "1", "--acks-late")
    assert app.send_task("native.noop").get(timeout=TIMEOUT) is None
    # The only pool process busy (so the main process waits itself) and then stopped: the big task cannot
    # start, so its record stays while we look.
    busy = app.send_task("native.sleep_ms", args=[200])
    wait_until(lambda: broker.llen("celery") == 0 and broker.hlen("unacked") == 1, what="the sleep taken")
    [child] = pool_children(w)
    os.kill(child, signal.SIGSTOP)
    try:
        ltrims = broker.info("commandstats").get("cmdstat_ltrim", {}).get("calls", 0)
        big = "x" * (3 << 20)
        env = task_envelope("native.echo", args=[big])
        raw = json.dumps(env)
        broker.lpush("celery", raw)
        tag = env["properties"]["delivery_tag"]
        wait_until(lambda: broker.hexists("unacked", tag), what="the big message recorded as unacked")
        assert broker.hget("unacked", tag) == ('[' + raw + ', "", "celery"]').encode()
        assert broker.zscore("unacked_index", tag) is not None
        assert broker.info("commandstats")["cmdstat_ltrim"]["calls"] == ltrims + 1, "not the client's record"
        # Read straight into a memfd, which the worker holds with the delivery (and the pool process maps).
        assert any("celeriac-message" in link for link in fd_links(w.proc.pid))
        assert inbox_keys(broker) == [] or all(broker.llen(k) == 0 for k in inbox_keys(broker))
    finally:
        os.kill(child, signal.SIGCONT)
    assert busy.get(timeout=TIMEOUT) == 200
    doc = app.AsyncResult(env["headers"]["id"]).get(timeout=TIMEOUT)
    assert doc == {"args": [big], "kwargs": {}}
    wait_drained(broker)


@_inbox_only
def test_an_early_acked_message_from_the_idle_wait_only_leaves_the_inbox(app, workers, broker):
    """Taken by the BLMOVE and acked in the same pass (it went straight to a process): no unacked record is
    written for it, the inbox just lets it go (LTRIM)."""
    workers.start("-c", "1")
    assert app.send_task("native.noop").get(timeout=TIMEOUT) is None

    def calls(cmd):
        return broker.info("commandstats").get(f"cmdstat_{cmd}", {}).get("calls", 0)

    time.sleep(0.2)
    hsets, ltrims = calls("hset"), calls("ltrim")
    for i in range(3):
        assert app.send_task("native.add", args=[i, i]).get(timeout=TIMEOUT) == 2 * i
        time.sleep(0.2)
    assert calls("ltrim") == ltrims + 3
    assert calls("hset") <= hsets + 1  # at most the inbox lease's renewal; no unacked record
    wait_drained(broker)
    assert [broker.llen(k) for k in inbox_keys(broker)] in ([], [0])


# -- the idle wait lent to a pool process (worker/lentwait.h) ---------------------------------------------

@_inbox_only
def test_the_idle_wait_is_lent_to_a_pool_process(app, workers, broker):
    """An idle worker's pool process waits for the next message itself and runs it at once; the main process
    does the bookkeeping (ack, events, logs) when it hears of it. What a process may not decide alone (an ETA)
    it leaves to the main process."""
    w = workers.start("-c", "2", "-l", "debug")
    for i in range(4):
        assert app.send_task("native.add", args=[i, 1]).get(timeout=TIMEOUT) == i + 1
        time.sleep(0.1)
    assert len(re.findall(r"native\.add\[[^]]+\] taken by pool process \d+, which waited for it", w.log())) >= 3
    later = app.send_task("native.add", args=[5, 5], countdown=0.5)
    assert later.get(timeout=TIMEOUT) == 10
    assert f"native.add[{later.id}] taken by pool process" not in w.log()
    wait_drained(broker)
    assert [broker.llen(k) for k in inbox_keys(broker)] in ([], [0])
    assert w.stop(signal.SIGTERM, TIMEOUT) == 0
    assert broker.hlen(INBOXES) == 0 and inbox_keys(broker) == []


@_inbox_only
def test_a_pool_process_killed_while_it_waits_loses_nothing(app, workers, broker):
    w = workers.start("-c", "1")
    assert app.send_task("native.noop").get(timeout=TIMEOUT) is None
    time.sleep(0.2)  # its pool process waits in BLMOVE now
    [child] = pool_children(w)
    os.kill(child, signal.SIGKILL)
    wait_until(lambda: pool_children(w) and pool_children(w) != [child], what="the pool process replaced")
    r = app.send_task("native.incr", args=["after-child-kill"])
    assert r.get(timeout=TIMEOUT) == 1
    assert [app.send_task("native.add", args=[i, i]).get(timeout=TIMEOUT) for i in range(3)] == [0, 2, 4]
    wait_drained(broker)
    assert broker.get("after-child-kill") == b"1"


@_inbox_only
def test_a_waiting_pool_process_is_recalled_for_work(app, workers, broker):
    """The main process takes its wait back when it has work for the only process (here: a priority message,
    found through the key invalidations, while the process waits on the base list)."""
    workers.start("-c", "1")
    assert app.send_task("native.noop").get(timeout=TIMEOUT) is None
    time.sleep(0.2)
    rs = [app.send_task("native.add", args=[i, 1], priority=9) for i in range(3)]
    assert [r.get(timeout=TIMEOUT) for r in rs] == [1, 2, 3]
    assert app.send_task("native.add", args=[9, 1]).get(timeout=TIMEOUT) == 10
    wait_drained(broker)


@_inbox_only
def test_a_task_that_kills_the_process_which_waited_for_it_runs_once(app, workers):
    w = workers.start("-c", "1", "--enable-test-tasks")
    assert app.send_task("native.noop").get(timeout=TIMEOUT) is None
    time.sleep(0.2)
    crashed = app.send_task("native.crash", args=["segfault"])
    name, _ = exc_name_of(crashed)
    assert name == "WorkerLostError"
    assert app.send_task("native.add", args=[1, 1]).get(timeout=TIMEOUT) == 2
    assert w.log().count(f"native.crash[{crashed.id}] received") == 1


@_inbox_only
def test_a_long_task_taken_by_a_waiting_process_does_not_hold_up_the_next(app, workers):
    """The process that waited runs what it took and waits again after a short task; a long one ends the lend
    (its watchdog says so while it runs), so the next message goes to the other process meanwhile."""
    workers.start("-c", "2")
    assert app.send_task("native.noop").get(timeout=TIMEOUT) is None
    time.sleep(0.2)
    slow = app.send_task("native.sleep_ms", args=[3000])
    time.sleep(0.3)
    assert app.send_task("native.add", args=[2, 3]).get(timeout=TIMEOUT) == 5
    assert not slow.ready(), "the second message waited for the long task"
    assert slow.get(timeout=TIMEOUT) == 3000


@_inbox_only
def test_a_crash_right_after_a_task_the_same_process_waited_for(app, workers, backend):
    """The process runs a short task, waits again at once, takes the next one and dies in it, perhaps before the
    main process has even read about the first: the first keeps its SUCCESS, the second gets WorkerLostError,
    each runs once."""
    w = workers.start("-c", "1", "--enable-test-tasks")
    assert app.send_task("native.noop").get(timeout=TIMEOUT) is None
    time.sleep(0.2)
    for i in range(3):
        first = app.send_task("native.add", args=[i, 1])
        crashed = app.send_task("native.crash", args=["segfault"])
        assert first.get(timeout=TIMEOUT) == i + 1
        name, _ = exc_name_of(crashed)
        assert name == "WorkerLostError"
        time.sleep(0.3)
        assert result_doc(backend, first.id)["status"] == "SUCCESS"
        assert w.log().count(f"native.crash[{crashed.id}] received") == 1
        assert w.log().count(f"native.add[{first.id}] received") == 1
    assert app.send_task("native.add", args=[1, 1]).get(timeout=TIMEOUT) == 2


def command_calls(broker, cmd):
    return broker.info("commandstats").get(f"cmdstat_{cmd}", {}).get("calls", 0)


def tcp_ports(pid):
    """The local ports of pid's TCP sockets (IPv4 and IPv6)."""
    inodes = {link[8:-1] for link in fd_links(pid) if link.startswith("socket:[")}
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[9] in inodes:
                    ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


def wait_lent(w, broker):
    """Until a pool process of w waits in BLMOVE on its own connection."""
    def lent():
        ports = set().union(*(tcp_ports(p) for p in pool_children(w)))
        return any(c.get("cmd") == "blmove" and "b" in c.get("flags", "") and
                   int(c["addr"].rsplit(":", 1)[1]) in ports for c in broker.client_list())
    wait_until(lent, what="the idle wait lent to a pool process")


@_inbox_only
def test_a_big_message_a_waiting_process_took_reaches_the_main_process_in_a_memfd(app, workers, broker):
    """From 1 MiB on, the process that waited reads the message into a memfd that goes to the main process with
    its TOOK frame: the main process keeps its books from it (here: the late-ack record, which it writes itself
    for a message that big, byte for byte kombu's) and never reads the message again from the inbox. One with
    an ETA is still left to the main process, which reads it from there."""
    w = workers.start("-c", "1", "--acks-late", "-l", "debug")
    assert app.send_task("native.noop").get(timeout=TIMEOUT) is None
    # The main process may still take its wait back just then (a recall): another message is tried then.
    for attempt in range(5):
        wait_lent(w, broker)
        lindex = command_calls(broker, "lindex")
        env = task_envelope("native.sleep_ms", args=[300])
        env["headers"]["x-padding"] = "p" * (3 << 20)  # a header the task ignores makes it big
        raw = json.dumps(env)
        tag, task_id = env["properties"]["delivery_tag"], env["headers"]["id"]
        broker.lpush("celery", raw)
        wait_until(lambda: broker.hexists("unacked", tag), what="the big message recorded as unacked")
        assert broker.hget("unacked", tag) == ('[' + raw + ', "", "celery"]').encode()
        assert app.AsyncResult(task_id).get(timeout=TIMEOUT) == 300
        if f"native.sleep_ms[{task_id}] taken by pool process" in w.log():
            assert command_calls(broker, "lindex") == lindex, "the main process read it again"
            break
    else:
        pytest.fail("no big message was taken by a waiting pool process in 5 tries; worker log:\n" + w.log_tail())
    wait_drained(broker)
    big = "e" * (2 << 20)
    later = app.send_task("native.echo", args=[big], countdown=0.3)
    assert later.get(timeout=TIMEOUT) == {"args": [big], "kwargs": {}}
    assert f"native.echo[{later.id}] taken by pool process" not in w.log()
    wait_drained(broker)
