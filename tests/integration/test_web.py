"""The Flask demo (python_tasks/web) as a user meets it: its JSON API over HTTP, then the page in a browser.

One stack serves the module, started the way `make demo WEB=1` starts it (scripts/stack.py): a private
redis-server, the session's PostgreSQL, celeriac (CELERIAC_BIN) on the `native` queue, the stock worker running
python_tasks.fallbacks on the `python` queue, and the app under gunicorn, each on a free loopback port.

The browser test drives Debian's chromium (headless) with playwright-core from npm (tests/browser, installed
here with `npm ci` from the committed lockfile) and saves a screenshot in tests/artifacts/. A missing piece
(chromium, node, npm, the npm install) fails the test with what to install; nothing is skipped.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from servers import REPO, celeriac_binary
from util import TIMEOUT, wait_until

sys.path.insert(0, os.path.join(REPO, "scripts"))
from stack import Stack  # noqa: E402

pytestmark = pytest.mark.celeriac_only("the demo stack runs celeriac and the stock worker side by side")

BROWSER_DIR = os.path.join(REPO, "tests", "browser")
ARTIFACTS = os.path.join(REPO, "tests", "artifacts")
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


def sanitizer_build():
    """True for the ASan+UBSan Debug build `make test` uses: its naive fib is no faster than Python's, so
    the tests compare the times only for an optimised binary."""
    syms = subprocess.run(["readelf", "--dyn-syms", "-W", celeriac_binary()], capture_output=True, text=True)
    return "__asan_init" in syms.stdout


@pytest.fixture(scope="module")
def stack(postgres_server):
    st = Stack(postgres=postgres_server, celeriac_args=["-c", "2"])
    st.start()
    yield st
    # celeriac must shut down cleanly (the others are stopped by Stack.stop, which tolerates a stock worker
    # that hangs after SIGTERM, as conftest.WorkerPool does).
    st.web.stop()
    rc = st.celeriac.stop()
    reports = st.celeriac.sanitizer_reports()
    logs = st.logs()
    st.stop()
    assert rc == 0, f"celeriac exited with {rc} after SIGTERM\n{logs}"
    assert not reports, "sanitizer reports in celeriac's log:\n" + "\n".join(reports[:20])


def call(stack, method, path, body=None, timeout=TIMEOUT):
    """(status, decoded JSON) of one request to the app."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(stack.web.url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def follow(stack, task_id, interval=0.02):
    """Polls /api/tasks/<id> until the task is settled; returns every answer seen."""
    seen = []

    def settled():
        status, t = call(stack, "GET", f"/api/tasks/{task_id}")
        assert status == 200, t
        seen.append(t)
        return t["state"] in ("SUCCESS", "FAILURE", "REVOKED")

    wait_until(settled, timeout=TIMEOUT * 2, what=f"task {task_id} to settle", interval=interval)
    return seen


# -- the API ------------------------------------------------------------------------------------------------

def test_page_is_served_with_its_controls(stack):
    with urllib.request.urlopen(stack.web.url + "/", timeout=TIMEOUT) as r:
        html = r.read().decode()
    for element in ("fib-go", "fib-native-ms", "fib-python-ms", "fib-ratio", "import-go", "import-progress",
                    "import-count", "chord-go", "chord-result", "workers-list"):
        assert f'id="{element}"' in html, element
    with urllib.request.urlopen(stack.web.url + "/static/demo.js", timeout=TIMEOUT) as r:
        assert b"/api/tasks/" in r.read()


def test_fib_runs_natively_and_in_python_on_their_own_queues(stack):
    status, nat = call(stack, "GET", "/api/fib/native/28")
    assert status == 200, nat
    status, py = call(stack, "GET", "/api/fib/python/28")
    assert status == 200, py
    assert nat["result"] == py["result"] == 317811
    assert (nat["queue"], py["queue"]) == ("native", "python")
    # Each ran where it was sent: celeriac logs the native one, the stock worker the Python one.
    wait_until(lambda: f"native.fib[{nat['task_id']}] succeeded" in stack.celeriac.log(), what="celeriac's log")
    wait_until(lambda: f"native.fib[{py['task_id']}] succeeded" in stack.python.log(), what="the worker's log")
    assert py["task_id"] not in stack.celeriac.log() and nat["task_id"] not in stack.python.log()
    assert nat["ms"] > 0 and py["ms"] > 0
    if not sanitizer_build():  # the point of the demo: Python's naive fib(28) alone takes tens of ms
        assert nat["ms"] < py["ms"], (nat, py)


def test_fib_refuses_what_it_cannot_do(stack):
    status, body = call(stack, "GET", "/api/fib/ruby/5")
    assert status == 404 and "unknown engine" in body["error"]
    status, body = call(stack, "GET", "/api/fib/native/36")
    assert status == 400 and "0..35" in body["error"]


