"""A bad task costs one FAILURE result and nothing else: crashes, hard and soft time limits, and long
acks_late tasks that must not be run twice while celeriac holds them."""

import os
import re
import signal
import time

import pytest
from kombu import Connection

from util import TIMEOUT, exc_name_of, push_raw, result_doc, task_envelope, unacked, wait_until

pytestmark = pytest.mark.celeriac_only("native.crash, native time limits and score refreshing are celeriac's")


@pytest.mark.parametrize("how, status", [
    ("segfault", "signal 11 (SIGSEGV)"),
    ("abort", "signal 6 (SIGABRT)"),
    ("exit", "exitcode 3"),
])
def test_crash_costs_one_worker_lost_error(app, workers, how, status):
    workers.start("-c", "2", "--enable-test-tasks")
    crashed = app.send_task("native.crash", args=[how])
    after = [app.send_task("native.add", args=[i, i]) for i in range(20)]
    name, exc = exc_name_of(crashed)
    assert name == "WorkerLostError"
    assert str(exc).startswith(f"Worker exited prematurely: {status}")
    assert [r.get(timeout=TIMEOUT) for r in after] == [2 * i for i in range(20)]
    # The slot was replaced: both processes still serve.
    assert app.send_task("native.fib", args=[20]).get(timeout=TIMEOUT) == 6765


def test_crash_task_is_not_registered_by_default(app, workers):
    workers.start("-c", "1")
    name, _ = exc_name_of(app.send_task("native.crash", args=["segfault"]))
    assert name == "NotRegistered"


def test_hard_time_limit_from_the_message(app, workers, backend):
    workers.start("-c", "1")
    started = time.monotonic()
    res = app.send_task("native.sleep_ms", args=[20000], time_limit=1)
    name, exc = exc_name_of(res)
    assert name == "TimeLimitExceeded"
    assert time.monotonic() - started < 10
    assert result_doc(backend, res.id)["result"]["exc_message"] == [1.0]
    assert app.send_task("native.add", args=[1, 2]).get(timeout=TIMEOUT) == 3


def test_hard_time_limit_from_the_command_line(app, workers):
    w = workers.start("-c", "1", "--time-limit", "0.5")
    name, _ = exc_name_of(app.send_task("native.fib", args=[60]))
    assert name == "TimeLimitExceeded"
    w.wait_log(re.compile(r"Hard time limit \(0\.5s\) exceeded for native\.fib"), TIMEOUT)
    assert app.send_task("native.sleep_ms", args=[10]).get(timeout=TIMEOUT) == 10


@pytest.mark.parametrize("task, args", [("native.sleep_ms", [20000]), ("native.fib", [70])])
def test_soft_time_limit_is_noticed_by_the_task(app, workers, task, args):
    workers.start("-c", "1")
    started = time.monotonic()
    name, _ = exc_name_of(app.send_task(task, args=args, soft_time_limit=0.5, time_limit=30))
    assert name == "SoftTimeLimitExceeded"
    assert time.monotonic() - started < 10  # the task gave up: the hard limit (30 s) was not needed


def test_a_task_that_finishes_within_its_soft_limit_succeeds(app, workers):
    workers.start("-c", "1", "--soft-time-limit", "5")
    assert app.send_task("native.sleep_ms", args=[50]).get(timeout=TIMEOUT) == 50


def test_long_acks_late_task_is_not_restored_while_celeriac_runs_it(app, workers, broker, redis_server):
    """Stock Celery runs such a task twice (celery #2599): a kombu consumer restores it once it is older than
    its visibility_timeout. celeriac keeps the scores of what it holds fresh."""
    w = workers.start("-c", "1", "--acks-late", "--visibility-timeout", "2")
    res = app.send_task("native.sleep_ms", args=[6000])
    wait_until(lambda: len(unacked(broker)) == 1, what="the running task recorded as unacked")
    deadline = time.monotonic() + 5
    with Connection(redis_server.url(0), transport_options={"visibility_timeout": 2}) as conn:
        channel = conn.default_channel
        while time.monotonic() < deadline:  # what every stock consumer does, here every 0.25 s
            channel.qos.restore_visible(num=100, interval=1)
            time.sleep(0.25)
    assert res.get(timeout=TIMEOUT) == 6000
    time.sleep(0.5)
    assert len(re.findall(re.escape(f"native.sleep_ms[{res.id}] received"), w.log())) == 1
    assert broker.llen("celery") == 0


@pytest.mark.parametrize("flag, value", [("--max-tasks-per-child", "5"), ("--max-memory-per-child", "1")])
def test_pool_processes_are_replaced_without_losing_tasks(app, workers, flag, value):
    """A retiring process finishes its task first; what was queued to it goes to its replacement."""
    w = workers.start("-c", "2", flag, value)
    results = [app.send_task("native.add", args=[i, 1]) for i in range(60)]
    assert [r.get(timeout=TIMEOUT) for r in results] == [i + 1 for i in range(60)]
    retired = len(re.findall(r"Pool process \d+ retired", w.log()))
    assert retired >= (60 // 5 - 2 if flag == "--max-tasks-per-child" else 50)
    assert "WorkerLostError" not in w.log()


def test_oversized_message_is_refused_with_a_failure(app, workers, broker, backend):
    workers.start("-c", "1", "--max-message-size", "4096")
    env = task_envelope("native.echo", args=["x" * 10000])
    push_raw(broker, env)
    name, exc = exc_name_of(app.AsyncResult(env["headers"]["id"]))
    assert name == "InvalidTaskError" and "4096" in str(exc)
    assert result_doc(backend, env["headers"]["id"])["status"] == "FAILURE"
    assert app.send_task("native.echo", args=["small"]).get(timeout=TIMEOUT) == {"args": ["small"], "kwargs": {}}


@pytest.mark.parametrize("signals", [(signal.SIGTERM, signal.SIGTERM), (signal.SIGQUIT,)])
def test_cold_shutdown_exits_at_once_and_loses_nothing(app, workers, broker, signals):
    """A second SIGTERM, or SIGQUIT: exit now; the running acks_late task stays unacked, so a worker started
    later restores it (after the visibility timeout) and runs it."""
    w = workers.start("-c", "1", "--acks-late", "--visibility-timeout", "1")
    res = app.send_task("native.sleep_ms", args=[4000])
    w.wait_log(re.compile(re.escape(f"native.sleep_ms[{res.id}] received")), TIMEOUT)
    time.sleep(0.3)
    started = time.monotonic()
    for sig in signals:
        os.kill(w.pid, sig)
        time.sleep(0.1)
    w.proc.wait(timeout=10)
    assert time.monotonic() - started < 2  # not the 4 s the task still had to run
    assert w.proc.returncode == 1
    assert len(unacked(broker)) == 1
    quick = app.send_task("native.add", args=[2, 2])
    workers.start("-c", "1", "--visibility-timeout", "1")
    assert quick.get(timeout=TIMEOUT) == 4
    assert res.get(timeout=TIMEOUT) == 4000  # restored once older than the visibility timeout, then run
