#!/usr/bin/env python3
"""PostgreSQL bulk insert: celeriac's native.pg_bulk_insert vs the stock Celery worker running the SQLAlchemy
equivalent vs raw COPY FROM STDIN (psycopg2's copy_expert), same server, same rows, same run.

    python3 bench/pg.py                       # 100,000 and 1,000,000 rows; about three minutes
    python3 bench/pg.py --sizes 100000 --runs 5 --json out.json

Starts its own redis-server and PostgreSQL (initdb into a temp dir; default settings, so fsync on) on free
loopback ports. Rows are (id int, name text, value float8): [i, "name-<i>", a random float]. Every method
inserts into the same freshly truncated table over TCP to 127.0.0.1 with password authentication, and each
run is checked afterwards (count and sum(id) in the database).

How each figure is taken:
- raw COPY: the COPY data is prepared in memory first (text: what psql's \\copy sends; binary: PGCOPY); the
  clock covers copy_expert + COMMIT.
- workers: the stock client's send_task builds the message (JSON, base64, as .delay() does) into a staging
  list nobody consumes; the clock starts when RENAMENX makes the staging list the worker's (empty) queue and stops when the result
  reaches the client (AsyncResult.get). So it includes the worker's receiving and decoding of the message,
  the task, and storing the result; not the client's own serialization, which is the same for both workers
  and is reported apart (".delay() itself"). One task carries all the rows, as a user would send them; the
  1,000,000-row message is about 60 MB, under celeriac's default --max-message-size of 64 MiB.
- stock worker: `python3 -m celery -A python_tasks.fallbacks worker -P prefork -c 2`, whose
  native.pg_bulk_insert does `conn.execute(insert(table), [dict(...) for row in rows])` in one transaction
  (SQLAlchemy 1.4 + psycopg2, which batches with execute_values). celeriac: `-c 2`, release build
  (build-pg/celeriac from `cmake -S . -B build-pg -DCMAKE_BUILD_TYPE=Release`, or $CELERIAC_BIN).
Each worker first runs one 1,000-row task (connection and table reflection), untimed, and every party runs
each size once untimed before its timed runs: a worker's first message of a size pays one-time costs (the first
fill of its buffers: ~20 ms more for celeriac at 100,000 rows on the 2-core VM) that repeated imports do not. Raw COPY and celeriac take
turns run by run (text, binary, celeriac; then again), the stock worker runs afterwards (minutes at 1,000,000
rows: one run there by default). Medians of 5 runs are reported; every run is printed.
"""
import argparse
import gc
import io
import json
import os
import random
import statistics
import struct
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tests", "integration"))

warnings.filterwarnings("ignore", "SelectableGroups dict interface", DeprecationWarning)
import psycopg2  # noqa: E402
from celery import Celery  # noqa: E402

from servers import Celeriac, CeleryWorker, PostgresServer, RedisServer  # noqa: E402

TABLE = "bench_items"
COLUMNS = ["id", "name", "value"]
QUEUE, STAGING = "pgbench", "pgbench-staging"
TARGET_VS_STOCK, TARGET_VS_COPY = 20.0, 0.60


def make_rows(n, seed=1):
    rnd = random.Random(seed)
    return [[i, f"name-{i}", rnd.random() * 1e6 - 5e5] for i in range(n)]


def reset_table(dsn):
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(f"DROP TABLE IF EXISTS {TABLE}; CREATE TABLE {TABLE} (id int, name text, value float8)")
    conn.close()


def truncate(dsn):
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(f"TRUNCATE {TABLE}")
        cur.execute("CHECKPOINT")  # so that no run pays for the previous one's dirty pages
    conn.close()


