#!/usr/bin/python3
"""Soak: acks_late tasks while celeriac is SIGKILLed and restarted at random moments; nothing may be lost.

    /usr/bin/python3 bench/soak.py [--tasks 20000] [--kills 10] [--seed N]

Publishes --tasks `native.incr` tasks (acks_late, one counter key per task) onto a private redis-server,
then runs celeriac (`--acks-late --visibility-timeout 2`), SIGKILLs it (main process and pool) at random
moments --kills times, restarting it each time, and finally lets one worker finish. It reports:
  lost        tasks whose counter is 0 (never ran to completion): must be 0
  duplicated  tasks that ran more than once: only tasks running at a kill may repeat (at most the number of
              messages a worker held at each kill: concurrency x prefetch multiplier)
Not part of the test suite: it takes a minute or two and its figures go into closing notes."""

import argparse
import os
import random
import signal
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "integration"))
sys.path.insert(0, HERE)

import json  # noqa: E402

from servers import Celeriac, RedisServer  # noqa: E402
from util import task_envelope  # noqa: E402


def publish(broker, n):
    """n native.incr messages, stock-shaped (tests/integration/util.py), oldest first. Returns their ids."""
    ids, pipe = [], broker.pipeline(transaction=False)
    for i in range(n):
        env = task_envelope("native.incr", args=[f"soak:{i}"])
        ids.append(env["headers"]["id"])
        pipe.lpush("celery", json.dumps(env))
        if i % 1000 == 999:
            pipe.execute()
    pipe.execute()
    return ids


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=20000)
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--concurrency", "-c", type=int, default=2)
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rnd = random.Random(seed)

    rs = RedisServer()
    rs.start()
    try:
        broker, backend = rs.client(0), rs.client(1)
        ids = publish(broker, args.tasks)
        print(f"soak: {args.tasks} tasks published (seed {seed}), {args.kills} kills")
        flags = ["-c", str(args.concurrency), "--acks-late", "--visibility-timeout", "2"]
        held_at_kills = 0
        for k in range(args.kills):
            w = Celeriac(flags, broker_url=rs.url(0), backend_url=rs.url(1))
            w.start()
            w.wait_ready(30)
            time.sleep(rnd.uniform(0.02, 0.2))
            held_at_kills += broker.hlen("unacked")
            w.kill_group()  # SIGKILL the main process and its pool, as a crash or OOM kill would
            w.cleanup()
            done = sum(1 for v in broker.mget([f"soak:{i}" for i in range(args.tasks)]) if v)
            print(f"  kill {k + 1}: {done}/{args.tasks} tasks have run, {broker.hlen('unacked')} unacked left")
        w = Celeriac(flags, broker_url=rs.url(0), backend_url=rs.url(1))
        w.start()
        w.wait_ready(30)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if broker.llen("celery") == 0 and broker.hlen("unacked") == 0:
                break
            time.sleep(0.5)
        time.sleep(1)
        rc = w.stop(signal.SIGTERM, 60)
        counts = [int(v or 0) for v in broker.mget([f"soak:{i}" for i in range(args.tasks)])]
        lost = sum(1 for c in counts if c == 0)
        dup = sum(c - 1 for c in counts if c > 1)
        results = sum(1 for v in backend.mget([f"celery-task-meta-{t}" for t in ids]) if v)
        print(f"soak: lost {lost}, duplicated executions {dup} (messages held at the {args.kills} kills: "
              f"{held_at_kills}), results stored {results}/{args.tasks}, last worker exit code {rc}")
        return 0 if lost == 0 and results == args.tasks and dup <= held_at_kills else 1
    finally:
        rs.stop()
        rs.cleanup()


if __name__ == "__main__":
    sys.exit(main())
