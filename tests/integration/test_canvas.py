"""Workflows through celeriac, driven by the stock Celery client: chains, groups, chords, link/link_error,
retries, and native.fib_tree's dependencies without waiting.

celeriac consumes queue `native`; for the mixed cases a stock Python worker consumes `celery` with py.* tasks
(tests/integration/pyworker_tasks.py), routing native.* back to `native` as an application would. Each test
checks who ran what from the workers' logs, so a mixed workflow cannot pass by running on one side only."""

import time

import pytest
from celery import chain, chord, group
from celery.exceptions import TimeoutError as CeleryTimeoutError

from util import TIMEOUT, result_doc, wait_until

NATIVE_Q = "native"
ROUTES = {"native.*": {"queue": NATIVE_Q}}

pytestmark = pytest.mark.celeriac_only("native workflows: celeriac consumes queue 'native'")


@pytest.fixture(scope="module")
def native(module_workers):
    return module_workers.celeriac("-Q", NATIVE_Q, "-c", "2", "-l", "info")


@pytest.fixture(scope="module")
def python(module_workers):
    return module_workers.python("-Q", "celery", "-c", "2", env={"PYWORKER_NATIVE_QUEUE": NATIVE_Q})


@pytest.fixture
def capp(client_factory):
    return client_factory(task_routes=ROUTES)


def S(capp, name, *args, **opts):
    return capp.signature(name, args=args, **opts)


def ran_on(worker, task_id, wait=5.0):
    """Whether the worker's log shows this task id (waiting a little: a worker may log after storing)."""
    deadline = time.monotonic() + wait
    while f"[{task_id}]" not in worker.log():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_chain_of_native_adds(capp, native, backend):
    r = chain(S(capp, "native.add", 1, 2), S(capp, "native.add", 3), S(capp, "native.add", 4)).apply_async()
    assert r.get(timeout=TIMEOUT) == 10
    first, second = r.parent.parent, r.parent
    assert first.get(timeout=TIMEOUT) == 3 and second.get(timeout=TIMEOUT) == 6
    # Each link was sent by celeriac with the right lineage, and listed as its sender's child.
    d1, d2, d3 = (result_doc(backend, x.id) for x in (first, second, r))
    assert d1["children"] == [[[second.id, None], None]]
    assert d2["parent_id"] == first.id and d3["parent_id"] == second.id
    assert all(ran_on(native, x.id) for x in (first, second, r))


def test_chain_failure_fails_the_rest(capp, native, backend):
    r = chain(S(capp, "native.add", 1, 2), S(capp, "native.fail", "boom", immutable=True),
              S(capp, "native.add", 4)).apply_async()
    with pytest.raises(ValueError, match="boom"):
        r.get(timeout=TIMEOUT)
    doc = wait_until(lambda: result_doc(backend, r.id), what="the last link's FAILURE")
    assert doc["status"] == "FAILURE" and doc["result"]["exc_type"] == "ValueError"
    assert not ran_on(native, r.id, wait=0)  # never ran: marked failed by the link that failed


def test_chain_native_python_native(capp, native, python):
    r = chain(S(capp, "native.add", 1, 2), S(capp, "py.mul", 10), S(capp, "native.add", 5)).apply_async()
    assert r.get(timeout=TIMEOUT) == 35
    assert ran_on(native, r.parent.parent.id) and ran_on(python, r.parent.id) and ran_on(native, r.id)


def test_chain_into_a_chord(capp, native, python):
    # chain(a, chord(header, body)): the worker that finishes `a` starts the chord, passing a's result to every
    # header task; the header mixes native and Python tasks.
    r = chain(S(capp, "native.add", 1, 1),
              chord([S(capp, "native.add", 1), S(capp, "py.mul", 10)], S(capp, "native.xsum"))).apply_async()
    assert r.get(timeout=TIMEOUT) == (2 + 1) + 2 * 10


def test_group_of_20(capp, native):
    r = group(S(capp, "native.add", i, i) for i in range(20)).apply_async()
    assert r.get(timeout=TIMEOUT) == [2 * i for i in range(20)]


def test_chord_into_native_xsum(capp, native, backend):
    r = chord([S(capp, "native.add", i, i) for i in range(10)], S(capp, "native.xsum")).apply_async()
    assert r.get(timeout=TIMEOUT) == sum(2 * i for i in range(10))
    assert ran_on(native, r.id)
    # The join's keys are gone once the body was sent, as stock Celery leaves them.
    assert not [k for k in backend.keys("celery-taskset-meta-*")]


def test_chord_results_in_header_order(capp, native):
    # Different runtimes finish out of order; the body must still get them in header order.
    header = [S(capp, "native.sleep_ms", ms) for ms in (60, 0, 30, 10, 0)]
    r = chord(header, S(capp, "native.echo")).apply_async()
    assert r.get(timeout=TIMEOUT)["args"] == [[60, 0, 30, 10, 0]]


def test_chord_with_python_body(capp, native, python):
    r = chord([S(capp, "native.add", i, 1) for i in range(5)], S(capp, "py.xsum")).apply_async()
    assert r.get(timeout=TIMEOUT) == sum(i + 1 for i in range(5))
    assert ran_on(python, r.id)


