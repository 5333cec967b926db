"""Python twins of celeriac's built-in tasks, for the stock Celery worker in interop tests and comparisons.

`python3 -m celery -A pyworker_tasks worker -P prefork ...` (servers.CeleryWorker does this) runs a stock
worker that knows the same task names with the same meaning, so a message either side left behind can be
finished by the other. Broker and backend come from CELERY_BROKER_URL / CELERY_RESULT_BACKEND (Celery reads
them itself); the settings celeriac takes as flags come from the PYWORKER_* variables below.
"""

import os
import time

import redis
from celery import Celery

INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1


def _env_flag(name):
    return os.environ.get(name, "") not in ("", "0", "false", "no")


app = Celery("pyworker_tasks")
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_acks_late=_env_flag("PYWORKER_ACKS_LATE"),
    task_track_started=_env_flag("PYWORKER_TRACK_STARTED"),
    broker_transport_options={"visibility_timeout": float(os.environ.get("PYWORKER_VISIBILITY_TIMEOUT", "3600"))},
    result_expires=int(os.environ.get("PYWORKER_RESULT_EXPIRES", "86400")),
    worker_hijack_root_logger=True,
)
# Mixed workflows: with PYWORKER_NATIVE_QUEUE set, the native.* tasks this worker sends on (chain links, chord
# bodies) go to celeriac's queue, as an application routes them, instead of being run here by the twins below.
if os.environ.get("PYWORKER_NATIVE_QUEUE"):
    app.conf.task_routes = {"native.*": {"queue": os.environ["PYWORKER_NATIVE_QUEUE"]}}


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_int64(v):
    if isinstance(v, int) and not INT64_MIN <= v <= INT64_MAX:
        raise OverflowError("integer overflow")
    return v


@app.task(name="native.noop")
def noop():
    return None


@app.task(name="native.add")
def add(x, y):
    if not (_number(x) and _number(y)):
        raise TypeError(f"unsupported operand type(s) for +: '{type(x).__name__}' and '{type(y).__name__}'")
    return _check_int64(x + y)


@app.task(name="native.echo")
def echo(*args, **kwargs):
    return {"args": list(args), "kwargs": kwargs}


def _fib(n):
    return n if n < 2 else _fib(n - 1) + _fib(n - 2)


@app.task(name="native.fib")
def fib(n):
    if not isinstance(n, int) or isinstance(n, bool):
        raise TypeError(f"fib() argument must be an integer, not '{type(n).__name__}'")
    if not 0 <= n <= 92:
        raise ValueError(f"fib() argument must be between 0 and 92, got {n}")
    return _fib(n)


@app.task(name="native.sleep_ms")
def sleep_ms(ms):
    time.sleep(ms / 1000.0)
    return ms


@app.task(name="native.fail")
def fail(message):
    raise ValueError(message)


@app.task(name="native.xsum")
def xsum(values):
    if not isinstance(values, list):
        raise TypeError(f"xsum() argument must be a list, not '{type(values).__name__}'")
    total = 0
    for v in values:
        if not _number(v):
            raise TypeError(f"unsupported operand type(s) for +: '{type(total).__name__}' and '{type(v).__name__}'")
        total = _check_int64(total + v)
    return total


_redis = None


@app.task(name="native.incr")
def incr(key):
    global _redis
    if _redis is None:
        _redis = redis.Redis.from_url(app.conf.broker_url)
    return _redis.incr(key)


# -- Python-only tasks, for workflows that mix Python and native steps ----------------------------------

@app.task(name="py.mul")
def py_mul(x, y):
    return x * y


@app.task(name="py.xsum")
def py_xsum(values):
    return sum(values)


@app.task(name="py.fail")
def py_fail(message):
    raise ValueError(message)


@app.task(name="py.fib_tree", bind=True)
def py_fib_tree(self, n, cutoff):
    """native.fib_tree in Python, written deadlock-free the only way Celery allows: the task replaces itself
    by a chord of its two halves into a sum, instead of waiting on them."""
    from celery import chord

    if n <= cutoff or n < 2:
        return _fib(n)
    return self.replace(chord([py_fib_tree.s(n - 1, cutoff), py_fib_tree.s(n - 2, cutoff)], py_xsum.s()))


@app.task(name="py.fib_blocking")
def py_fib_blocking(n, cutoff):
    """The classic trap: a task that waits for its subtasks' results while holding its pool slot."""
    if n <= cutoff or n < 2:
        return _fib(n)
    a = py_fib_blocking.delay(n - 1, cutoff)
    b = py_fib_blocking.delay(n - 2, cutoff)
    return a.get(disable_sync_subtasks=False) + b.get(disable_sync_subtasks=False)
