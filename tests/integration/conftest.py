"""Fixtures for celeriac's integration tests: a real redis-server, the stock Celery client, real workers.

Environment:
  CELERIAC_BIN          the celeriac binary (default build/celeriac); `make test` passes build-asan/celeriac.
  CELERIAC_IT_WORKER    "celeriac" (default) or "python": run the same tests against the stock Python worker
                        (python3 -m celery worker -P prefork with tests/integration/pyworker_tasks.py), to check
                        the tests themselves. Tests marked celeriac_only are then skipped, with the reason.
  CELERIAC_IT_TIMEOUT   seconds any single wait may take (default 30).

Nothing is skipped silently: a missing redis-server or celeriac binary fails the run with a message.
"""

import gc
import os
import shutil
import signal
import warnings

import pytest

# kombu 5.2 and celery 5.2 use an importlib API that Python 3.11 deprecates: noise, not findings.
warnings.filterwarnings("ignore", "SelectableGroups dict interface", DeprecationWarning)
from celery import Celery  # noqa: E402

from servers import Celeriac, CeleryWorker, RedisServer, celeriac_binary
from util import TIMEOUT

IMPL = os.environ.get("CELERIAC_IT_WORKER", "celeriac")
if IMPL not in ("celeriac", "python"):
    raise SystemExit(f"CELERIAC_IT_WORKER must be 'celeriac' or 'python', not {IMPL!r}")
RUN_ALL = os.environ.get("CELERIAC_IT_RUN_ALL") == "1"  # python mode: also run celeriac_only tests

# Options of the stock worker that only cost start-up time and play no part in what is tested.
PY_FAST_START = ["--without-mingle", "--without-gossip", "--without-heartbeat"]


def pytest_configure(config):
    config.addinivalue_line("markers", "celeriac_only(reason): behaviour the issue asks of celeriac where the "
                                       "stock Python worker differs (or a celeriac-only interface)")
    # kombu 5.2 and celery 5.2 use an importlib API that Python 3.11 deprecates: noise, not findings.
    config.addinivalue_line("filterwarnings", "ignore:SelectableGroups dict interface:DeprecationWarning")


def pytest_sessionstart(session):
    problems = []
    if shutil.which("redis-server") is None:
        problems.append("redis-server is not installed (Debian package redis-server; "
                        "`scripts/deps.sh test` installs it)")
    if IMPL == "celeriac":
        exe = celeriac_binary()
        if not os.access(exe, os.X_OK):
            problems.append(f"celeriac binary not found or not executable: {exe} (build it first, "
                            "e.g. `make test` builds build-asan/celeriac; or set CELERIAC_BIN)")
    if problems:
        pytest.exit("integration tests cannot run:\n  " + "\n  ".join(problems), returncode=1)


def pytest_collection_modifyitems(config, items):
    if IMPL != "python" or RUN_ALL:
        return
    for item in items:
        m = item.get_closest_marker("celeriac_only")
        if m:
            reason = m.args[0] if m.args else m.kwargs.get("reason", "celeriac-only behaviour")
            item.add_marker(pytest.mark.skip(reason=f"CELERIAC_IT_WORKER=python: {reason}"))


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


def _failed(request):
    rep = getattr(request.node, "rep_call", None)
    return rep is None or rep.failed


# -- Redis ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def redis_server():
    """One private redis-server for the whole run (free loopback port, no persistence, temp dir)."""
    rs = RedisServer()
    rs.start()
    yield rs
    rs.cleanup()


@pytest.fixture(autouse=True)
def _flush_redis(redis_server):
    """Every test starts with empty databases."""
    redis_server.client().flushall()
    yield


@pytest.fixture
def broker(redis_server):
    """redis-py client on the broker database (0)."""
    c = redis_server.client(0)
    yield c
    c.close()


@pytest.fixture
def backend(redis_server):
    """redis-py client on the result-backend database (1)."""
    c = redis_server.client(1)
    yield c
    c.close()


# -- the stock Celery client ------------------------------------------------------------------------------

