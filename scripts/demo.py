#!/usr/bin/env python3
"""The Quick start's main job (`make demo` runs it after building): celeriac serving a stock Celery client.

1. Broker: $CELERY_BROKER_URL if set (results in $CELERY_RESULT_BACKEND, else database 1 of the same server,
   and a private queue so other workers on that broker are left alone); otherwise a private redis-server on
   a free loopback port, stopped at the end.
2. Queues 1,000 native.noop tasks with the stock client while no worker runs.
3. Starts build/celeriac (or $CELERIAC_BIN) with -c <cores> -l info; it drains the backlog.
4. Sends a handful of tasks with the stock Celery client (python_tasks.native) and prints their results.
5. Stops celeriac with SIGTERM (warm shutdown) and the private redis-server.

Exit status 0 when every step gave the expected answer; otherwise 1, with what is missing or wrong.
"""
import gc
import json
import os
import re
import shutil
import sys
import time
import traceback
from datetime import datetime, timezone
from urllib.parse import urlsplit, urlunsplit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests", "integration"))

TIMEOUT = 15  # seconds for any single result
BURST = 1000


def say(msg=""):
    print(msg, flush=True)


def redact(url):
    return re.sub(r"(//[^/@]*?:)[^/@]*@", r"\1**@", url)


def backend_for(broker):
    """Database 1 of the broker's server (database 2 if the broker already uses 1)."""
    u = urlsplit(broker)
    if u.scheme != "redis":
        return None
    db = 2 if u.path.strip("/") == "1" else 1
    return urlunsplit((u.scheme, u.netloc, f"/{db}", u.query, u.fragment))


def quiet_result_consumer():
    """Before Redis goes away: the stock client's AsyncResult.__del__ unsubscribes through the backend's
    pub/sub connection and, finding Redis gone, prints a reconnect traceback at exit. Drop that connection."""
    gc.collect()
    app = sys.modules.get("python_tasks.app")
    consumer = getattr(getattr(getattr(app, "app", None), "backend", None), "result_consumer", None)
    if consumer is not None and getattr(consumer, "_pubsub", None) is not None:
        consumer.stop()
        consumer._pubsub = None


def prerequisites():
    missing = []
    try:
        import celery  # noqa: F401
        import redis  # noqa: F401
    except ImportError as e:
        missing.append(f"Python package {e.name}: sudo apt-get install -y python3-celery python3-redis")
    try:
        from servers import celeriac_binary
        binary = celeriac_binary()
        if not os.access(binary, os.X_OK):
            missing.append(f"the celeriac binary {binary}: build it with `make build` (or set CELERIAC_BIN)")
    except ImportError:
        missing.append("tests/integration/servers.py (part of this repository): is the checkout complete?")
    if not os.environ.get("CELERY_BROKER_URL") and not shutil.which("redis-server"):
        missing.append("redis-server (no CELERY_BROKER_URL set, so the demo starts its own): "
                       "sudo apt-get install -y redis-server")
    return missing


class Demo:
    def __init__(self):
        self.failures = []

    def check(self, label, ok, shown, detail=""):
        mark = "ok " if ok else "BAD"
        say(f"  [{mark}] {label:<44} -> {shown}{('   ' + detail) if detail else ''}")
        if not ok:
            self.failures.append(label)

    def call(self, label, sig, expect, show=None):
        """Sends sig with apply_async and waits for its result."""
        t = time.perf_counter()
        try:
            value = sig.apply_async().get(timeout=TIMEOUT)
        except Exception as e:  # noqa: BLE001 - report whatever the client raised
            self.check(label, False, f"raised {type(e).__name__}: {e}")
            return None
        ms = (time.perf_counter() - t) * 1e3
        ok = value == expect and type(value) is type(expect)
        self.check(label, ok, show(value) if show else repr(value), f"({ms:.1f} ms)")
        if not ok:
            say(f"        expected {expect!r}")
        return value

    def expect_error(self, label, result, exc_name, exc_module):
        try:
            value = result.get(timeout=TIMEOUT)
        except Exception as e:  # noqa: BLE001
            traceback.clear_frames(e.__traceback__)  # they hold the AsyncResult (see the gc note below)
            cls = type(e)
            ok = cls.__name__ == exc_name and cls.__module__ == exc_module
            self.check(label, ok, f"raised {cls.__module__}.{cls.__name__}: {e}")
            return
        self.check(label, False, f"returned {value!r} instead of raising {exc_name}")


