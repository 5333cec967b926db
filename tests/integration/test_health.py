"""Health checks and metrics (tracker issue 5): --http-port serves /healthz (the loop turns), /readyz (broker,
backend and control channel connected, consuming; red while Redis is down) and /metrics (Prometheus text)."""

import re
import signal
import time
import urllib.error
import urllib.request

import pytest

from conftest import close_client, make_client, private_redis
from servers import free_port
from util import TIMEOUT, wait_until

pytestmark = pytest.mark.celeriac_only("celeriac's HTTP endpoints")


def get(port, path):
    """(status, body) of GET http://127.0.0.1:port/path."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def parse_metrics(text):
    """Prometheus text format -> {(name, frozenset(labels)): value}; checks every line's syntax."""
    out = {}
    rx = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
    for line in text.splitlines():
        if not line or line.startswith("# HELP ") or line.startswith("# TYPE "):
            continue
        m = rx.match(line)
        assert m, f"bad metrics line: {line!r}"
        labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        out[(m.group(1), labels)] = float(m.group(3))
    return out


def test_endpoints_and_metrics(app, workers):
    port = free_port()
    workers.start("-c", "2", "--http-port", port, "--http-bind", "127.0.0.1")
    assert get(port, "/healthz") == (200, "ok\n")
    assert get(port, "/readyz") == (200, "ready\n")
    assert get(port, "/nope")[0] == 404
    assert app.send_task("native.add", args=[1, 2]).get(timeout=TIMEOUT) == 3
    with pytest.raises(Exception):
        app.send_task("native.fail", args=["x"]).get(timeout=TIMEOUT)
    assert app.send_task("native.retry_n", args=[1]).get(timeout=TIMEOUT) == 1
    status, text = get(port, "/metrics")
    assert status == 200
    m = parse_metrics(text)
    add = frozenset({("task", "native.add")})
    assert m[("celeriac_tasks_received_total", add)] == 1
    assert m[("celeriac_tasks_succeeded_total", add)] == 1
    assert m[("celeriac_tasks_failed_total", frozenset({("task", "native.fail")}))] == 1
    assert m[("celeriac_tasks_retried_total", frozenset({("task", "native.retry_n")}))] == 1
    assert m[("celeriac_tasks_received_total", frozenset({("task", "native.retry_n")}))] == 2
    assert m[("celeriac_task_runtime_seconds_count", add)] == 1
    assert m[("celeriac_task_runtime_seconds_bucket", add | {("le", "+Inf")})] == 1
    assert m[("celeriac_queue_latency_seconds_count", frozenset())] >= 4
    assert m[("celeriac_pool_processes", frozenset({("state", "idle")}))] + \
        m[("celeriac_pool_processes", frozenset({("state", "busy")}))] == 2
    assert m[("celeriac_broker_reconnects_total", frozenset())] == 0
    assert m[("celeriac_ready", frozenset())] == 1


@pytest.fixture
def own_redis(workers):
    """A private redis-server this test may stop; workers on it are stopped before it is."""
    yield from private_redis(workers)


def test_readyz_red_while_redis_is_down(workers, own_redis):
    port = free_port()
    workers.start("-c", "1", "--http-port", port, "--http-bind", "127.0.0.1",
                  broker_url=own_redis.url(0), backend_url=own_redis.url(1))
    assert get(port, "/readyz")[0] == 200
    own_redis.stop()
    wait_until(lambda: get(port, "/readyz")[0] == 503, what="/readyz red")
    status, body = get(port, "/readyz")
    assert "disconnected" in body
    assert get(port, "/healthz") == (200, "ok\n")  # alive all the same: the loop turns
    own_redis.restart()
    wait_until(lambda: get(port, "/readyz")[0] == 200, timeout=30, what="/readyz green again")
    m = parse_metrics(get(port, "/metrics")[1])
    assert m[("celeriac_broker_reconnects_total", frozenset())] >= 1
    app = make_client(own_redis.url(0), own_redis.url(1))
    try:
        assert app.send_task("native.add", args=[2, 2]).get(timeout=TIMEOUT) == 4
    finally:
        close_client(app)


def test_readyz_red_while_the_consumer_is_stalled(workers, own_redis):
    """Redis frozen (SIGSTOP): the connection stays up, but the fetch never gets its answer."""
    port = free_port()
    workers.start("-c", "1", "--http-port", port, "--http-bind", "127.0.0.1",
                  broker_url=own_redis.url(0), backend_url=own_redis.url(1))
    assert get(port, "/readyz")[0] == 200
    own_redis.proc.send_signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        wait_until(lambda: get(port, "/readyz")[0] == 503, timeout=20, interval=0.2, what="/readyz red")
        assert time.monotonic() - t0 >= 5  # not before the stall threshold (10 s)
        assert "stalled" in get(port, "/readyz")[1]
        assert get(port, "/healthz") == (200, "ok\n")
    finally:
        own_redis.proc.send_signal(signal.SIGCONT)
    wait_until(lambda: get(port, "/readyz")[0] == 200, timeout=20, what="/readyz green again")


def test_readyz_stays_green_while_idle_past_the_stall_threshold(workers, own_redis):
    """An idle worker waits in BLMOVE, which is answered only when a message comes: not a stall."""
    port = free_port()
    workers.start("-c", "1", "--http-port", port, "--http-bind", "127.0.0.1",
                  broker_url=own_redis.url(0), backend_url=own_redis.url(1))
    time.sleep(11)  # past the 10 s stall threshold, nothing sent
    assert get(port, "/readyz") == (200, "ready\n")