def check(dsn, n):
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(f"SELECT count(*), coalesce(sum(id), 0) FROM {TABLE}")
        got = cur.fetchone()
    conn.close()
    if got != (n, n * (n - 1) // 2):
        raise SystemExit(f"bench: the table holds {got}, expected ({n}, {n * (n - 1) // 2})")


def copy_data(rows, fmt):
    if fmt == "text":
        return "".join(f"{i}\t{name}\t{value!r}\n" for i, name, value in rows).encode()
    out = [b"PGCOPY\n\xff\r\n\x00", struct.pack("!ii", 0, 0)]
    for i, name, value in rows:
        b = name.encode()
        out.append(struct.pack(f"!hii i{len(b)}s id", 3, 4, i, len(b), b, 8, value))
    out.append(struct.pack("!h", -1))
    return b"".join(out)


def raw_copy(dsn, rows, fmt):
    data = copy_data(rows, fmt)
    truncate(dsn)
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            t0 = time.perf_counter()
            cur.copy_expert(f"COPY {TABLE} (id, name, value) FROM STDIN" + (" (FORMAT binary)" if fmt == "binary"
                                                                            else ""), io.BytesIO(data))
            conn.commit()
            dt = time.perf_counter() - t0
    finally:
        conn.close()
    check(dsn, len(rows))
    return dt


def via_worker(app, broker, dsn, rows, timeout):
    """-> (seconds from the hand-over to the result, seconds send_task took)."""
    truncate(dsn)
    t0 = time.perf_counter()
    res = app.send_task("native.pg_bulk_insert", args=[TABLE, COLUMNS, rows], queue=STAGING)
    t_send = time.perf_counter() - t0
    t0 = time.perf_counter()
    # The staging list becomes the (empty, so absent) queue in O(1); LMOVE would also send the whole element
    # back to this client, whose parsing of 60 MB then sat inside the clock. NX: never over a queue in use.
    if not broker.renamenx(STAGING, QUEUE):
        broker.lmove(STAGING, QUEUE, "RIGHT", "LEFT")
    value = res.get(timeout=timeout)
    dt = time.perf_counter() - t0
    if value != len(rows):
        raise SystemExit(f"bench: the task returned {value!r}, expected {len(rows)}")
    check(dsn, len(rows))
    return dt, t_send


def client(rs):
    app = Celery("pgbench", broker=rs.url(0), backend=rs.url(1), set_as_current=False)
    app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                    result_accept_content=["json"])
    return app


class Worker:
    """One worker (celeriac or stock) started, warmed up, and timed run by run; stop() when done."""

    def __init__(self, kind, rs, pg, timeout):
        env = {"DATABASE_URL": pg.url(), "CELERIAC_PG_TABLES": TABLE}
        if kind == "celeriac":
            binary = os.environ.get("CELERIAC_BIN") or os.path.join(REPO, "build-pg", "celeriac")
            self.w = Celeriac(["-Q", QUEUE, "-c", "2", "-l", "info"], broker_url=rs.url(0), backend_url=rs.url(1),
                              env=env, binary=binary)
        else:
            self.w = CeleryWorker(["-Q", QUEUE, "-c", "2", "-l", "info"], app="python_tasks.fallbacks",
                                  pythonpath=REPO, broker_url=rs.url(0), backend_url=rs.url(1), env=env,
                                  python="/usr/bin/python3")
        self.kind, self.dsn, self.timeout = kind, pg.url(), timeout
        self.app = client(rs)
        self.w.start()
        self.w.wait_ready(120)
        self.broker = rs.client(0)
        via_worker(self.app, self.broker, self.dsn, make_rows(1000), timeout)  # warm-up: connect, reflect

    def run(self, rows):
        """-> (seconds, send seconds)"""
        return via_worker(self.app, self.broker, self.dsn, rows, self.timeout)

    def stop(self):
        # AsyncResults left for the garbage collector would talk to Redis after it stopped (noise at exit).
        gc.collect()
        consumer = getattr(self.app.backend, "result_consumer", None)
        if getattr(consumer, "_pubsub", None) is not None:
            consumer.stop()
            consumer._pubsub = None
        self.app.close()
        try:
            self.w.stop(timeout=30)
        except TimeoutError:
            pass
        if self.kind == "celeriac" and self.w.sanitizer_reports():
            print("\n".join(self.w.sanitizer_reports()))
        self.w.cleanup()