def main():
    missing = prerequisites()
    if missing:
        say("celeriac demo: cannot run, missing:")
        for m in missing:
            say(f"  - {m}")
        return 1

    from servers import Celeriac, RedisServer
    import redis

    demo = Demo()
    rs = worker = None
    burst = []
    cores = os.cpu_count() or 1
    try:
        # -- 1. broker and result backend
        broker = os.environ.get("CELERY_BROKER_URL")
        queue = None
        if broker:
            backend = os.environ.get("CELERY_RESULT_BACKEND") or backend_for(broker)
            if not backend:
                say(f"celeriac demo: CELERY_BROKER_URL is {redact(broker)}; set CELERY_RESULT_BACKEND too "
                    "(the demo reads results)")
                return 1
            queue = f"celeriac-demo-{os.getpid()}"
            say(f"broker  {redact(broker)} (from CELERY_BROKER_URL), results {redact(backend)}, "
                f"private queue {queue}")
        else:
            rs = RedisServer().start()
            broker, backend = rs.url(0), rs.url(1)
            say(f"No CELERY_BROKER_URL set: started a private redis-server on 127.0.0.1:{rs.port} "
                f"(pid {rs.pid}); it is stopped at the end.")
            say(f"broker  {broker}   results {backend}")
        for url in (broker, backend):
            try:
                redis.Redis.from_url(url.replace("redis+socket://", "unix://"), socket_timeout=3).ping()
            except redis.RedisError as e:
                say(f"celeriac demo: cannot reach Redis at {redact(url)}: {e}")
                return 1

        # The stock Celery client app, configured from the environment like a Flask app would be.
        os.environ["CELERY_BROKER_URL"] = broker
        os.environ["CELERY_RESULT_BACKEND"] = backend
        os.environ["CELERIAC_MODE"] = "native"
        os.environ["CELERIAC_NATIVE_QUEUE"] = queue or "celery"  # where the celeriac started below consumes
        from celery.result import ResultSet
        from python_tasks.app import app
        from python_tasks.native import add, echo, fail, fib, noop, xsum

        # -- 2. a backlog while no worker runs
        say("")
        say(f"Queueing {BURST:,} native.noop with noop.delay() while no worker runs ...")
        t = time.perf_counter()
        with app.producer_or_acquire() as producer:
            burst.extend(noop.apply_async(producer=producer) for _ in range(BURST))
        say(f"  sent in {time.perf_counter() - t:.2f} s by the Python client")

        # -- 3. celeriac
        args = ["-c", str(cores), "-l", "info"] + (["-Q", queue] if queue else [])
        worker = Celeriac(args, broker_url=broker, backend_url=backend)
        say(f"\nStarting {worker.binary} worker {' '.join(args)} ...")
        launched = datetime.now(timezone.utc).replace(tzinfo=None)  # date_done is naive UTC too
        worker.start()
        try:
            worker.wait_ready(30)
        except (RuntimeError, TimeoutError) as e:
            say(f"celeriac demo: celeriac did not become ready: {e}")
            return 1
        ready_line = next((ln for ln in worker.log().splitlines() if " ready." in ln), "")
        say(f"  {ready_line.strip()}")

        # the backlog drains as soon as the worker consumes
        try:
            ResultSet(burst).join_native(timeout=60, propagate=True)
            metas = dict(app.backend.get_many([r.id for r in burst], timeout=TIMEOUT))
            bad = [i for i, m in metas.items() if m.get("status") != "SUCCESS" or m.get("result") is not None]
            done = sorted(str(m.get("date_done")) for m in metas.values())
            detail = ""
            try:
                first, last = datetime.fromisoformat(done[0]), datetime.fromisoformat(done[-1])
                span = (last - first).total_seconds()
                detail = (f"the last one stored {(last - launched).total_seconds():.2f} s after celeriac was "
                          f"launched; first to last result {span * 1e3:.1f} ms")
                if span > 0:
                    detail += f" (~{(len(metas) - 1) / span:,.0f} tasks/s, with -l info logging each task)"
            except (ValueError, IndexError):
                pass
            demo.check(f"{BURST:,} x noop() queued before start", not bad and len(metas) == BURST,
                       f"{len(metas) - len(bad):,} SUCCESS results")
            if detail:
                say(f"        {detail}")
        except Exception as e:  # noqa: BLE001
            demo.check(f"{BURST:,} x noop() queued before start", False, f"{type(e).__name__}: {e}")

        # -- 4. a handful of tasks through the stock client
        try:  # the client's first get() sets up its result subscription: keep that out of the timings
            noop.delay().get(timeout=TIMEOUT)
        except Exception:  # noqa: BLE001 - the calls below report what is wrong
            pass
        say("\nTasks sent with the stock Celery client (from python_tasks.native import add, ...):")
        demo.call("add.delay(2, 3)", add.s(2, 3), 5)
        demo.call("add.delay(0.5, 2.25)", add.s(0.5, 2.25), 2.75)
        args_in = ["héllo wörld", "日本語 ✓ 🚀", [1, [2, [3, [4, []]]]], {"deep": {"er": [True, False, None]}},
                   2 ** 62, -1.5e-300, {}, []]
        kwargs_in = {"emoji": "🐍", "empty": "", "int64_max": 2 ** 63 - 1}
        expect = json.loads(json.dumps({"args": args_in, "kwargs": kwargs_in}))
        demo.call("echo.delay(<unicode, nesting, int64, ...>)", echo.s(*args_in, **kwargs_in), expect,
                  show=lambda v: json.dumps(v, ensure_ascii=False)[:90] + " ...")
        demo.call("fib.delay(25)", fib.s(25), 75025)
        demo.call("xsum.delay([1, 2, 3.5, -4])", xsum.s([1, 2, 3.5, -4]), 2.5)
        demo.expect_error("fail.delay('boom from the demo')", fail.delay("boom from the demo"),
                          "ValueError", "builtins")
        demo.expect_error("send_task('native.no_such_task')", app.send_task("native.no_such_task", args=[1]),
                          "NotRegistered", "celery.exceptions")
        follow = demo.call("add.delay(40, 2) after the unknown task", add.s(40, 2), 42)
        if follow is None:
            say("        (the worker did not keep serving after the unknown task)")

        say("\nWorkflows (celery.chain / chord, sent by the stock client, continued by celeriac):")
        from celery import chain, chord
        from python_tasks.native import fib_tree, retry_n
        demo.call("chain(add(1, 2) | add(3) | add(4))", chain(add.s(1, 2), add.s(3), add.s(4)), 10)
        demo.call("chord([add(i, i) for i < 100], xsum)", chord([add.s(i, i) for i in range(100)], xsum.s()),
                  sum(2 * i for i in range(100)))
        demo.call("retry_n.delay(3): retried 3 times", retry_n.s(3), 3)
        demo.call("fib_tree.delay(22, 14): ~170 tasks", fib_tree.s(22, 14), 17711)

        # what celeriac logged about some of them, in Celery's format
        lines = [ln for ln in worker.log().splitlines()
                 if re.search(r"Task native\.(add|fail|no_such_task)\[", ln) or "NotRegistered" in ln]
        if lines:
            say("\nFrom celeriac's log:")
            for ln in lines[:6]:
                say(f"  {ln[:160]}")

        # -- 5. warm shutdown
        say("\nStopping celeriac with SIGTERM ...")
        code = worker.stop(timeout=30)
        demo.check("celeriac warm shutdown", code == 0, f"exit code {code}")
    except KeyboardInterrupt:
        say("\ninterrupted")
        return 130
    finally:
        if worker is not None:
            if worker.running():
                try:
                    worker.stop(timeout=10)
                except TimeoutError:
                    pass
            if demo.failures:
                say(f"\nceleriac log tail ({worker.log_path}):\n{worker.log_tail(20)}")
            worker.cleanup()
        if queue:  # leave nothing of ours on someone else's broker (results expire by themselves)
            try:
                redis.Redis.from_url(broker.replace("redis+socket://", "unix://")).delete(
                    f"_kombu.binding.{queue}", queue)
            except redis.RedisError:
                pass
        burst.clear()
        quiet_result_consumer()
        if rs is not None:
            rs.stop()
            rs.cleanup()
            say(f"Stopped the private redis-server (port {rs.port}).")

    say("")
    if demo.failures:
        say(f"celeriac demo: {len(demo.failures)} step(s) did not give the expected answer: "
            + "; ".join(demo.failures))
        return 1
    say("celeriac demo: every task gave the expected answer.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
