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
    return isinstance(v, (int, float))  # bool included: True + 1 == 2 in Python, and in celeriac


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


@app.task(name="native.retry_n", bind=True, shared=False, max_retries=None)
def retry_n(self, n, max_retries=3):
    if self.request.retries < n:
        raise self.retry(countdown=0.1, max_retries=max_retries)
    return n


@app.task(name="native.fib_tree", bind=True, shared=False)
def fib_tree(self, n, cutoff):
    """fib(n) as a tree of tasks, deadlock-free as Celery allows it: the task replaces itself by a chord of
    its two halves into xsum (Task.replace), instead of waiting for them. celeriac's native.fib_tree does the
    same with task_continue_with."""
    from celery import chord

    if n <= cutoff or n < 2:
        return _fib(n)
    return self.replace(chord([fib_tree.s(n - 1, cutoff), fib_tree.s(n - 2, cutoff)], xsum.s()))


# -- PostgreSQL: native.pg_bulk_insert through SQLAlchemy, as a Flask app's task typically does it ---------
# Same configuration as celeriac: DATABASE_URL (libpq URI or keyword string) and CELERIAC_PG_TABLES. The
# engine is created on first use, so in the pool child, after the fork. (Only the insert has a fallback.)

_pg_engine = None
_pg_tables = {}


def _pg_table(name):
    """The reflected sqlalchemy Table for an allow-listed name ("t" or "schema.t")."""
    global _pg_engine
    import os

    import psycopg2
    import sqlalchemy as sa

    allowed = {t.strip() for t in (os.environ.get("CELERIAC_PG_TABLES") or "").split(",") if t.strip()}
    if not isinstance(name, str) or name not in allowed:
        raise PermissionError(f"table {name!r} is not in this worker's allow-list (CELERIAC_PG_TABLES)")
    if _pg_engine is None:
        dsn = os.environ.get("DATABASE_URL") or ""
        _pg_engine = sa.create_engine("postgresql+psycopg2://", creator=lambda: psycopg2.connect(dsn))
    if name not in _pg_tables:
        schema, _, table = name.rpartition(".")
        _pg_tables[name] = sa.Table(table, sa.MetaData(), schema=schema or None, autoload_with=_pg_engine)
    return _pg_tables[name]


@app.task(name="native.pg_bulk_insert", shared=False)
def pg_bulk_insert(table, columns, rows):
    import sqlalchemy as sa

    t = _pg_table(table)
    for i, row in enumerate(rows):
        if len(row) != len(columns):
            raise ValueError(f"rows[{i}]: expected {len(columns)} values (one per column), got {len(row)}")
    with _pg_engine.begin() as conn:
        conn.execute(sa.insert(t), [dict(zip(columns, row)) for row in rows])
    return len(rows)