def test_import_reports_progress_then_every_row_is_there(stack, pg):
    rows = 200_000
    # Every state the worker stores is also published on the result's channel: listen to all of them, so the
    # check does not depend on polling fast enough to catch each one.
    pubsub = stack.redis.client(1).pubsub()
    pubsub.psubscribe("celery-task-meta-*")
    try:
        status, job = call(stack, "POST", "/api/import", {"rows": rows})
        assert status == 202, job
        assert job["engine"] == "native" and job["rows"] == rows
        seen = follow(stack, job["task_id"])
        assert seen[-1]["state"] == "SUCCESS" and seen[-1]["result"] == rows, seen[-1]
        published = []
        while (m := pubsub.get_message(timeout=0.5)) is not None:
            if m["type"] == "pmessage":
                doc = json.loads(m["data"])
                if doc["task_id"] == job["task_id"]:
                    published.append((doc["status"], doc["result"]))
    finally:
        pubsub.close()
    progress = [r for s, r in published if s == "PROGRESS"]
    assert published[-1] == ("SUCCESS", rows) and len(progress) >= 3, published
    assert [p["done"] for p in progress] == sorted(p["done"] for p in progress), progress
    assert {p["total"] for p in progress} == {rows} and progress[-1]["done"] == rows, progress
    # What the page polls: PROGRESS carries done/total/percent; its percents never go back.
    polled = [t for t in seen if t["state"] == "PROGRESS"]
    assert all(t["total"] == rows and t["percent"] == round(100.0 * t["done"] / rows, 1) for t in polled), polled
    assert [t["percent"] for t in polled] == sorted(t["percent"] for t in polled), polled
    status, count = call(stack, "GET", f"/api/rows?batch={job['batch']}")
    assert status == 200 and count["batch_rows"] == rows, count
    with pg.cursor() as cur:
        cur.execute("SELECT count(*), min(n), max(n), sum(value) FROM demo_rows WHERE batch = %s", (job["batch"],))
        assert cur.fetchone() == (rows, 0, rows - 1, sum(i * 0.5 for i in range(rows)))


def test_task_state_progress_as_the_page_reads_it(stack):
    """/api/tasks/<id> for a task in PROGRESS, whatever the timing: the state stored as update_state does."""
    client = stack_client(stack)
    client.backend.store_result("progress-probe", {"done": 250, "total": 1000}, "PROGRESS")
    assert call(stack, "GET", "/api/tasks/progress-probe") == (200, {
        "task_id": "progress-probe", "state": "PROGRESS", "done": 250, "total": 1000, "percent": 25.0})


def test_import_on_the_python_worker(stack):
    status, job = call(stack, "POST", "/api/import", {"rows": 2000, "engine": "python"})
    assert status == 202 and job["queue"] == "python", job
    seen = follow(stack, job["task_id"])
    assert seen[-1]["state"] == "SUCCESS" and seen[-1]["result"] == 2000, seen[-1]
    assert call(stack, "GET", f"/api/rows?batch={job['batch']}")[1]["batch_rows"] == 2000


def test_import_refuses_bad_sizes(stack):
    for body in ({"rows": 0}, {"rows": 10 ** 7}, {"rows": "many"}, {"rows": True}):
        status, answer = call(stack, "POST", "/api/import", body)
        assert status == 400 and "rows must be" in answer["error"], (body, answer)


def test_a_failed_task_is_reported(stack, pg):
    """A task that fails (here: pg_bulk_insert into a table the worker may not touch) shows as FAILURE."""
    res = stack_client(stack).send_task("native.pg_bulk_insert", args=["secrets", ["a"], [[1]]], queue="native")
    seen = follow(stack, res.id)
    assert seen[-1]["state"] == "FAILURE" and seen[-1]["error"].startswith("PermissionError"), seen[-1]


def test_chord_of_native_tasks_joins(stack):
    status, job = call(stack, "POST", "/api/chord", {"n": 200})
    assert status == 202, job
    seen = follow(stack, job["task_id"])
    assert seen[-1]["state"] == "SUCCESS" and seen[-1]["result"] == job["expected"] == 200 * 199, seen[-1]


def test_workers_online(stack):
    status, body = call(stack, "GET", "/api/workers")
    assert status == 200
    by_engine = {w["engine"]: w for w in body["workers"]}
    assert by_engine["celeriac"]["name"].startswith("celeriac@") and by_engine["celeriac"]["queues"] == ["native"]
    assert by_engine["python"]["name"].startswith("python@") and by_engine["python"]["queues"] == ["python"]


def test_unknown_task_is_pending(stack):
    assert call(stack, "GET", "/api/tasks/no-such-task") == (200, {"task_id": "no-such-task", "state": "PENDING"})


