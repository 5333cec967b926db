#!/usr/bin/env python3
"""Workflows: celeriac against the stock Celery worker, on one private Redis, in one run.

    python3 bench/workflows.py [--repeat N] [--chord-size N] [--fib N,CUTOFF]

  chord     chord(1,000 x native.add) into native.xsum: time from apply_async() to the body's result,
            and from the moment apply_async() returned (every header message published) to that result
  fib_tree  native.fib_tree(24, 14): a tree of ~300 tasks joined by continuations (stock: the Python version
            in python_tasks/fallbacks.py, deadlock-free with Task.replace + chord), time to the result

Both workers run -c 2 with their default prefetch, the stock one with python_tasks.fallbacks (the same task
names in Python). The median of --repeat runs is reported. A measurement, not a test: exits 0 whether or not
the targets (>= 10x on both) are met, 1 only when it could not measure.
"""
import argparse
import gc
import os
import signal
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for p in (HERE, REPO, os.path.join(REPO, "tests", "integration")):
    if p not in sys.path:
        sys.path.insert(0, p)

from servers import Celeriac, CeleryWorker, RedisServer, celeriac_binary  # noqa: E402


def log(msg=""):
    print(msg, flush=True)


def fib(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def start(kind, rs, app):
    common = ["-c", "2", "-l", "warning"]
    if kind == "celeriac":
        w = Celeriac(common + ["-n", "celeriac-wf@%h"], broker_url=rs.url(0), backend_url=rs.url(1))
    else:
        w = CeleryWorker(common + ["-n", "stock-wf@%h", "--without-mingle", "--without-gossip"],
                         app="python_tasks.fallbacks", broker_url=rs.url(0), backend_url=rs.url(1),
                         pythonpath=REPO)
    w.start()
    # Serving when a task comes back (the stock worker logs "ready" only at -l info, which would slow it).
    app.signature("native.noop").apply_async().get(timeout=90)
    return w


def run_chord(app, size):
    from celery import chord

    header = [app.signature("native.add", args=(i, i)) for i in range(size)]
    body = app.signature("native.xsum")
    t0 = time.perf_counter()
    r = chord(header, body).apply_async()
    t_pub = time.perf_counter()
    value = r.get(timeout=600)
    t_done = time.perf_counter()
    if value != sum(2 * i for i in range(size)):
        raise SystemExit(f"bench: chord returned {value!r}")
    return t_done - t0, t_done - t_pub


def run_fib_tree(app, n, cutoff):
    t0 = time.perf_counter()
    value = app.signature("native.fib_tree", args=(n, cutoff)).apply_async().get(timeout=600)
    elapsed = time.perf_counter() - t0
    if value != fib(n):
        raise SystemExit(f"bench: fib_tree returned {value!r}, expected {fib(n)}")
    return elapsed


def measure(kind, rs, app, opts):
    w = start(kind, rs, app)
    try:
        run_chord(app, 10)  # warm-up: connections, first fork, imports
        # fib_tree first: a chord's 1,000 header results stay subscribed in the client, whose pub/sub traffic
        # would then compete for the two cores with the worker.
        trees = [run_fib_tree(app, *opts.fib) for _ in range(opts.repeat)]
        chords = []
        for _ in range(opts.repeat):
            chords.append(run_chord(app, opts.chord_size))
            gc.collect()
    finally:
        code = w.stop(signal.SIGTERM, timeout=30)
        if code not in (0, None):
            log(f"  ! {kind} exited with {code}:\n{w.log_tail(15)}")
        w.cleanup()
    out = {
        "chord_total": statistics.median(c[0] for c in chords),
        "chord_after_publish": statistics.median(c[1] for c in chords),
        "fib_tree": statistics.median(trees),
    }
    log(f"  {kind:8}  chord {out['chord_total'] * 1000:8.1f} ms (after publish {out['chord_after_publish'] * 1000:7.1f} ms)"
        f"   fib_tree {out['fib_tree'] * 1000:8.1f} ms")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--chord-size", type=int, default=1000)
    ap.add_argument("--fib", default="24,14", help="n,cutoff for fib_tree (default 24,14)")
    opts = ap.parse_args()
    opts.fib = tuple(int(x) for x in opts.fib.split(","))
    if not os.access(celeriac_binary(), os.X_OK):
        log(f"bench: {celeriac_binary()} not found (run `make build`, or set CELERIAC_BIN)")
        return 1
    with RedisServer() as rs:
        os.environ["CELERY_BROKER_URL"] = rs.url(0)
        os.environ["CELERY_RESULT_BACKEND"] = rs.url(1)
        os.environ["CELERIAC_MODE"] = "native"
        os.environ["CELERIAC_NATIVE_QUEUE"] = "celery"  # both workers consume the default queue
        from python_tasks.app import app
        log(f"bench workflows: redis on 127.0.0.1:{rs.port}; chord of {opts.chord_size} native.add -> native.xsum; "
            f"fib_tree{opts.fib}; median of {opts.repeat}")
        res = {k: measure(k, rs, app, opts) for k in ("stock", "celeriac")}
        gc.collect()
        consumer = app.backend.result_consumer
        if getattr(consumer, "_pubsub", None) is not None:
            consumer.stop()
            consumer._pubsub = None
    s, c = res["stock"], res["celeriac"]
    log("")
    log("| workflow | stock | celeriac | ratio | target |")
    log("|---|---|---|---|---|")
    for key, label in (("chord_total", f"chord({opts.chord_size} add) -> xsum, from apply_async()"),
                       ("chord_after_publish", "  the same, from the last header message published"),
                       ("fib_tree", f"fib_tree{opts.fib}")):
        ratio = s[key] / c[key] if c[key] > 0 else float("inf")
        target = ">= 10x" if key != "chord_after_publish" else ""
        log(f"| {label} | {s[key] * 1000:.1f} ms | {c[key] * 1000:.1f} ms | {ratio:.1f}x | {target} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
