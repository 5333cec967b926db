#!/usr/bin/env python3
"""celeriac against the stock Celery worker, on one private Redis, in one run.

    python3 bench/run.py [--quick] [--only a,b,c,d,e] [--workers stock,celeriac] [--json FILE]

Sections (bench/README.md explains the method and what each figure means):
  a  drain of pre-published native.noop messages with results stored, tasks/s
  b  result latency, client LPUSH -> result PUBLISH seen by a subscriber: idle and at 200 tasks/s offered
  c  native.fib(32), time per task
  d  worker memory, all processes (RSS; PSS alongside): idle, and right after (a)
  e  Redis commands per task (exact, INFO commandstats) and round trips per task (approximate, INFO stats)

Both workers run with the same -c and --prefetch-multiplier and the same log level, one after the other,
against the same redis-server on a free loopback port. Nothing else is contacted. This is a measurement,
not a test: it exits 0 whether or not the targets are met (1 only when it could not measure).
"""
import argparse
import gc
import json
import os
import select
import signal
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for p in (HERE, REPO, os.path.join(REPO, "tests", "integration")):
    if p not in sys.path:
        sys.path.insert(0, p)

import messages  # noqa: E402
import procs  # noqa: E402
import resp  # noqa: E402
from servers import Celeriac, CeleryWorker, RedisServer, celeriac_binary  # noqa: E402

QUEUE = "celery"
META = "celery-task-meta-"
FIB_N, FIB_VALUE = 32, 2178309

# The targets, celeriac relative to the stock worker.
TARGETS = {
    "drain": ("x", 30.0, ">= 30x"),
    "p99": ("1/x", 4.0, "p99 <= 1/4"),
    "fib": ("x", 40.0, ">= 40x"),
    "rss": ("1/x", 10.0, "<= 1/10"),
}


class BenchError(Exception):
    pass


def log(msg=""):
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------------------
# Workers

class Kind:
    """How to start one of the two workers on the bench's Redis."""

    def __init__(self, key, label, opts):
        self.key, self.label, self.opts = key, label, opts

    def make(self, rs):
        o = self.opts
        common = ["-c", str(o.concurrency), "--prefetch-multiplier", str(o.prefetch_multiplier),
                  "-l", o.loglevel]
        if self.key == "celeriac":
            return Celeriac(common + ["-n", "celeriac-bench@%h"], broker_url=rs.url(0), backend_url=rs.url(1))
        return CeleryWorker(common + ["-n", "stock-bench@%h"], app="python_tasks.fallbacks",
                            broker_url=rs.url(0), backend_url=rs.url(1), pythonpath=REPO)


def stop_worker(w):
    try:
        code = w.stop(signal.SIGTERM, timeout=30)
    except TimeoutError as e:
        log(f"    ! {w.name} did not stop on SIGTERM within 30 s; killed. {e}")
        code = None
    if code not in (0, None):
        log(f"    ! {w.name} exited with code {code}; log tail:\n{w.log_tail(15)}")
    return code


def fail_with_log(w, what):
    tail = w.log_tail(25) if w else ""
    raise BenchError(f"{what}\n--- {w.name if w else ''} log tail ---\n{tail}")


# --------------------------------------------------------------------------------------------------------
# Redis helpers on raw connections (every command the bench itself sends during a measured window is
# counted, so that it can be taken out of the server's statistics).

class Counted:
    """A resp.Conn that counts the commands it sends (each is its own round trip)."""

    def __init__(self, rs, db):
        self.conn = resp.Conn("127.0.0.1", rs.port, db)
        self.sent = 0

    def call(self, *args):
        self.sent += 1
        return self.conn.call(*args)

    def close(self):
        self.conn.close()


