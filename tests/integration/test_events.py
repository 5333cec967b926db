"""Events (tracker issue 5): worker-online/heartbeat/offline always, task events with -E or after
enable_events, as a stock `app.events.Receiver` sees them (protocol doc section 8)."""

import threading
import time

import pytest

from util import TIMEOUT, push_raw, task_envelope, wait_until

pytestmark = pytest.mark.celeriac_only("celeriac's events; field values checked are celeriac's")

COMMON = ("hostname", "utcoffset", "pid", "clock", "timestamp", "type")


class Capture:
    """Runs a stock event receiver in a thread and keeps every event it gets."""

    def __init__(self, app):
        self.app = app
        self.events = []
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        with self.app.connection_for_read() as conn:
            recv = self.app.events.Receiver(conn, handlers={"*": self._on})
            self.ready.set()
            while not self.stop:
                try:
                    for _ in recv.itercapture(limit=None, timeout=0.2, wakeup=False):
                        if self.stop:
                            break
                except TimeoutError:  # a quiet 0.2 s: look at self.stop again
                    pass

    def _on(self, event):
        with self.lock:
            self.events.append(event)

    def __enter__(self):
        self.thread.start()
        self.ready.wait(10)
        time.sleep(0.3)  # the PSUBSCRIBE has gone out
        return self

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join(5)

    def of(self, type_, **match):
        with self.lock:
            return [e for e in self.events if e["type"] == type_ and all(e.get(k) == v for k, v in match.items())]

    def wait(self, type_, **match):
        wait_until(lambda: self.of(type_, **match), what=f"a {type_} event matching {match}")
        return self.of(type_, **match)[0]


def check_common(ev, node):
    for k in COMMON:
        assert k in ev, (k, ev)
    assert ev["hostname"] == node and isinstance(ev["clock"], int) and abs(ev["timestamp"] - time.time()) < 60


def test_every_event_type(app, workers, broker):
    node = "ev@it"
    with Capture(app) as cap:
        w = workers.start("-c", "2", "-n", node, "-E")
        online = cap.wait("worker-online", hostname=node)
        for k in ("freq", "active", "processed", "loadavg", "sw_ident", "sw_ver", "sw_sys"):
            assert k in online, k
        check_common(online, node)
        assert online["pid"] == w.pid and online["freq"] == 2.0 and len(online["loadavg"]) == 3

        ok = app.send_task("native.add", args=[2, 3])
        assert ok.get(timeout=TIMEOUT) == 5
        rec = cap.wait("task-received", uuid=ok.id)
        check_common(rec, node)
        assert rec["name"] == "native.add" and rec["args"] == "[2, 3]"  # the argsrepr send_task put in the message and rec["kwargs"] == "{}"
        assert rec["retries"] == 0 and rec["eta"] is None and rec["root_id"] == ok.id
        cap.wait("task-started", uuid=ok.id)
        succ = cap.wait("task-succeeded", uuid=ok.id)
        assert succ["result"] == "5" and isinstance(succ["runtime"], float)

        bad = app.send_task("native.fail", args=["boom"])
        with pytest.raises(Exception):
            bad.get(timeout=TIMEOUT)
        failed = cap.wait("task-failed", uuid=bad.id)
        assert failed["exception"] == "ValueError('boom')" and "Traceback" in failed["traceback"]

        retried = app.send_task("native.retry_n", args=[1])
        assert retried.get(timeout=TIMEOUT) == 1
        ret = cap.wait("task-retried", uuid=retried.id)
        assert ret["exception"] == "None" and "traceback" in ret  # stock: repr of the cause, None here
        assert len(cap.of("task-received", uuid=retried.id)) == 2  # the retry comes back with an eta

        later = app.send_task("native.add", args=[1, 1], countdown=30)
        cap.wait("task-received", uuid=later.id)
        later.revoke()
        rev = cap.wait("task-revoked", uuid=later.id)
        assert rev["terminated"] is False and rev["signum"] is None and rev["expired"] is False

        env = task_envelope("native.add", args=[1, 2], content_type="application/x-python-serialize")
        push_raw(broker, env)
        rej = cap.wait("task-rejected", uuid=env["headers"]["id"])
        assert rej["requeue"] is False

        hb = cap.wait("worker-heartbeat", hostname=node)
        assert hb["freq"] == 2.0 and hb["processed"] >= 3
        assert workers.stop(w) == 0
        cap.wait("worker-offline", hostname=node)
        clocks = [e["clock"] for e in cap.events if e["hostname"] == node]
        assert len(set(clocks)) == len(clocks)


def test_enable_and_disable_events(app, workers):
    node = "toggle@it"
    with Capture(app) as cap:
        workers.start("-c", "1", "-n", node)
        cap.wait("worker-online", hostname=node)
        quiet = app.send_task("native.add", args=[1, 1])
        assert quiet.get(timeout=TIMEOUT) == 2
        assert app.control.enable_events(destination=[node], reply=True, timeout=1) == \
            [{node: {"ok": "task events enabled"}}]
        loud = app.send_task("native.add", args=[2, 2])
        assert loud.get(timeout=TIMEOUT) == 4
        cap.wait("task-succeeded", uuid=loud.id)
        assert app.control.disable_events(destination=[node], reply=True, timeout=1) == \
            [{node: {"ok": "task events disabled"}}]
        quiet2 = app.send_task("native.add", args=[3, 3])
        assert quiet2.get(timeout=TIMEOUT) == 6
        time.sleep(0.5)
        assert not cap.of("task-received", uuid=quiet.id) and not cap.of("task-received", uuid=quiet2.id)
