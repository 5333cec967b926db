"""Your own native tasks (tracker issue 7): `celeriac new-task`, `celeriac build`, `--tasks DIR --dev` hot reload
under load, refused modules, generated stubs, and CELERIAC_MODE switching the same call between celeriac and
the Python fallbacks, which must give the same results as the built-ins for a shared table of cases."""

import json
import os
import subprocess
import sys
import time

import pytest

from servers import REPO, Celeriac, CeleryWorker
from util import TIMEOUT, exc_name_of, wait_until

pytestmark = pytest.mark.celeriac_only("celeriac's task SDK")


def run(*args, cwd=None):
    r = Celeriac.run(list(args))
    return r


def new_task(tmp_path, name="score"):
    d = tmp_path / "tasks"
    r = run("new-task", name, "--dir", str(d))
    assert r.returncode == 0, r.stderr
    assert f"wrote {d}/{name}.c" in r.stdout
    return d


def rewrite(path, old, new):
    src = path.read_text()
    assert old in src, old
    # Written whole and renamed into place, as editors do: the watcher sees one change.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(src.replace(old, new))
    os.rename(tmp, path)


def test_new_task_runs_unedited_and_hot_reloads_without_losing_messages(tmp_path, app, workers):
    d = new_task(tmp_path)
    w = workers.start("-c", "2", "--tasks", str(d), "--dev")
    assert "Loaded 1 task module(s)" in w.log()
    assert app.send_task("native.score", args=[[1, 2, 3]], kwargs={"weight": 2}).get(timeout=TIMEOUT) == 12
    assert app.send_task("native.score", args=[[4]]).get(timeout=TIMEOUT) == 4  # weight defaults to 1
    name, e = exc_name_of(app.send_task("native.score", args=["x"]))
    assert name == "TypeError" and "score() argument 'values' must be list, not str" in str(e)
    name, e = exc_name_of(app.send_task("native.score", args=[[1, "a"]]))
    assert name == "ValueError" and "values[1] is str" in str(e)

    # 1,000 calls in flight while the file changes: every one answered, by the old code or the new.
    with app.producer_or_acquire() as producer:
        inflight = [app.send_task("native.score", args=[[i]], producer=producer) for i in range(1000)]
    rewrite(d / "score.c", "json_integer(total * weight)", "json_integer(total * weight + 1000000)")
    results = [r.get(timeout=TIMEOUT) for r in inflight]
    assert all(res in (i, i + 1000000) for i, res in enumerate(results)), results[:20]
    wait_until(lambda: app.send_task("native.score", args=[[1]]).get(timeout=TIMEOUT) == 1000001, timeout=10,
               what="the new code serving", interval=0.2)
    assert "Reloaded 1 task module(s)" in w.log()

    # A compile error: logged with file and line, and the previous version keeps serving.
    rewrite(d / "score.c", "long long total = 0;", "long long total = 0 +;")
    w.wait_log(r"building the task modules in .* failed", timeout=10)
    assert "score.c:" in w.log() and "error" in w.log()
    assert app.send_task("native.score", args=[[2]]).get(timeout=TIMEOUT) == 1000002

    # Fixed again: the fix is picked up.
    rewrite(d / "score.c", "long long total = 0 +;", "long long total = 5;")
    wait_until(lambda: app.send_task("native.score", args=[[1]]).get(timeout=TIMEOUT) == 1000006, timeout=10,
               what="the fixed code serving", interval=0.2)


def test_dev_rebuild_runs_beside_the_worker(tmp_path, app, workers):
    """The compiler runs in a background process: while a (deliberately slow) rebuild is under way, tasks keep
    being answered at once, and the new generation is swapped in when the build ends."""
    d = new_task(tmp_path)
    slow_cc = tmp_path / "slow-cc"
    slow_cc.write_text("#!/bin/sh\nsleep 2\nexec cc \"$@\"\n")
    slow_cc.chmod(0o755)
    w = workers.start("-c", "1", "--tasks", str(d), "--dev", env={"CC": str(slow_cc)})
    assert app.send_task("native.score", args=[[1]]).get(timeout=TIMEOUT) == 1
    rewrite(d / "score.c", "json_integer(total * weight)", "json_integer(total * weight + 1000)")
    time.sleep(0.5)  # past the 0.25 s debounce: the build has started and takes 2 s more
    for i in range(5):
        t0 = time.monotonic()
        assert app.send_task("native.add", args=[i, 1]).get(timeout=TIMEOUT) == i + 1
        assert time.monotonic() - t0 < 1.0, "the worker stalled while the compiler ran"
    assert "Reloaded" not in w.log(), "the slow build cannot have finished yet"
    w.wait_log(r"Reloaded 1 task module\(s\)", timeout=20)
    assert app.send_task("native.score", args=[[1]]).get(timeout=TIMEOUT) == 1001


