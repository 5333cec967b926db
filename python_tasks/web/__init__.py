"""The Flask demo: one page and its JSON API, in front of celeriac and a stock Python worker.

Run it with gunicorn (``gunicorn -b 127.0.0.1:8000 python_tasks.web.wsgi:app``), in the compose stack
(docker/docker-compose.yml) or through ``make demo WEB=1`` (scripts/stack.py starts every server locally).

What a visitor does on the page, and the endpoint behind it:

  GET  /api/fib/<engine>/<n>   fib(n) on celeriac (engine "native", queue $CELERIAC_NATIVE_QUEUE) or on the
                               stock worker running python_tasks.fallbacks (engine "python", queue
                               $CELERIAC_PYTHON_QUEUE); waits for the result and answers the time it took
  POST /api/import             {"rows": N, "engine": "native"|"python"}: N generated rows for demo_rows,
                               sent as one native.pg_bulk_insert; answers the task id and the batch id
  GET  /api/tasks/<id>         state of any task; PROGRESS carries {"done", "total"} (celeriac stores it
                               during large inserts), SUCCESS the result, FAILURE the exception
  GET  /api/rows?batch=B       rows in demo_rows, in all and in batch B (SQLAlchemy)
  POST /api/chord              {"n": N}: chord of N native.add(i, i) into native.xsum, on celeriac
  GET  /api/workers            the workers answering a ping, with the queues they consume
  GET  /healthz                the process answers (the container's health check)

Configuration, from the environment only: CELERY_BROKER_URL and CELERY_RESULT_BACKEND (python_tasks.
celeryconfig), DATABASE_URL (libpq URI or keyword string), CELERIAC_NATIVE_QUEUE [native],
CELERIAC_PYTHON_QUEUE [python]. The workers must allow the table: CELERIAC_PG_TABLES=demo_rows.

Database access goes through SQLAlchemy: one engine per process (created on first use, so after gunicorn's
fork), one scoped session per request, removed at request teardown.
"""
import os
import time
import uuid

from flask import Flask, abort, jsonify, render_template, request

from python_tasks.web import db

FIB_MAX = 35               # naive recursion: fib(35) takes seconds in Python
IMPORT_MAX = 500_000       # rows per import (one message of about 25 MB)
CHORD_MAX = 1_000          # header tasks per chord
WAIT = float(os.environ.get("CELERIAC_WEB_TIMEOUT", "60"))  # seconds a request waits for a result


def native_queue():
    return os.environ.get("CELERIAC_NATIVE_QUEUE") or "native"


def python_queue():
    return os.environ.get("CELERIAC_PYTHON_QUEUE") or "python"


def _queue_for(engine):
    if engine == "native":
        return native_queue()
    if engine == "python":
        return python_queue()
    abort(404, description=f"unknown engine {engine!r}: use 'native' (celeriac) or 'python' (stock worker)")


def _int_arg(data, key, default, lo, hi):
    value = data.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        abort(400, description=f"{key} must be an integer in {lo}..{hi}")
    return value


def _celery():
    from python_tasks.app import app
    return app


_warmed = set()


def _warm(queue):
    """The first task a process sends pays for connecting to the broker and subscribing to results (about
    0.1 s): once per process and queue, a native.noop round trip first, so the times shown compare tasks."""
    if (os.getpid(), queue) not in _warmed:
        _celery().send_task("native.noop", queue=queue).get(timeout=WAIT)
        _warmed.add((os.getpid(), queue))


def create_app():
    app = Flask(__name__)
    db.init_app(app)

    @app.errorhandler(400)
    @app.errorhandler(404)
    def bad_request(e):
        return jsonify(error=e.description), e.code

    @app.get("/")
    def index():
        return render_template("index.html", fib_max=FIB_MAX, import_max=IMPORT_MAX, chord_max=CHORD_MAX)

    @app.get("/healthz")
    def healthz():
        return jsonify(ok=True)

    @app.get("/api/fib/<engine>/<int:n>")
    def fib(engine, n):
        queue = _queue_for(engine)
        if n > FIB_MAX:
            abort(400, description=f"n must be in 0..{FIB_MAX} (naive recursion)")
        _warm(queue)
        t0 = time.perf_counter()
        res = _celery().send_task("native.fib", args=[n], queue=queue)
        try:
            value = res.get(timeout=WAIT)
        except Exception as e:  # noqa: BLE001 - the client raises the task's own exception class
            return jsonify(engine=engine, n=n, task_id=res.id, queue=queue,
                           error=f"{type(e).__name__}: {e}"), 502
        ms = (time.perf_counter() - t0) * 1e3
        return jsonify(engine=engine, n=n, result=value, ms=round(ms, 3), task_id=res.id, queue=queue)

    @app.post("/api/import")
    def start_import():
        data = request.get_json(silent=True) or {}
        rows = _int_arg(data, "rows", 100_000, 1, IMPORT_MAX)
        engine = data.get("engine", "native")
        queue = _queue_for(engine)
        db.ensure_schema()
        batch = uuid.uuid4().hex[:12]
        payload = [[batch, i, f"row {i} of {batch}", i * 0.5] for i in range(rows)]
        res = _celery().send_task("native.pg_bulk_insert",
                                  args=[db.TABLE, ["batch", "n", "name", "value"], payload], queue=queue)
        return jsonify(task_id=res.id, batch=batch, rows=rows, engine=engine, queue=queue), 202

    @app.get("/api/rows")
    def rows():
        batch = request.args.get("batch")
        return jsonify(db.count_rows(batch))

    @app.post("/api/chord")
    def start_chord():
        from celery import chord

        from python_tasks import native

        data = request.get_json(silent=True) or {}
        n = _int_arg(data, "n", 100, 1, CHORD_MAX)
        q = native_queue()
        header = [native.add.s(i, i).set(queue=q) for i in range(n)]
        res = chord(header)(native.xsum.s().set(queue=q))
        return jsonify(task_id=res.id, n=n, expected=n * (n - 1), queue=q), 202

    @app.get("/api/tasks/<task_id>")
    def task(task_id):
        from celery.result import AsyncResult

        r = AsyncResult(task_id, app=_celery())
        out = {"task_id": task_id, "state": r.state}
        info = r.info
        if r.state == "PROGRESS" and isinstance(info, dict):
            out["done"], out["total"] = info.get("done"), info.get("total")
            if out["total"]:
                out["percent"] = round(100.0 * out["done"] / out["total"], 1)
        elif r.state == "SUCCESS":
            out["result"] = info
            out["percent"] = 100.0
        elif r.state in ("FAILURE", "RETRY", "REVOKED") and info is not None:
            out["error"] = f"{type(info).__name__}: {info}"
        return jsonify(out)

    @app.get("/api/workers")
    def workers():
        ctl = _celery().control
        replies = ctl.ping(timeout=0.5)
        names = sorted(name for reply in replies for name in reply)
        queues = {}
        if names:
            # With destination set, inspect returns as soon as every named worker answered.
            queues = ctl.inspect(destination=names, timeout=1.0).active_queues() or {}
        out = [{"name": name, "queues": sorted(q["name"] for q in queues.get(name) or []),
                "engine": "celeriac" if name.startswith("celeriac@") else "python"} for name in names]
        return jsonify(workers=out)

    return app