def test_chord_with_python_header_and_native_body(capp, native, python):
    r = chord([S(capp, "py.mul", i, 3) for i in range(5)], S(capp, "native.xsum")).apply_async()
    assert r.get(timeout=TIMEOUT) == sum(3 * i for i in range(5))
    assert ran_on(native, r.id)


def test_chord_with_a_failing_member(capp, native, backend):
    r = chord([S(capp, "native.add", 1, 1), S(capp, "native.fail", "boom 2"), S(capp, "native.add", 2, 2)],
              S(capp, "native.xsum")).apply_async()
    with pytest.raises(Exception):
        r.get(timeout=TIMEOUT)
    doc = wait_until(lambda: result_doc(backend, r.id), what="the chord body's result")
    assert doc["status"] == "FAILURE"
    assert doc["result"]["exc_type"] == "ChordError"
    assert doc["result"]["exc_module"] == "celery.exceptions"
    assert doc["result"]["exc_message"][0].startswith("Dependency ")
    assert "raised ValueError('boom 2')" in doc["result"]["exc_message"][0]
    assert not ran_on(native, r.id, wait=0)


def test_link_callback(capp, native, backend):
    r = S(capp, "native.add", 1, 2, link=S(capp, "native.add", 10)).apply_async()
    assert r.get(timeout=TIMEOUT) == 3
    children = result_doc(backend, r.id)["children"]
    assert len(children) == 1
    child_id = children[0][0][0]
    assert capp.AsyncResult(child_id).get(timeout=TIMEOUT) == 13
    assert result_doc(backend, child_id)["parent_id"] == r.id


def test_link_error_callback(capp, native):
    errback = S(capp, "native.echo")
    errback.freeze()
    r = S(capp, "native.fail", "x", link_error=errback).apply_async()
    with pytest.raises(ValueError):
        r.get(timeout=TIMEOUT)
    # Sent as a message with args [failed task id], the form every errback accepts.
    assert capp.AsyncResult(errback.id).get(timeout=TIMEOUT) == {"args": [r.id], "kwargs": {}}


def test_link_error_to_python(capp, native, python):
    errback = S(capp, "py.mul", 2)  # py.mul(task_id, 2) == task_id * 2 in Python: proof it ran there
    errback.freeze()
    r = S(capp, "native.fail", "y", link_error=errback).apply_async()
    with pytest.raises(ValueError):
        r.get(timeout=TIMEOUT)
    assert capp.AsyncResult(errback.id).get(timeout=TIMEOUT) == r.id * 2


def test_retry_n(capp, native, backend):
    r = S(capp, "native.retry_n", 3).apply_async()
    states = set()

    def done():
        doc = result_doc(backend, r.id)
        if doc:
            states.add(doc["status"])
        return doc and doc["status"] == "SUCCESS"
    wait_until(done, what="retry_n(3) to succeed", interval=0.005)
    assert r.get(timeout=TIMEOUT) == 3
    assert "RETRY" in states
    # Three retries, each a new message under the same id sent by celeriac with an eta.
    assert native.log().count(f"native.retry_n[{r.id}] received") == 4
    assert native.log().count(f"native.retry_n[{r.id}] retry: Retry in 0.1s") == 3


def test_retry_past_max_retries(capp, native, backend):
    r = S(capp, "native.retry_n", 5, 2).apply_async()
    with pytest.raises(Exception) as e:
        r.get(timeout=TIMEOUT)
    assert type(e.value).__name__ == "MaxRetriesExceededError"
    doc = result_doc(backend, r.id)
    assert doc["result"]["exc_module"] == "celery.exceptions"
    assert doc["result"]["exc_message"] == [f"Can't retry native.retry_n[{r.id}] args:(5, 2) kwargs:{{}}"]


def fib(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def test_fib_tree_with_one_process(workers, capp):
    # With -c 1 a task that waited for its subtasks would hold the only process they could run on: this
    # completes only because a fib_tree task never waits (it hands its sum to a continuation).
    workers.celeriac("-Q", NATIVE_Q, "-c", "1")
    assert S(capp, "native.fib_tree", 20, 12).apply_async().get(timeout=TIMEOUT) == fib(20)


def test_eight_fib_trees_with_two_processes(workers, capp):
    workers.celeriac("-Q", NATIVE_Q, "-c", "2")
    rs = [S(capp, "native.fib_tree", 20, 12).apply_async() for _ in range(8)]
    assert [r.get(timeout=TIMEOUT) for r in rs] == [fib(20)] * 8


def test_fib_tree_inside_a_chord(workers, capp):
    # A continuation inherits its task's place in the enclosing workflow: here, its chord part.
    workers.celeriac("-Q", NATIVE_Q, "-c", "2")
    r = chord([S(capp, "native.fib_tree", n, 10) for n in (15, 16, 17)], S(capp, "native.xsum")).apply_async()
    assert r.get(timeout=TIMEOUT) == fib(15) + fib(16) + fib(17)


def test_blocking_pattern_hangs_on_the_stock_worker(workers, capp):
    """The contrast fib_tree is built for: the same tree where each task waits on .get() deadlocks a stock
    worker with one process (bounded here by a timeout)."""
    w = workers.python("-Q", "celery", "-c", "1")
    r = S(capp, "py.fib_blocking", 14, 12).apply_async()
    with pytest.raises(CeleryTimeoutError):
        r.get(timeout=3)
    w.kill_group()  # it would never finish: no point in a warm shutdown
