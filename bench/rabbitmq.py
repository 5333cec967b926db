#!/usr/bin/env python3
"""celeriac against the stock Celery worker on RabbitMQ (AMQP mode), in one run.

    python3 bench/rabbitmq.py [--quick] [--json FILE]

Sections (bench/README.md, "AMQP mode", explains the method):
  a  drain of pre-published native.noop messages with results stored (Redis result backend), tasks/s; in the
     same turns, the broker's own ceiling at that window: build/bench/amqp-ceiling consumes and acks the same
     messages as celeriac does, and does nothing else (no decoding, no task, no result)
  b  result latency, client basic.publish -> result PUBLISH seen by a Redis subscriber, idle: p50 and p99

A private RabbitMQ node and a private redis-server (results), both on free loopback ports. The two workers
run one after the other with the same -c and --prefetch-multiplier and the same log level, taking turns.
The node runs with the package's own Erlang flags (Debian's rabbitmq-server already passes +sbwt none
+sbwtdcpu none +sbwtdio none: its schedulers do not busy-wait); the first line of the output shows the
scheduler flags it runs with. Each drain line also shows the node's CPU per task over that drain (user +
system of its Erlang VM, from /proc), the same measure for both workers.
This is a measurement, not a test: it exits 0 whether or not the target is met (1 when it could not measure).
"""
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for p in (HERE, REPO, os.path.join(REPO, "tests", "integration")):
    if p not in sys.path:
        sys.path.insert(0, p)

import amqp  # noqa: E402  (py-amqp: what the stock client itself publishes with)
import redis  # noqa: E402

from servers import Celeriac, CeleryWorker, RabbitServer, RedisServer, celeriac_binary  # noqa: E402

QUEUE = "celery"
TARGET = 10.0  # the issue: >= 10x the stock worker's drain throughput


def log(msg=""):
    print(msg, flush=True)


class Template:
    """The message the stock client publishes for native.noop, captured once from a Redis broker (kombu's
    envelope holds the same headers and properties an AMQP publish carries); only the ids change."""

    def __init__(self, rs):
        from celery import Celery

        app = Celery("bench-capture", broker=rs.url(2), backend=rs.url(1), set_as_current=False)
        app.conf.update(task_serializer="json", accept_content=["json"])
        res = app.send_task("native.noop", queue="capture")
        raw = rs.client(2).rpop("capture")
        app.close()
        env = json.loads(raw)
        import base64

        self.body = base64.b64decode(env["body"])
        self.headers = env["headers"]
        self.props = env["properties"]
        assert self.headers["id"] == res.id

    def message(self):
        tid = str(uuid.uuid4())
        h = dict(self.headers, id=tid, root_id=tid)
        return tid, amqp.Message(self.body, content_type="application/json", content_encoding="utf-8",
                                 application_headers=h, correlation_id=tid, reply_to=self.props.get("reply_to"),
                                 delivery_mode=2, priority=0)


class Broker:
    """A py-amqp connection to the node: declares the queue as Celery does, publishes, counts."""

    def __init__(self, rb):
        self.conn = amqp.Connection(f"127.0.0.1:{rb.port}")
        self.conn.connect()
        self.ch = self.conn.channel()
        self.ch.exchange_declare(QUEUE, "direct", durable=True, auto_delete=False)
        self.ch.queue_declare(QUEUE, durable=True, auto_delete=False)
        self.ch.queue_bind(QUEUE, QUEUE, QUEUE)

    def publish(self, tmpl, n):
        ids = []
        for _ in range(n):
            tid, m = tmpl.message()
            ids.append(tid)
            self.ch.basic_publish(m, exchange="", routing_key=QUEUE)
        return ids

    def depth(self):
        return self.ch.queue_declare(QUEUE, passive=True).message_count

    def purge(self):
        self.ch.queue_purge(QUEUE)

    def close(self):
        self.conn.close()


def make_worker(kind, rb, rs, opts):
    common = ["-c", str(opts.concurrency), "--prefetch-multiplier", str(opts.prefetch_multiplier), "-l", "warning"]
    if kind == "celeriac":
        return Celeriac(common + ["-n", "celeriac-bench@%h"], broker_url=rb.url(), backend_url=rs.url(1))
    return CeleryWorker(common + ["-n", "stock-bench@%h"], app="python_tasks.fallbacks", broker_url=rb.url(),
                        backend_url=rs.url(1), pythonpath=REPO)


def stop(w):
    try:
        w.stop(signal.SIGTERM, timeout=30)
    except TimeoutError:
        pass
    w.cleanup()


