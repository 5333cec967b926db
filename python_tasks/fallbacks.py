"""Pure-Python versions of celeriac's built-in tasks, under the same names, on their own app.

For a stock worker: ``python3 -m celery -A python_tasks.fallbacks worker``. The benchmark runs it against
celeriac; it also lets a deployment without celeriac serve the same task names. Same settings as the client
app (python_tasks.celeryconfig), so the same environment variables apply.
"""
import time

from celery import Celery

app = Celery("python_tasks.fallbacks")
app.config_from_object("python_tasks.celeryconfig")

_INT64_MIN, _INT64_MAX = -2**63, 2**63 - 1


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@app.task(name="native.noop", shared=False)
def noop():
    return None


@app.task(name="native.add", shared=False)
def add(x, y):
    if not (_is_number(x) and _is_number(y)):
        raise TypeError(f"unsupported operand type(s) for +: '{type(x).__name__}' and '{type(y).__name__}'")
    r = x + y
    if isinstance(r, int) and not _INT64_MIN <= r <= _INT64_MAX:
        raise OverflowError("integer overflow in add")
    return r


@app.task(name="native.echo", shared=False)
def echo(*args, **kwargs):
    return {"args": list(args), "kwargs": kwargs}


def _fib(n):
    return n if n < 2 else _fib(n - 1) + _fib(n - 2)


@app.task(name="native.fib", shared=False)
def fib(n):
    if not (isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= 92):
        raise ValueError(f"fib: n must be an integer in 0..92, got {n!r}")
    return _fib(n)


@app.task(name="native.sleep_ms", shared=False)
def sleep_ms(ms):
    time.sleep(ms / 1000.0)
    return ms


@app.task(name="native.fail", shared=False)
def fail(message):
    raise ValueError(message)


@app.task(name="native.xsum", shared=False)
def xsum(values):
    return sum(values)


_redis = None


@app.task(name="native.incr", shared=False)
def incr(key):
    global _redis
    if _redis is None:
        import redis
        url = app.conf.broker_url
        if not url.startswith(("redis://", "redis+socket://", "unix://")):
            url = app.conf.result_backend
        _redis = redis.Redis.from_url(url.replace("redis+socket://", "unix://"))
    return _redis.incr(key)