MODULE = r"""
#include <celeriac.h>
#include <time.h>

static enum task_outcome spin(struct task_ctx *ctx, json_t *args, json_t *kwargs, json_t **result)
{
    (void)args, (void)kwargs;
    long long rounds = 0;
    json_t *meta = json_pack("{s:s}", "pid", "spinning");
    task_update_state(ctx, "SPINNING", meta);
    json_decref(meta);
    while (!task_should_stop(ctx)) {
        struct timespec ms = {0, 1000000};
        nanosleep(&ms, NULL);
        rounds++;
    }
    (void)result;
    (void)rounds;
    return task_stop(ctx);
}

static enum task_outcome hang(struct task_ctx *ctx, json_t *args, json_t *kwargs, json_t **result)
{
    (void)ctx, (void)args, (void)kwargs, (void)result;
    for (;;)
        pause();
    return TASK_FAILURE;
}

static enum task_outcome greet(struct task_ctx *ctx, json_t *args, json_t *kwargs, json_t **result)
{
    (void)kwargs;
    const char *who;
    bool loud;
    double times;
    json_t *extra;
    if (!task_arg_str(ctx, args, "who", &who) || !task_arg_bool(ctx, args, "loud", &loud) ||
        !task_arg_number(ctx, args, "times", &times) || !task_arg_dict(ctx, args, "extra", &extra))
        return TASK_FAILURE;
    json_t *out = json_pack("{s:s, s:b, s:f, s:O}", "who", who, "loud", loud, "times", times, "extra", extra);
    return task_return(ctx, result, out);
}

static enum task_outcome late(struct task_ctx *ctx, json_t *args, json_t *kwargs, json_t **result)
{
    (void)args, (void)kwargs;
    struct timespec t = {0, 600000000};
    nanosleep(&t, NULL);
    return task_return(ctx, result, json_string("done"));
}

static const struct task_def tasks[] = {
    {.name = "native.late", .fn = late, .params = "", .doc = "acknowledged after it ran", .acks_late = true},
    {.name = "native.spin", .fn = spin, .params = "", .doc = "spins until revoked or past its soft limit"},
    {.name = "native.hang", .fn = hang, .params = "", .doc = "never returns", .time_limit = 1},
    {.name = "native.greet", .fn = greet, .params = "who, loud=false, times=1, extra={}", .doc = "typed args",
     .rate_limit = "600/m"},
};
CELERIAC_MODULE(tasks);
"""


