"""Client-side stubs for celeriac's built-in tasks.

Each stub has the task's Celery name and parameters, so ``add.delay(2, 3)`` builds the same message a Python
task would (and Celery checks the argument count before sending). The bodies never run in Python: celeriac
executes the task. For pure-Python versions see ``python_tasks.fallbacks``.
"""
from python_tasks.app import app


def _native_only(name):
    raise NotImplementedError(f"{name} runs on a celeriac worker, not in Python "
                              f"(python_tasks.fallbacks has a Python version)")


@app.task(name="native.noop", shared=False)
def noop():
    """-> None"""
    _native_only("native.noop")


@app.task(name="native.add", shared=False)
def add(x, y):
    """-> x + y (int or float); TypeError for a non-number, OverflowError past int64."""
    _native_only("native.add")


@app.task(name="native.echo", shared=False)
def echo(*args, **kwargs):
    """-> {"args": [...], "kwargs": {...}}, every JSON value kept."""
    _native_only("native.echo")


@app.task(name="native.fib", shared=False)
def fib(n):
    """-> the n-th Fibonacci number by naive recursion; ValueError unless 0 <= n <= 92."""
    _native_only("native.fib")


@app.task(name="native.sleep_ms", shared=False)
def sleep_ms(ms):
    """Sleeps ms milliseconds, -> ms."""
    _native_only("native.sleep_ms")


@app.task(name="native.fail", shared=False)
def fail(message):
    """Always fails with ValueError(message)."""
    _native_only("native.fail")


@app.task(name="native.xsum", shared=False)
def xsum(values):
    """-> the sum of a list of numbers."""
    _native_only("native.xsum")


@app.task(name="native.incr", shared=False)
def incr(key):
    """INCR key in the broker's Redis database, -> the new value."""
    _native_only("native.incr")


@app.task(name="native.retry_n", shared=False)
def retry_n(n, max_retries=3):
    """-> n, after retrying itself (0.1 s countdown) until its retries reach n; MaxRetriesExceededError when
    n > max_retries (None: no limit)."""
    _native_only("native.retry_n")


@app.task(name="native.fib_tree", shared=False)
def fib_tree(n, cutoff):
    """-> fib(n), computed as a tree of subtasks above the cutoff, joined by continuations (no task waits)."""
    _native_only("native.fib_tree")


@app.task(name="native.pg_bulk_insert", shared=False)
def pg_bulk_insert(table, columns, rows):
    """COPY rows (lists, one value per column) into table, in one transaction -> the number inserted.
    The table must be on the worker's allow-list (--pg-tables), else PermissionError."""
    _native_only("native.pg_bulk_insert")


@app.task(name="native.pg_bulk_upsert", shared=False)
def pg_bulk_upsert(table, columns, rows, key_columns):
    """INSERT ... ON CONFLICT (key_columns) DO UPDATE of rows, in one transaction
    -> {"inserted": n, "updated": m}."""
    _native_only("native.pg_bulk_upsert")


@app.task(name="native.pg_bulk_delete", shared=False)
def pg_bulk_delete(table, key_columns, keys):
    """Deletes the rows whose key_columns equal one of keys (lists; bare values for one key column), in one
    transaction -> the number deleted."""
    _native_only("native.pg_bulk_delete")


@app.task(name="native.pg_aggregate", shared=False)
def pg_aggregate(table, group_by, column):
    """-> [[group, count, sum, min, max], ...] of column per value of group_by (a column, a list of columns,
    or None for the whole table), ordered by group, computed by PostgreSQL."""
    _native_only("native.pg_aggregate")