def parse_info(text):
    """INFO text -> {"stats": {field: number|str}, "cmd": {name: calls}}."""
    stats, cmd = {}, {}
    for line in text.decode().splitlines():
        if not line or line.startswith("#") or ":" not in line:
            continue
        k, v = line.split(":", 1)
        if k.startswith("cmdstat_"):
            calls = dict(kv.split("=", 1) for kv in v.split(","))["calls"]
            cmd[k[len("cmdstat_"):]] = int(calls)
        else:
            try:
                stats[k] = float(v) if "." in v else int(v)
            except ValueError:
                stats[k] = v
    return {"stats": stats, "cmd": cmd}


def info(conn):
    return parse_info(conn.call("INFO", "all"))


# --------------------------------------------------------------------------------------------------------
# Readiness: one probe task, so it works at any log level and proves the worker actually serves.

def wait_serving(w, rs, template, timeout=90.0):
    r1 = rs.client(1)
    tid, raw = template.make()
    rs.client(0).lpush(QUEUE, raw)
    deadline = time.monotonic() + timeout
    while not r1.exists(META + tid):
        if not w.running():
            fail_with_log(w, f"{w.name} exited during start-up (code {w.proc.poll()})")
        if time.monotonic() > deadline:
            fail_with_log(w, f"{w.name} did not run a probe task within {timeout:.0f} s")
        time.sleep(0.01)
    r1.delete(META + tid)


# --------------------------------------------------------------------------------------------------------
# (b) and (c): LPUSH -> PUBLISH latency, on raw sockets in one select() loop.

class Probe:
    """A publisher connection (broker db) and a subscriber on celery-task-meta-* (pub/sub ignores dbs)."""

    def __init__(self, rs):
        self.pub = resp.Conn("127.0.0.1", rs.port, 0)
        self.sub = resp.Conn("127.0.0.1", rs.port, 0)
        self.sub.call("PSUBSCRIBE", META + "*")
        self.sent = {}      # task id -> perf_counter at send
        self.got = {}       # task id -> (latency s, result document)

    def send(self, template):
        tid, raw = template.make()
        data = resp.encode("LPUSH", template.queue, raw)
        self.sent[tid] = time.perf_counter()
        self.pub.send(data)
        return tid

    def poll(self, timeout):
        """Waits up to timeout s for traffic; records results that arrived. Returns the ids completed."""
        ready, _, _ = select.select([self.sub, self.pub], [], [], max(0.0, timeout))
        done = []
        for c in ready:
            now = time.perf_counter()
            for rep in c.read():
                if c is self.pub:
                    if isinstance(rep, resp.RedisError):
                        raise BenchError(f"LPUSH failed: {rep}")
                    continue
                if isinstance(rep, list) and len(rep) == 4 and rep[0] == b"pmessage":
                    tid = rep[2].decode()[len(META):]
                    t0 = self.sent.get(tid)
                    if t0 is not None and tid not in self.got:
                        self.got[tid] = (now - t0, rep[3])
                        done.append(tid)
        return done

    def wait_for(self, tid, timeout):
        deadline = time.perf_counter() + timeout
        while tid not in self.got:
            left = deadline - time.perf_counter()
            if left <= 0:
                raise BenchError(f"no result PUBLISH for task {tid} within {timeout} s")
            self.poll(left)
        return self.got[tid]

    def close(self):
        self.pub.close()
        self.sub.close()


def check_doc(doc, expect):
    d = json.loads(doc)
    return d.get("status") == "SUCCESS" and d.get("result") == expect


def pct(values, p):
    v = sorted(values)
    if not v:
        return float("nan")
    k = (len(v) - 1) * p / 100.0
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def harness_floor(rs, n=200):
    """PUBLISH straight from the client's socket to the subscriber: the measuring loop's own floor."""
    pr = Probe(rs)
    lat = []
    try:
        for i in range(n):
            ch = f"{META}floor-{i}"
            pr.sent[f"floor-{i}"] = time.perf_counter()
            pr.pub.send(resp.encode("PUBLISH", ch, "x"))
            pr.wait_for(f"floor-{i}", 5)
            lat.append(pr.got[f"floor-{i}"][0])
    finally:
        pr.close()
    return {"p50_ms": pct(lat, 50) * 1e3, "p99_ms": pct(lat, 99) * 1e3}