def test_module_contract_stop_limits_and_typed_arguments(tmp_path, app, workers, broker):
    d = tmp_path / "mods"
    d.mkdir()
    (d / "extra.c").write_text(MODULE.replace("#include <time.h>", "#include <time.h>\n#include <unistd.h>"))
    r = run("build", str(d))
    assert r.returncode == 0, r.stderr
    assert "native.greet, native.hang, native.late, native.spin" in r.stdout
    w = workers.start("-c", "2", "--tasks", str(d / "extra.so"))  # prebuilt: loaded, nothing compiled
    assert "Loaded 1 task module(s)" in w.log() and "cc:" not in w.log()

    assert app.send_task("native.greet", args=["ada"], kwargs={"times": 2.5, "extra": {"k": [1]}}).get(
        timeout=TIMEOUT) == {"who": "ada", "loud": False, "times": 2.5, "extra": {"k": [1]}}
    name, e = exc_name_of(app.send_task("native.greet", args=["ada", 1]))
    assert name == "TypeError" and "greet() argument 'loud' must be bool, not int" in str(e)
    name, e = exc_name_of(app.send_task("native.greet", kwargs={"loud": True}))
    assert name == "TypeError" and "missing 1 required positional argument: 'who'" in str(e)

    # acks_late declared by the task: its message stays unacked while it runs (and only then).
    r = app.send_task("native.late")
    wait_until(lambda: r.state == "PENDING" and broker.hlen("unacked") == 1, what="late task held unacked")
    assert r.get(timeout=TIMEOUT) == "done"
    wait_until(lambda: broker.hlen("unacked") == 0, what="acknowledged after it ran")
    r = app.send_task("native.sleep_ms", args=[600])
    time.sleep(0.3)
    assert broker.hlen("unacked") == 0  # the worker's default: acknowledged when handed to a process
    assert r.get(timeout=TIMEOUT) == 600

    # The declared hard limit applies without any message or worker setting.
    name, _ = exc_name_of(app.send_task("native.hang"))
    assert name == "TimeLimitExceeded"
    # The soft limit of the message reaches task_should_stop.
    name, _ = exc_name_of(app.send_task("native.spin", soft_time_limit=0.3))
    assert name == "SoftTimeLimitExceeded"
    # revoke without terminate: a task that looks stops, and ends REVOKED.
    r = app.send_task("native.spin")
    wait_until(lambda: r.state == "SPINNING", what="spin running (its own update_state)")
    app.control.revoke(r.id)
    name, _ = exc_name_of(r)
    assert name == "TaskRevokedError" and r.state == "REVOKED"


WRONG_VERSION = r"""
#include <celeriac.h>
static enum task_outcome old(struct task_ctx *ctx, json_t *args, json_t *kwargs, json_t **result)
{
    (void)args, (void)kwargs;
    return task_return(ctx, result, json_integer(1));
}
static const struct task_def tasks[] = {{.name = "native.old", .fn = old, .params = ""}};
/* What a module built against another version of celeriac.h carries. */
const struct celeriac_module celeriac_module = {CELERIAC_ABI_VERSION + 998, tasks, 1};
"""


def test_refused_modules_and_build_errors(tmp_path, redis_server):
    d = tmp_path / "old"
    d.mkdir()
    (d / "old.c").write_text(WRONG_VERSION)
    r = run("build", str(d))
    assert r.returncode == 1 and f"{d}/old.so was built against celeriac.h version" in r.stderr, r.stderr
    assert "rebuild it" in r.stderr
    w = Celeriac(["--tasks", str(d / "old.so")], broker_url=redis_server.url(0))
    w.start()
    try:
        assert wait_until(lambda: not w.running(), what="the worker refusing the module")
        assert w.proc.returncode == 2
        assert "was built against celeriac.h version" in w.log()
    finally:
        w.cleanup()

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "oops.c").write_text("#include <celeriac.h>\nint f(void) { return undeclared_thing; }\n")
    r = run("build", str(bad))
    assert r.returncode == 1 and f"{bad}/oops.c:2:" in r.stderr and "undeclared_thing" in r.stderr
    r = run("new-task", "9lives", "--dir", str(tmp_path))
    assert r.returncode == 2 and "C identifier" in r.stderr
    r = run("new-task", "again", "--dir", str(tmp_path))
    assert r.returncode == 0
    r = run("new-task", "again", "--dir", str(tmp_path))
    assert r.returncode == 1 and "not overwritten" in r.stderr
    r = run("worker", "--dev")
    assert r.returncode == 2 and "--dev needs --tasks" in r.stderr


def test_builtin_stubs_are_generated_and_current():
    r = run("stubs")
    assert r.returncode == 0, r.stderr
    with open(os.path.join(REPO, "python_tasks", "native.py")) as f:
        assert f.read() == r.stdout, "python_tasks/native.py is stale: regenerate it with `celeriac stubs -o " \
                                     "python_tasks/native.py`"


CLIENT = """
import inspect, json, sys
from mystubs import score, fib, add
print(json.dumps({"score": score.delay([1, 2], weight=3).get(timeout=30), "fib": fib.delay(10).get(timeout=30),
                  "sig": str(inspect.signature(score.run)), "doc": score.__doc__,
                  "id": add.delay(1, 2).id}))
"""