def worker_line(kind, n, r, dt, t_send):
    print(f"  {kind:9} {n:>9,} rows  run {r + 1}: {dt:7.3f} s  {n / dt:>12,.0f} rows/s   "
          f"(.delay() itself: {t_send:.3f} s)", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="100000,1000000", help="row counts, comma-separated")
    ap.add_argument("--runs", type=int, default=5, help="runs per method and size")
    ap.add_argument("--stock-runs-big", type=int, default=1, help="stock worker runs at >= 1,000,000 rows")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--json", help="write every figure here")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    data = {n: make_rows(n) for n in sizes}
    res = {"copy_text": {}, "copy_binary": {}}
    with RedisServer() as rs, PostgresServer() as pg:
        reset_table(pg.url())
        print(f"PostgreSQL {pg.port}, redis {rs.port}; rows of (id int, name text, value float8)", flush=True)
        # raw COPY and celeriac take turns run by run, so that a slower spell of the machine (or of the server)
        # falls on both alike; the stock worker, which takes minutes at 1,000,000 rows, runs afterwards.
        cel = Worker("celeriac", rs, pg, args.timeout)
        try:
            res["celeriac"] = {}
            for n in sizes:
                res["celeriac"][n] = []
                for fmt in ("text", "binary"):
                    res[f"copy_{fmt}"][n] = []
                    raw_copy(pg.url(), data[n], fmt)  # untimed, as each worker's first run of the size
                cel.run(data[n])
                for r in range(args.runs):
                    for fmt in ("text", "binary"):
                        dt = raw_copy(pg.url(), data[n], fmt)
                        res[f"copy_{fmt}"][n].append(dt)
                        print(f"  COPY {fmt:6} {n:>9,} rows  run {r + 1}: {dt:7.3f} s  {n / dt:>12,.0f} rows/s",
                              flush=True)
                    dt, t_send = cel.run(data[n])
                    res["celeriac"][n].append((dt, t_send))
                    worker_line("celeriac", n, r, dt, t_send)
        finally:
            cel.stop()
        stock = Worker("stock", rs, pg, args.timeout)
        try:
            res["stock"] = {}
            for n in sizes:
                res["stock"][n] = []
                stock.run(data[n])  # untimed
                for r in range(args.runs if n < 1_000_000 else args.stock_runs_big):
                    dt, t_send = stock.run(data[n])
                    res["stock"][n].append((dt, t_send))
                    worker_line("stock", n, r, dt, t_send)
        finally:
            stock.stop()

    def rate(key, n):
        v = res[key][n]
        secs = [x[0] if isinstance(x, tuple) else x for x in v]
        return n / statistics.median(secs)

    print("\nrows/s (median)                          " + "".join(f"{n:>16,} rows" for n in sizes))
    lines = [("raw COPY, text (psycopg2 copy_expert)", "copy_text"),
             ("raw COPY, binary (psycopg2 copy_expert)", "copy_binary"),
             ("celeriac native.pg_bulk_insert", "celeriac"),
             ("stock worker, SQLAlchemy insert", "stock")]
    for label, key in lines:
        print(f"  {label:39}" + "".join(f"{rate(key, n):>21,.0f}" for n in sizes))
    print(f"  {'.delay() itself, seconds (client side)':39}" +
          "".join(f"{statistics.median(x[1] for x in res['celeriac'][n]):>21.3f}" for n in sizes))
    print()
    summary = {}
    for n in sizes:
        vs_stock = rate("celeriac", n) / rate("stock", n)
        vs_copy = rate("celeriac", n) / max(rate("copy_text", n), rate("copy_binary", n))
        summary[n] = {"vs_stock": vs_stock, "vs_best_copy": vs_copy}
        print(f"  {n:>9,} rows: celeriac / SQLAlchemy task = {vs_stock:5.1f}x (target >= {TARGET_VS_STOCK:.0f}x: "
              f"{'ok' if vs_stock >= TARGET_VS_STOCK else 'MISSED'});  celeriac / best raw COPY = {vs_copy:4.0%} "
              f"(target >= {TARGET_VS_COPY:.0%}: {'ok' if vs_copy >= TARGET_VS_COPY else 'MISSED'})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": {k: {str(n): v for n, v in d.items()} for k, d in res.items()},
                       "summary": {str(n): v for n, v in summary.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