def node_cpu(rb):
    """CPU seconds the RabbitMQ node (its Erlang VM) has used so far."""
    with open(os.path.join(rb.tmpdir, "rabbit.pid")) as f:
        pid = int(f.read().strip())
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def node_sched_flags(rb):
    """The Erlang VM's scheduler flags (-S..., -sbwt...), as the node was started with them."""
    with open(os.path.join(rb.tmpdir, "rabbit.pid")) as f:
        pid = int(f.read().strip())
    with open(f"/proc/{pid}/cmdline") as f:
        args = f.read().split("\0")
    flags = [f"{a} {b}" for a, b in zip(args, args[1:]) if a in ("-S", "-sbt", "-stbt") or a.startswith("-sbwt")]
    return " ".join(flags) or "(Erlang defaults)"


def settle(rb, timeout=20.0):
    """Waits until the node is idle (under 5% of a core over 0.2 s, twice in a row): the queue depth counts a
    persistent message before the node has finished writing it to disk, and that work would otherwise land in
    the drain of whichever worker runs first, in proportion to the backlog (20,000 for celeriac, 3,000 for the
    stock worker)."""
    quiet, deadline = 0, time.monotonic() + timeout
    while quiet < 2 and time.monotonic() < deadline:
        c0 = node_cpu(rb)
        time.sleep(0.2)
        quiet = quiet + 1 if node_cpu(rb) - c0 < 0.01 else 0


def ceiling_binary():
    """bench/amqp_ceiling.c, built next to the celeriac binary (build/bench/amqp-ceiling)."""
    return os.path.join(os.path.dirname(celeriac_binary()), "bench", "amqp-ceiling")


def backlog(rb, br, tmpl, n):
    """n messages waiting in the queue, written by the node; returns their task ids."""
    br.purge()
    ids = br.publish(tmpl, n)
    wait = time.monotonic() + 30
    while br.depth() < n and time.monotonic() < wait:
        time.sleep(0.05)
    settle(rb)
    return ids


def ceiling_once(rb, br, tmpl, n, opts):
    backlog(rb, br, tmpl, n)
    cpu0 = node_cpu(rb)
    window = opts.concurrency * opts.prefetch_multiplier
    out = subprocess.run([ceiling_binary(), str(rb.port), QUEUE, str(n), str(window)], capture_output=True,
                         text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"amqp-ceiling: {out.stderr.strip()}")
    count, took = out.stdout.split()
    return int(count) / float(took), (node_cpu(rb) - cpu0) / n * 1e6