def latency_idle(rs, template, n, gap):
    """One task at a time; the next is sent `gap` s after the previous result, so the worker is idle."""
    pr = Probe(rs)
    lat, bad = [], 0
    try:
        for _ in range(n):
            tid = pr.send(template)
            dt, doc = pr.wait_for(tid, 30)
            lat.append(dt)
            bad += not check_doc(doc, None)
            time.sleep(gap)
    finally:
        pr.close()
    return summarize(lat, n, bad)


def latency_load(rs, template, rate, duration):
    """Open loop: a task every 1/rate s for `duration` s, whatever the results do; each latency is taken
    from the actual send time."""
    pr = Probe(rs)
    n = int(rate * duration)
    try:
        start = time.perf_counter()
        i = 0
        while i < n:
            now = time.perf_counter()
            due = start + i / rate
            if now >= due:
                pr.send(template)
                i += 1
                continue
            pr.poll(due - now)
        deadline = time.perf_counter() + 30
        while len(pr.got) < n and time.perf_counter() < deadline:
            pr.poll(deadline - time.perf_counter())
        achieved = n / (max(pr.sent.values()) - min(pr.sent.values())) * (n - 1) / n if n > 1 else 0
        lat = [v[0] for v in pr.got.values()]
        bad = sum(not check_doc(v[1], None) for v in pr.got.values())
    finally:
        pr.close()
    s = summarize(lat, n, bad)
    s["offered_per_s"] = round(achieved, 1)
    return s


def summarize(lat, n, bad):
    return {"n": n, "received": len(lat), "bad": bad,
            "p50_ms": pct(lat, 50) * 1e3, "p90_ms": pct(lat, 90) * 1e3,
            "p99_ms": pct(lat, 99) * 1e3, "max_ms": max(lat) * 1e3 if lat else float("nan"),
            "samples": lat}


def pool_rounds(into, out):
    """Adds one round's (b) figures to the worker's: the percentiles are those of every sample so far."""
    for key in ("lat_idle", "lat_load"):
        if key not in out:
            continue
        new = out.pop(key)
        old = into.get(key)
        if old is None:
            into[key] = new
            continue
        merged = summarize(old["samples"] + new["samples"], old["n"] + new["n"], old["bad"] + new["bad"])
        if "offered_per_s" in new:
            merged["offered_per_s"] = round((old["offered_per_s"] + new["offered_per_s"]) / 2, 1)
        into[key] = merged
    into.update(out)


def fib_times(rs, template, n):
    """native.fib(32) one at a time: LPUSH -> PUBLISH per task."""
    pr = Probe(rs)
    times, bad = [], 0
    try:
        for _ in range(n):
            tid = pr.send(template)
            dt, doc = pr.wait_for(tid, 300)
            times.append(dt)
            bad += not check_doc(doc, FIB_VALUE)
    finally:
        pr.close()
    return {"n": n, "bad": bad, "median_ms": statistics.median(times) * 1e3,
            "min_ms": min(times) * 1e3, "max_ms": max(times) * 1e3}


# --------------------------------------------------------------------------------------------------------
# (a), (d after) and (e): a pre-published backlog drained by a freshly started worker.

def window(sa, sb, own):
    """What the worker sent to Redis between two INFO snapshots: {"cmd": {name: calls}, "reads", "cpu_s",
    "net_in"}. own: {name: calls} the bench itself sent in between, each in its own round trip."""
    cmd = {k: v - sa["cmd"].get(k, 0) - own.get(k, 0) for k, v in sb["cmd"].items()}
    st = lambda k: sb["stats"].get(k, 0) - sa["stats"].get(k, 0)  # noqa: E731
    return {"cmd": {k: v for k, v in cmd.items() if v}, "reads": st("total_reads_processed") - sum(own.values()),
            "cpu_s": st("used_cpu_user") + st("used_cpu_sys"), "net_in": st("total_net_input_bytes")}