def make_client(broker_url, backend_url, **conf):
    """A stock Celery client app with JSON everywhere and stubs for the native.* task names (so that
    `.delay()` works; their bodies never run here)."""
    app = Celery("it-client", broker=broker_url, backend=backend_url, set_as_current=False)
    app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                    result_accept_content=["json"], **conf)

    @app.task(name="native.noop", shared=False)
    def noop():
        raise NotImplementedError

    @app.task(name="native.add", shared=False)
    def add(x, y):
        raise NotImplementedError

    @app.task(name="native.echo", shared=False)
    def echo(*args, **kwargs):
        raise NotImplementedError

    @app.task(name="native.fib", shared=False)
    def fib(n):
        raise NotImplementedError

    @app.task(name="native.sleep_ms", shared=False)
    def sleep_ms(ms):
        raise NotImplementedError

    @app.task(name="native.fail", shared=False)
    def fail(message):
        raise NotImplementedError

    @app.task(name="native.xsum", shared=False)
    def xsum(values):
        raise NotImplementedError

    @app.task(name="native.incr", shared=False)
    def incr(key):
        raise NotImplementedError

    return app


def close_client(app):
    # Close the result subscription and forget it, so AsyncResult objects that outlive the test (kept by a
    # traceback) do not try to unsubscribe from a stopped server in __del__ at exit.
    consumer = getattr(app.backend, "result_consumer", None)
    pubsub = getattr(consumer, "_pubsub", None)
    if pubsub is not None:
        try:
            pubsub.close()
        except Exception:  # noqa: BLE001 - best effort at teardown
            pass
        consumer._pubsub = None
    app.close()


@pytest.fixture
def client_factory(redis_server):
    """make(broker_db=0, backend_db=1, **conf) -> a stock Celery client app; closed at teardown."""
    apps = []

    def make(broker_db=0, backend_db=1, **conf):
        app = make_client(redis_server.url(broker_db), redis_server.url(backend_db), **conf)
        apps.append(app)
        return app

    yield make
    gc.collect()  # AsyncResult.__del__ talks to Redis: let it happen while the server is still up
    for a in apps:
        close_client(a)


@pytest.fixture
def app(client_factory):
    """The stock Celery client: broker DB 0, backend DB 1, JSON."""
    return client_factory()


# -- workers ----------------------------------------------------------------------------------------------

_PY_ENV_FLAGS = {"--acks-late": "PYWORKER_ACKS_LATE", "--track-started": "PYWORKER_TRACK_STARTED"}
_PY_ENV_VALUES = {"--visibility-timeout": "PYWORKER_VISIBILITY_TIMEOUT", "--result-expires": "PYWORKER_RESULT_EXPIRES",
                  "-b": "CELERY_BROKER_URL", "--broker": "CELERY_BROKER_URL",
                  "--result-backend": "CELERY_RESULT_BACKEND"}


def celery_equivalent(args):
    """celeriac worker flags -> (stock `celery worker` flags, environment for pyworker_tasks)."""
    out, env = [], {}
    it = iter(args)
    for a in it:
        if a in _PY_ENV_FLAGS:
            env[_PY_ENV_FLAGS[a]] = "1"
        elif a in _PY_ENV_VALUES:
            env[_PY_ENV_VALUES[a]] = next(it)
        else:
            out.append(a)
    return out, env