def test_database_sessions_are_closed_after_each_request(stack, pg):
    """Sessions are removed at request teardown: the app's pooled connections sit idle, never idle in a
    transaction, however many requests ran."""
    for _ in range(10):
        assert call(stack, "GET", "/api/rows")[0] == 200
    with pg.cursor() as cur:
        cur.execute("SELECT state, count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
                    "AND pid <> pg_backend_pid() GROUP BY state")
        states = dict(cur.fetchall())
    assert "idle in transaction" not in states, states
    assert states.get("idle", 0) >= 1, states


_clients = {}


def stack_client(stack):
    """A stock Celery client on the stack's broker (for tasks the page does not send)."""
    from conftest import make_client

    if stack not in _clients:
        _clients[stack] = make_client(stack.redis.url(0), stack.redis.url(1))
    return _clients[stack]


@pytest.fixture(scope="module", autouse=True)
def _close_clients(stack):
    yield
    from conftest import close_client

    for c in _clients.values():
        close_client(c)
    _clients.clear()


# -- the page in a browser ----------------------------------------------------------------------------------

def npm_ci():
    """tests/browser/node_modules from the committed lockfile (once; again when the lockfile changed)."""
    problems = []
    if not os.access(CHROMIUM, os.X_OK):
        problems.append(f"{CHROMIUM} (Debian package chromium; `scripts/deps.sh test` installs it, or set CHROMIUM)")
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        problems.append("node and npm (Debian packages nodejs npm; `scripts/deps.sh test` installs them)")
    else:
        major = int(re.match(r"v(\d+)", subprocess.run([node, "--version"], capture_output=True,
                                                        text=True).stdout).group(1))
        if major < 18:
            problems.append(f"node >= 18 for playwright-core (found {major})")
    if problems:
        pytest.fail("the browser test needs: " + "; ".join(problems), pytrace=False)
    lock = os.path.join(BROWSER_DIR, "package-lock.json")
    stamp = os.path.join(BROWSER_DIR, "node_modules", ".package-lock.json")
    if not os.path.exists(stamp) or os.path.getmtime(stamp) < os.path.getmtime(lock):
        r = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=BROWSER_DIR,
                           capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            pytest.fail(f"`npm ci` in tests/browser failed (exit {r.returncode}); the npm registry must be "
                        f"reachable once:\n{r.stdout}{r.stderr}", pytrace=False)
    return node


def test_page_in_a_browser(stack):
    """Click compute: both timings and the ratio. Start an import: the bar reaches 100% and the row count
    shows. Run the chord. Screenshot: tests/artifacts/demo.png."""
    node = npm_ci()
    rows = 200_000
    t0 = time.monotonic()
    r = subprocess.run([node, os.path.join(BROWSER_DIR, "demo.mjs"), stack.web.url + "/", ARTIFACTS],
                       cwd=BROWSER_DIR, capture_output=True, text=True, timeout=180,
                       env=dict(os.environ, CHROMIUM=CHROMIUM, IMPORT_ROWS=str(rows), FIB_N="30"))
    out = r.stdout.strip().splitlines()
    seen = json.loads(out[-1]) if out else {}
    assert r.returncode == 0, f"browser script failed after {time.monotonic() - t0:.1f}s:\n{r.stdout}\n{r.stderr}"
    assert seen["consoleErrors"] == []
    assert any(w.startswith("celeriac@") for w in seen["workers"]) and any(w.startswith("python@")
                                                                            for w in seen["workers"])
    fib = seen["fib"]
    assert fib["fib-error"] == "" and fib["fib-native-result"] == fib["fib-python-result"] == "832040", fib
    native_ms, python_ms = (float(fib[k].split()[0]) for k in ("fib-native-ms", "fib-python-ms"))
    assert native_ms > 0 and python_ms > 0, fib
    assert re.fullmatch(r"\d+\.\d×", fib["fib-ratio"]), fib
    assert fib["fib-ratio-word"] == ("faster" if native_ms <= python_ms else "slower"), fib
    if not sanitizer_build():
        assert native_ms < python_ms, fib
    imp = seen["import"]
    assert imp["error"] == "" and imp["state"] == "SUCCESS", imp
    assert imp["pct"] == "100%" and imp["width"] == "100%" and imp["bar"][-1] == "100", imp
    assert imp["barPixels"] == pytest.approx(imp["trackPixels"], abs=1), imp
    assert imp["count"] == f"{rows:,}", imp
    assert "PROGRESS" in imp["states"], f"the page never saw a PROGRESS state: {imp['states']}"
    assert seen["chord"] == {"result": "9900", "expected": "9900", "error": ""}
    assert os.path.getsize(os.path.join(ARTIFACTS, "demo.png")) > 10_000