def drain_once(kind, rs, template, n, app, opts):
    """Publishes n noops, starts the worker, times start of consumption -> last result, and takes INFO
    snapshots at launch (s0), at the first pop seen (s_t0) and at the last result (s1): s0..s_t0 is the
    worker's start-up, s_t0..s1 the drain that (e) reports."""
    r0, r1 = rs.client(0), rs.client(1)
    r0.flushall()
    ids = messages.publish(r0, template, n)
    if r0.llen(QUEUE) != n:
        raise BenchError("publishing the backlog failed")
    c0, c1 = Counted(rs, 0), Counted(rs, 1)
    w = kind.make(rs)
    n_llen = n_dbsize = 0
    try:
        s0 = info(c0)
        w.start()
        t_launch = time.perf_counter()
        # start of consumption: the first time the queue is seen shorter than the backlog
        deadline = t_launch + 90
        while True:
            n_llen += 1
            if c0.call("LLEN", QUEUE) < n:
                break
            if not w.running():
                fail_with_log(w, f"{w.name} exited during start-up")
            if time.perf_counter() > deadline:
                fail_with_log(w, f"{w.name} did not start consuming within 90 s")
            time.sleep(0.0005)
        t0 = time.perf_counter()
        s_t0 = info(c0)
        cpu0 = procs.cpu_seconds(w.pid)
        # end: every result key present (db 1 holds nothing else)
        deadline = t0 + max(60.0, n / 100.0)
        while True:
            n_dbsize += 1
            if c1.call("DBSIZE") >= n:
                break
            if not w.running():
                fail_with_log(w, f"{w.name} exited while draining")
            if time.perf_counter() > deadline:
                fail_with_log(w, f"{w.name} did not store all {n} results within {deadline - t0:.0f} s")
            time.sleep(0.002)
        t1 = time.perf_counter()
        s1 = info(c0)
        cpu1 = procs.cpu_seconds(w.pid)
        mem = procs.memory(w.pid)
        time.sleep(0.3)
        leftover = {"queue": r0.llen(QUEUE), "unacked": r0.hlen("unacked"),
                    "unacked_index": r0.zcard("unacked_index")}
        verified = verify(r1, ids, app, opts.samples)
    finally:
        code = stop_worker(w)
        c0.close()
        c1.close()
        w.cleanup()
    if verified["bad"]:
        raise BenchError(f"{kind.label}: {verified['bad']} of {n} results wrong, e.g. {verified['example']}")

    # INFO does not count itself, so s_t0 holds s0's INFO and s1 holds s_t0's.
    startup = window(s0, s_t0, {"info": 1, "llen": n_llen})
    drain = window(s_t0, s1, {"info": 1, "dbsize": n_dbsize})
    commands = sum(drain["cmd"].values())
    return {
        "n": n, "rate": n / (t1 - t0), "seconds": t1 - t0, "startup_s": t0 - t_launch,
        "worker_cpu_us_per_task": (cpu1 - cpu0) / n * 1e6,
        "redis_cpu_us_per_task": drain["cpu_s"] / n * 1e6,
        "commands_per_task": commands / n,
        "round_trips_per_task": drain["reads"] / n,
        "net_in_bytes_per_task": drain["net_in"] / n,
        "by_command": {k: v / n for k, v in sorted(drain["cmd"].items(), key=lambda kv: -kv[1])},
        "startup_commands": sum(startup["cmd"].values()), "startup_reads": startup["reads"],
        "mem_after": mem, "leftover": leftover, "verified": verified["ok"], "exit_code": code,
    }