class WorkerPool:
    """Starts workers for one test (or module) and checks them when it ends: each celeriac still running is
    stopped with SIGTERM and must exit 0; no celeriac log may hold a sanitizer report."""

    def __init__(self, redis_server):
        self.redis_server = redis_server
        self.workers = []
        self.expect_clean_exit = True

    def start(self, *args, broker_url=None, backend_url=None, env=None, ready=True, impl=None):
        """Starts a worker with celeriac's flags (args). broker_url/backend_url default to DB 0/1 of the
        session server; pass False to give none (e.g. to test the environment variables). impl overrides
        CELERIAC_IT_WORKER for this one worker ("celeriac" or "python")."""
        impl = impl or IMPL
        if broker_url is None:
            broker_url = self.redis_server.url(0)
        if backend_url is None:
            backend_url = self.redis_server.url(1)
        args = [str(a) for a in args]
        if impl == "celeriac":
            w = Celeriac(args, broker_url=broker_url or None, backend_url=backend_url or None, env=env)
        else:
            pargs, penv = celery_equivalent(args)
            penv.update(env or {})
            w = CeleryWorker(PY_FAST_START + pargs, broker_url=broker_url or None, backend_url=backend_url or None,
                             env=penv)
        self.workers.append(w)
        w.start()
        if ready:
            w.wait_ready(TIMEOUT if impl == "celeriac" else max(TIMEOUT, 60))
        return w

    def python(self, *args, **kw):
        """A stock Python worker whatever CELERIAC_IT_WORKER says (for interop tests)."""
        return self.start(*args, impl="python", **kw)

    def celeriac(self, *args, **kw):
        return self.start(*args, impl="celeriac", **kw)

    def stop(self, w, sig=signal.SIGTERM):
        """Stops one worker and returns its exit code. The stock worker (Celery 5.2.6 on Python 3.11) now and
        then hangs in "Worker: Stopping Pool..." after SIGTERM; that is not what is tested here, so a stock
        worker gets 15 s and then SIGKILL (returning None), while celeriac gets TIMEOUT and a TimeoutError."""
        if isinstance(w, Celeriac):
            return w.stop(sig, TIMEOUT)
        try:
            return w.stop(sig, 15)
        except TimeoutError:
            print(f"note: stock worker pid {w.pid} hung after signal {sig!s}; killed")
            return None

    def finish(self, show_logs):
        problems = []
        for w in self.workers:
            if w.running():
                try:
                    rc = self.stop(w)
                except TimeoutError as e:
                    problems.append(str(e))
                    rc = None
                if isinstance(w, Celeriac) and self.expect_clean_exit and rc not in (0, None):
                    problems.append(f"celeriac (pid {w.pid}) exited with code {rc} after SIGTERM at teardown")
            if isinstance(w, Celeriac):
                reports = w.sanitizer_reports()
                if reports:
                    problems.append(f"sanitizer reports in celeriac (pid {w.pid}) log:\n  " + "\n  ".join(reports[:20]))
            if show_logs or problems:
                print(f"----- {w.name} pid {w.pid} {' '.join(w.command()[1:])}\n{w.log_tail(60)}")
        for w in self.workers:
            w.cleanup()
        return problems


@pytest.fixture
def workers(request, redis_server):
    """workers.start(*celeriac_flags, ...) -> a running worker (celeriac, or the stock worker when
    CELERIAC_IT_WORKER=python); workers.python(...) always starts the stock one. All are stopped and checked
    at teardown, and their logs are printed when the test failed."""
    pool = WorkerPool(redis_server)
    yield pool
    problems = pool.finish(show_logs=_failed(request))
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.fixture(scope="module")
def module_workers(request, redis_server):
    """Like `workers`, for a worker shared by every test of a module."""
    pool = WorkerPool(redis_server)
    yield pool
    problems = pool.finish(show_logs=False)
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


def private_redis(workers, extra_args=()):
    """Generator for fixtures: a redis-server of the test's own, which it may stop or restart; workers started
    on it are stopped before it is. Use as `yield from private_redis(workers, (...))`."""
    rs = RedisServer(extra_args=extra_args)
    rs.start()
    yield rs
    for w in workers.workers:
        if w.running():
            w.stop()
    rs.stop()
    rs.cleanup()


@pytest.fixture
def worker(workers):
    """One running worker with the defaults used by most tests: -c 2."""
    return workers.start("-c", "2")


# -- PostgreSQL (the native.pg_* tasks) -------------------------------------------------------------------

from servers import PostgresServer  # noqa: E402


@pytest.fixture(scope="session")
def postgres_server():
    """One private PostgreSQL for the run: initdb into a temp dir, a free loopback port, its socket in that
    dir. fsync off: the tests check results, not durability."""
    pg = PostgresServer(settings={"fsync": "off", "full_page_writes": "off"})
    pg.start()
    yield pg
    pg.cleanup()


@pytest.fixture
def pg(postgres_server):
    """A psycopg2 connection (autocommit, over the trusted unix socket) for the tests' own SQL."""
    import psycopg2

    conn = psycopg2.connect(postgres_server.socket_dsn())
    conn.autocommit = True
    yield conn
    conn.close()