def test_stubs_for_my_tasks_are_imported_and_used(tmp_path, redis_server, workers):
    d = new_task(tmp_path)
    out = tmp_path / "mystubs.py"
    r = run("stubs", "--tasks", str(d), "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert '@app.task(name="native.score", shared=False)\ndef score(values, weight=1):' in out.read_text()
    workers.start("-c", "1", "-Q", "native", "--tasks", str(d))
    env = dict(os.environ, PYTHONPATH=f"{REPO}:{tmp_path}", CELERY_BROKER_URL=redis_server.url(0),
               CELERY_RESULT_BACKEND=redis_server.url(1), CELERIAC_MODE="native")
    env.pop("CELERIAC_NATIVE_QUEUE", None)  # the default: queue "native"
    p = subprocess.run([sys.executable, "-c", CLIENT], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["score"] == 9 and got["fib"] == 55
    assert got["sig"] == "(values, weight=1)" and got["doc"] == "-> weight * sum(values)."


# (task, args, kwargs): the built-ins whose Python fallbacks must answer exactly as celeriac does.
SHARED_CASES = [
    ("native.noop", [], {}),
    ("native.add", [2, 3], {}),
    ("native.add", [1.5, 2], {}),
    ("native.add", [True, 1], {}),
    ("native.add", [1, "a"], {}),
    ("native.add", [9223372036854775807, 1], {}),
    ("native.add", [1], {}),
    ("native.add", [1, 2, 3], {}),
    ("native.add", [], {"x": 1, "y": 2, "z": 3}),
    ("native.echo", [1, "two", [3], {"4": None}], {"k": True}),
    ("native.fib", [20], {}),
    ("native.fib", [93], {}),
    ("native.fib", [-1], {}),
    ("native.sleep_ms", [5], {}),
    ("native.fail", ["boom"], {}),
    ("native.xsum", [[1, 2, 3.5]], {}),
    ("native.xsum", [[]], {}),
    ("native.retry_n", [2], {}),
    ("native.retry_n", [3], {"max_retries": 1}),
    ("native.fib_tree", [12, 8], {}),
]


def outcome(result):
    try:
        return ("ok", result.get(timeout=TIMEOUT))
    except Exception as e:  # noqa: BLE001 - the class is what is compared
        return ("error", type(e).__name__)


def test_mode_switch_and_fallbacks_match_the_native_tasks(tmp_path, redis_server, workers, client_factory):
    """One call site, two engines: CELERIAC_MODE picks the queue; both answer the shared table alike."""
    app = client_factory()
    workers.start("-c", "2", "-Q", "native")
    py = CeleryWorker(["-Q", "celery", "-c", "2", "--without-mingle", "--without-gossip", "--without-heartbeat"],
                      app="python_tasks.fallbacks", pythonpath=REPO, broker_url=redis_server.url(0),
                      backend_url=redis_server.url(1))
    workers.workers.append(py)
    py.start()
    py.wait_ready(60)
    native = [outcome(app.send_task(t, args=a, kwargs=k, queue="native")) for t, a, k in SHARED_CASES]
    python = [outcome(app.send_task(t, args=a, kwargs=k, queue="celery")) for t, a, k in SHARED_CASES]
    mismatches = [(case, n, p) for case, n, p in zip(SHARED_CASES, native, python) if n != p]
    assert not mismatches, mismatches

    # The switch: the same stub call goes to celeriac or to the Python worker.
    script = ("from python_tasks.native import fib; r = fib.delay(15); print(r.id, r.get(timeout=30))")
    seen = {}
    for mode in ("native", "python"):
        env = dict(os.environ, PYTHONPATH=REPO, CELERY_BROKER_URL=redis_server.url(0),
                   CELERY_RESULT_BACKEND=redis_server.url(1), CELERIAC_MODE=mode)
        env.pop("CELERIAC_NATIVE_QUEUE", None)
        env.pop("CELERIAC_PYTHON_QUEUE", None)
        p = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        task_id, value = p.stdout.split()
        assert value == "610"
        seen[mode] = task_id
    celeriac_log = workers.workers[0].log()
    wait_until(lambda: seen["python"] in py.log(), what="the Python worker logging its task")
    assert seen["native"] in celeriac_log and seen["python"] not in celeriac_log
    assert seen["native"] not in py.log()