def verify(r1, ids, app, samples):
    """Every result document (MGET), and a few through the stock client's AsyncResult.get()."""
    ok, bad, example = 0, 0, None
    for i in range(0, len(ids), 1000):
        chunk = ids[i:i + 1000]
        for tid, raw in zip(chunk, r1.mget([META + t for t in chunk])):
            d = json.loads(raw) if raw else None
            if d and d.get("status") == "SUCCESS" and d.get("result") is None and d.get("task_id") == tid \
                    and d.get("date_done"):
                ok += 1
            else:
                bad += 1
                example = example or (tid, raw)
    if samples and not bad:
        from celery.result import AsyncResult
        step = max(1, len(ids) // samples)
        for tid in ids[::step][:samples]:
            res = AsyncResult(tid, app=app)
            if res.get(timeout=10) is not None:
                bad += 1
                example = example or (tid, "AsyncResult.get() did not return None")
            del res
        gc.collect()  # AsyncResult.__del__ talks to Redis: let it happen while the server is up
    return {"ok": ok, "bad": bad, "example": example}


# --------------------------------------------------------------------------------------------------------
# One worker kind, start to end.

def live_phase(kind, rs, tmpl, app, opts, sections, sizes):
    """(d) idle, (b) and (c) on one freshly started worker."""
    out = {}
    if sections & {"b", "c", "d"}:
        rs.client(0).flushall()
        w = kind.make(rs)
        try:
            t = time.perf_counter()
            w.start()
            wait_serving(w, rs, tmpl["noop"])
            out["ready_s"] = time.perf_counter() - t
            time.sleep(2.0)
            if "d" in sections:
                out["mem_idle"] = procs.memory(w.pid)
                log(f"    idle memory: RSS {out['mem_idle']['rss_kb'] / 1024:.1f} MB in "
                    f"{out['mem_idle']['nprocs']} processes (PSS {out['mem_idle']['pss_kb'] / 1024:.1f} MB)")
            if "b" in sections:
                out["lat_idle"] = latency_idle(rs, tmpl["noop"], sizes["lat_idle"], 0.010)
                log(f"    latency idle: p50 {out['lat_idle']['p50_ms']:.3f} ms, p99 {out['lat_idle']['p99_ms']:.3f} ms"
                    f" ({out['lat_idle']['received']}/{out['lat_idle']['n']} tasks)")
                out["lat_load"] = latency_load(rs, tmpl["noop"], opts.rate, sizes["lat_load_s"])
                ll = out["lat_load"]
                log(f"    latency at {ll['offered_per_s']:.0f}/s: p50 {ll['p50_ms']:.3f} ms, p99 {ll['p99_ms']:.3f} ms"
                    f" ({ll['received']}/{ll['n']} tasks)")
                if ll["received"] < ll["n"] or ll["bad"] or out["lat_idle"]["bad"]:
                    log("    ! some latency tasks were lost or wrong")
            if "c" in sections:
                n = sizes["fib_" + kind.key]
                out["fib"] = fib_times(rs, tmpl["fib"], n)
                log(f"    fib({FIB_N}): median {out['fib']['median_ms']:.1f} ms per task ({n} tasks, "
                    f"min {out['fib']['min_ms']:.1f}, max {out['fib']['max_ms']:.1f})")
                if out["fib"]["bad"]:
                    log("    ! wrong fib results")
        finally:
            stop_worker(w)
            w.cleanup()
    return out


def drain_round(kind, rs, tmpl, app, opts, sizes, i, out):
    """One drain run (a, d after, e) of one worker; the runs of the two workers alternate."""
    n = sizes["drain_" + kind.key]
    r = drain_once(kind, rs, tmpl["noop"], n, app, opts)
    out.setdefault("drain_runs", []).append(r)
    left = ", ".join(f"{k} {v}" for k, v in r["leftover"].items() if v)
    log(f"    {kind.label} drain {i + 1}/{sizes['repeat']}: {n} tasks in {r['seconds']:.3f} s = "
        f"{r['rate']:,.0f} tasks/s (consuming {r['startup_s']:.2f} s after launch; {r['verified']} results "
        f"verified{'; LEFT: ' + left if left else ''}); {r['commands_per_task']:.2f} commands/task, "
        f"~{r['round_trips_per_task']:.2f} round trips/task; start-up before the first pop: "
        f"{r['startup_commands']} commands, {r['startup_reads']} reads")
    runs = out["drain_runs"]
    out["drain"] = sorted(runs, key=lambda x: x["rate"])[len(runs) // 2]


# --------------------------------------------------------------------------------------------------------
# Report

def fmt_ratio(kind, value):
    if value is None:
        return "-"
    return f"{value:.1f}x" if kind == "x" else f"1/{value:.1f}"


def report(res, opts):
    st, ce = res.get("stock", {}), res.get("celeriac", {})

    def g(d, *path):
        for p in path:
            if not isinstance(d, dict) or p not in d:
                return None
            d = d[p]
        return d

    rows = []

    def row(label, sv, cv, fmt, ratio=None, target=None):
        s = fmt(sv) if sv is not None else "-"
        c = fmt(cv) if cv is not None else "-"
        if ratio and sv is not None and cv is not None and sv and cv:
            rkind, goal, text = TARGETS[ratio]
            value = (cv / sv) if ratio in ("drain",) else (sv / cv)
            verdict = "ok" if value >= goal else "MISSED"
            rows.append((label, s, c, fmt_ratio(rkind, value), f"{text} {verdict}"))
        elif target == "info" and sv and cv:
            rows.append((label, s, c, f"{sv / cv:.1f}x fewer", ""))
        else:
            rows.append((label, s, c, "", TARGETS[ratio][2] if ratio else ""))

    f0 = lambda v: f"{v:,.0f}"  # noqa: E731
    f2 = lambda v: f"{v:.2f}"  # noqa: E731
    f3 = lambda v: f"{v:.3f}"  # noqa: E731
    f1 = lambda v: f"{v:.1f}"  # noqa: E731
    mb = lambda v: f"{v / 1024:.1f}"  # noqa: E731

    row("(a) drain noop + result, tasks/s", g(st, "drain", "rate"), g(ce, "drain", "rate"), f0, "drain")
    row("(b) latency idle p50, ms", g(st, "lat_idle", "p50_ms"), g(ce, "lat_idle", "p50_ms"), f3)
    row("(b) latency idle p99, ms", g(st, "lat_idle", "p99_ms"), g(ce, "lat_idle", "p99_ms"), f3, "p99")
    row(f"(b) latency @{opts.rate:g}/s p50, ms", g(st, "lat_load", "p50_ms"), g(ce, "lat_load", "p50_ms"), f3)
    row(f"(b) latency @{opts.rate:g}/s p99, ms", g(st, "lat_load", "p99_ms"), g(ce, "lat_load", "p99_ms"), f3, "p99")
    row(f"(c) fib({FIB_N}) per task, ms", g(st, "fib", "median_ms"), g(ce, "fib", "median_ms"), f1, "fib")
    row("(d) RSS idle, MB (all processes)", g(st, "mem_idle", "rss_kb"), g(ce, "mem_idle", "rss_kb"), mb, "rss")
    row("(d) RSS after (a), MB", g(st, "drain", "mem_after", "rss_kb"), g(ce, "drain", "mem_after", "rss_kb"), mb, "rss")
    row("    PSS idle, MB", g(st, "mem_idle", "pss_kb"), g(ce, "mem_idle", "pss_kb"), mb)
    row("    PSS after (a), MB", g(st, "drain", "mem_after", "pss_kb"), g(ce, "drain", "mem_after", "pss_kb"), mb)
    row("(e) Redis commands / task", g(st, "drain", "commands_per_task"), g(ce, "drain", "commands_per_task"),
        f2, target="info")
    row("(e) round trips / task (approx.)", g(st, "drain", "round_trips_per_task"),
        g(ce, "drain", "round_trips_per_task"), f2, target="info")
    row("    Redis CPU / task, us", g(st, "drain", "redis_cpu_us_per_task"), g(ce, "drain", "redis_cpu_us_per_task"),
        f1, target="info")
    row("    worker CPU / task, us", g(st, "drain", "worker_cpu_us_per_task"),
        g(ce, "drain", "worker_cpu_us_per_task"), f1, target="info")

    head = ("", "stock celery", "celeriac", "ratio", "target")
    sections = set(opts.only.replace(" ", "").split(","))
    kept, sec = [], None
    for r in rows:  # a row belongs to the section its label names; indented rows to the one above
        sec = r[0][1] if r[0].startswith("(") else sec
        if sec in sections and (r[1] != "-" or r[2] != "-"):
            kept.append(r)
    rows = kept
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(5)]
    line = lambda r: "  ".join(r[i].ljust(widths[i]) if i in (0, 4) else r[i].rjust(widths[i])  # noqa: E731
                               for i in range(5)).rstrip()
    log(line(head))
    log("-" * len(line(head)))
    for r in rows:
        log(line(r))
    for key, label in (("stock", "stock celery"), ("celeriac", "celeriac")):
        bc = g(res.get(key, {}), "drain", "by_command")
        if bc and "e" in sections:
            log(f"(e) {label}, commands per task: " + ", ".join(f"{k} {v:.2f}" for k, v in bc.items() if v >= 0.005))


# --------------------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller runs (about a minute)")
    ap.add_argument("--only", default="a,b,c,d,e", help="sections to run, e.g. a,b (default: all)")
    ap.add_argument("--workers", default="stock,celeriac", help="which workers (default: stock,celeriac)")
    ap.add_argument("--concurrency", "-c", type=int, default=2, help="-c for both workers (default 2)")
    ap.add_argument("--prefetch-multiplier", type=int, default=4, help="for both workers (default 4, celeriac's)")
    ap.add_argument("--loglevel", default="warning", help="-l for both workers (default warning, both defaults)")
    ap.add_argument("--rate", type=float, default=200.0, help="offered load for (b), tasks/s (default 200)")
    ap.add_argument("--drain-celeriac", type=int, help="backlog for celeriac in (a) (default 20000)")
    ap.add_argument("--drain-stock", type=int, help="backlog for the stock worker in (a) (default 3000)")
    ap.add_argument("--repeat", type=int, help="drain runs per worker, the median is reported (default 3)")
    ap.add_argument("--samples", type=int, default=5, help="drained results also read with AsyncResult.get()")
    ap.add_argument("--json", metavar="FILE", help="write every figure to FILE as JSON")
    opts = ap.parse_args()

    sections = {s.strip() for s in opts.only.split(",") if s.strip()}
    if not sections <= set("abcde"):
        ap.error("--only takes letters among a,b,c,d,e")
    wanted = [w.strip() for w in opts.workers.split(",") if w.strip()]
    if not set(wanted) <= {"stock", "celeriac"} or not wanted:
        ap.error("--workers takes stock and/or celeriac")
    q = opts.quick
    sizes = {
        "drain_celeriac": opts.drain_celeriac or (5000 if q else 20000),
        "drain_stock": opts.drain_stock or (1000 if q else 3000),
        "repeat": opts.repeat or (1 if q else 3),
        "lat_rounds": 1 if q else 3,
        "lat_idle": 100 if q else 200,
        "lat_load_s": 3.0 if q else 5.0,
        "fib_celeriac": 5 if q else 10,
        "fib_stock": 2 if q else 3,
    }

    missing = []
    if "celeriac" in wanted and not os.access(celeriac_binary(), os.X_OK):
        missing.append(f"celeriac: {celeriac_binary()} not found (run `make build`, or set CELERIAC_BIN); "
                       "measuring the stock worker only")
        wanted.remove("celeriac")
    if not wanted:
        log(missing[0])
        return 1
    for m in missing:
        log(m)

    order = [k for k in ("stock", "celeriac") if k in wanted]
    log(f"bench: sections {','.join(sorted(sections))}; workers {', '.join(order)}; -c {opts.concurrency}, "
        f"--prefetch-multiplier {opts.prefetch_multiplier}, -l {opts.loglevel}; {os.cpu_count()} cores")
    load1 = os.getloadavg()[0]
    if load1 > 0.5:
        log(f"bench: note: load average {load1:.2f} before starting; other work on this machine adds noise")
    results = {"sizes": sizes, "options": vars(opts)}
    t_start = time.perf_counter()
    try:
        with RedisServer() as rs:
            log(f"bench: private redis-server on 127.0.0.1:{rs.port} (broker db 0, results db 1)")
            os.environ["CELERY_BROKER_URL"] = rs.url(0)
            os.environ["CELERY_RESULT_BACKEND"] = rs.url(1)
            os.environ["CELERIAC_MODE"] = "native"
            os.environ["CELERIAC_NATIVE_QUEUE"] = "celery"  # both workers consume the default queue
            os.environ.pop("CELERIAC_QUEUE", None)
            from python_tasks.app import app  # reads the environment at import
            r0 = rs.client(0)
            tmpl = {"noop": messages.capture(app, r0, "native.noop"),
                    "fib": messages.capture(app, r0, "native.fib", [FIB_N])}
            if "b" in sections:
                results["harness_floor"] = harness_floor(rs)
                log(f"bench: harness floor (PUBLISH -> subscriber, no worker): "
                    f"p50 {results['harness_floor']['p50_ms']:.3f} ms, p99 {results['harness_floor']['p99_ms']:.3f} ms")
            kinds = [Kind(key, "stock celery" if key == "stock" else "celeriac", opts) for key in order]
            for kind in kinds:
                results[kind.key] = {}
            if sections & {"b", "c", "d"}:
                # (b) in rounds, the workers taking turns as in (a), so that a burst of other activity on the
                # machine does not land in one worker's samples only; the first round also does (c) and (d).
                rounds = sizes["lat_rounds"] if "b" in sections else 1
                for r in range(rounds):
                    for kind in kinds:
                        secs = sections if r == 0 else sections & {"b"}
                        log(f"== {kind.label}: " + ("idle memory, latency, fib" if r == 0 else "latency") +
                            (f" (round {r + 1}/{rounds})" if rounds > 1 else ""))
                        t = time.perf_counter()
                        pool_rounds(results[kind.key], live_phase(kind, rs, tmpl, app, opts, secs, sizes))
                        log(f"   ({time.perf_counter() - t:.0f} s)")
                for kind in kinds:
                    for key in ("lat_idle", "lat_load"):
                        if rounds > 1 and key in results[kind.key]:
                            v = results[kind.key][key]
                            log(f"   {kind.label} {key.replace('lat_', 'latency ')}, all rounds: p50 {v['p50_ms']:.3f}"
                                f" ms, p99 {v['p99_ms']:.3f} ms ({v['received']}/{v['n']} tasks)")
                        results[kind.key].get(key, {}).pop("samples", None)
            if sections & {"a", "d", "e"}:
                log("== drain of a pre-published backlog, the workers taking turns")
                t = time.perf_counter()
                for i in range(sizes["repeat"]):
                    for kind in kinds:
                        drain_round(kind, rs, tmpl, app, opts, sizes, i, results[kind.key])
                log(f"   ({time.perf_counter() - t:.0f} s)")
            # AsyncResult.__del__ unsubscribes through the client's pub/sub connection; with Redis gone it
            # would print a reconnect traceback at exit. Collect now and drop that connection.
            gc.collect()
            consumer = app.backend.result_consumer
            if getattr(consumer, "_pubsub", None) is not None:
                consumer.stop()
                consumer._pubsub = None
    except BenchError as e:
        log(f"bench: FAILED: {e}")
        return 1
    log("")
    report(results, opts)
    log(f"\nbench: {time.perf_counter() - t_start:.0f} s in all")
    for m in missing:
        log(m)
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