def drain_once(kind, rb, rs, br, tmpl, n, opts):
    if kind == "ceiling":
        return ceiling_once(rb, br, tmpl, n, opts)
    results = rs.client(1)
    results.flushdb()
    ids = backlog(rb, br, tmpl, n)
    w = make_worker(kind, rb, rs, opts)
    w.start()
    try:
        deadline = time.monotonic() + 120 + (60 if kind == "stock" else 0)
        while br.depth() >= n:  # the clock starts at the first message taken
            if not w.running() or time.monotonic() > deadline:
                raise RuntimeError(f"{kind} did not start consuming:\n{w.log_tail()}")
            time.sleep(0.0005)
        t0, cpu0 = time.monotonic(), node_cpu(rb)
        while results.dbsize() < n:
            if not w.running() or time.monotonic() > deadline:
                raise RuntimeError(f"{kind}: {results.dbsize()}/{n} results:\n{w.log_tail()}")
            time.sleep(0.002)
        took = time.monotonic() - t0
        cpu = node_cpu(rb) - cpu0
        sample = results.mget([f"celery-task-meta-{i}" for i in ids[:: max(1, n // 50)]])
        assert all(json.loads(d)["status"] == "SUCCESS" for d in sample), "a result is not SUCCESS"
        return n / took, cpu / n * 1e6
    finally:
        stop(w)


def latency(kind, rb, rs, br, tmpl, n, opts):
    results = rs.client(1)
    results.flushdb()
    br.purge()
    w = make_worker(kind, rb, rs, opts)
    w.start()
    sub = rs.client(1).pubsub()
    sub.psubscribe("celery-task-meta-*")
    try:
        # Ready once a probe comes back (works at any log level).
        deadline = time.monotonic() + 90
        while True:
            tid, m = tmpl.message()
            br.ch.basic_publish(m, exchange="", routing_key=QUEUE)
            got = None
            t_end = time.monotonic() + 1
            while time.monotonic() < t_end and got is None:
                msg = sub.get_message(timeout=0.1)
                if msg and msg["type"] == "pmessage" and msg["channel"].decode().endswith(tid):
                    got = msg
            if got:
                break
            if not w.running() or time.monotonic() > deadline:
                raise RuntimeError(f"{kind} never answered a probe:\n{w.log_tail()}")
        lat = []
        for _ in range(n):
            tid, m = tmpl.message()
            want = f"celery-task-meta-{tid}"
            t0 = time.perf_counter()
            br.ch.basic_publish(m, exchange="", routing_key=QUEUE)
            while True:
                msg = sub.get_message(timeout=10)
                if msg is None:
                    raise RuntimeError(f"{kind}: no result for {tid}")
                if msg["type"] == "pmessage" and msg["channel"].decode() == want:
                    break
            lat.append((time.perf_counter() - t0) * 1000)
            time.sleep(0.01)
        lat.sort()
        return lat[len(lat) // 2], lat[min(len(lat) - 1, int(len(lat) * 0.99))]
    finally:
        sub.close()
        stop(w)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--prefetch-multiplier", type=int, default=4)
    ap.add_argument("--json")
    opts = ap.parse_args()
    n_c, n_s, repeat, n_lat = (5000, 1000, 1, 100) if opts.quick else (20000, 3000, 3, 300)
    have_celeriac = os.access(celeriac_binary(), os.X_OK)
    kinds = ["stock"] + (["celeriac"] if have_celeriac else [])
    if not have_celeriac:
        log(f"note: no celeriac binary at {celeriac_binary()}: measuring the stock worker only")
    have_ceiling = os.access(ceiling_binary(), os.X_OK)
    if not have_ceiling:
        log(f"note: no {ceiling_binary()} (built with celeriac): the broker's ceiling is not measured")
    drains = kinds + (["ceiling"] if have_ceiling else [])
    rb, rs = RabbitServer(), RedisServer()
    out = {k: {"drain": [], "broker_us": [], "lat": None} for k in drains}
    try:
        rb.start()
        rs.start()
        br = Broker(rb)
        tmpl = Template(rs)
        log(f"AMQP mode: RabbitMQ node on 127.0.0.1:{rb.port}, results in redis 127.0.0.1:{rs.port}/1; "
            f"-c {opts.concurrency} --prefetch-multiplier {opts.prefetch_multiplier} -l warning; "
            f"node scheduler flags: {node_sched_flags(rb)}")
        for i in range(repeat):
            for k in drains:
                rate, broker_us = drain_once(k, rb, rs, br, tmpl, n_s if k == "stock" else n_c, opts)
                out[k]["drain"].append(rate)
                out[k]["broker_us"].append(broker_us)
                log(f"  (a) drain run {i + 1} {k:8s}: {rate:10.0f} tasks/s   RabbitMQ CPU {broker_us:6.1f} us/task")
        for k in kinds:
            out[k]["lat"] = latency(k, rb, rs, br, tmpl, n_lat, opts)
            log(f"  (b) latency {k:8s}: p50 {out[k]['lat'][0]:.2f} ms  p99 {out[k]['lat'][1]:.2f} ms")
        br.close()
    except Exception as e:  # noqa: BLE001 - reported, exit 1
        log(f"could not measure: {e}")
        return 1
    finally:
        rs.cleanup()
        rb.cleanup()
    log("")
    log(f"{'AMQP':30s} {'stock':>12s} {'celeriac':>12s} {'ratio':>8s}  target")
    s = statistics.median(out["stock"]["drain"])
    if have_celeriac:
        c = statistics.median(out["celeriac"]["drain"])
        ok = "ok" if c / s >= TARGET else "MISSED"
        log(f"{'(a) drain, tasks/s (median)':30s} {s:12.0f} {c:12.0f} {c / s:7.1f}x  >= {TARGET:.0f}x {ok}")
        sb, cb = (statistics.median(out[k]["broker_us"]) for k in ("stock", "celeriac"))
        log(f"{'    RabbitMQ CPU, us/task':30s} {sb:12.1f} {cb:12.1f}")
        if have_ceiling:
            top = statistics.median(out["ceiling"]["drain"])
            log(f"{'    broker ceiling, tasks/s':30s} {'':12s} {top:12.0f} {top / s:7.1f}x  (a consumer that only "
                f"acks, same window; celeriac at {c / top:.0%} of it)")
        for j, name in enumerate(("p50", "p99")):
            sv, cv = out["stock"]["lat"][j], out["celeriac"]["lat"][j]
            log(f"{'(b) latency idle ' + name + ', ms':30s} {sv:12.2f} {cv:12.2f} {sv / cv:7.1f}x faster")
    else:
        log(f"{'(a) drain, tasks/s (median)':30s} {s:12.0f}")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
