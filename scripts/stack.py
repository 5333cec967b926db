#!/usr/bin/env python3
"""The whole stack on this machine, without Docker (`make demo WEB=1` runs it): the local equivalent of
docker/docker-compose.yml, and the fixture the web tests start (tests/integration/test_web.py).

Starts, each on a free loopback port and stopped (by pid) at the end:
  redis        a private redis-server: broker in database 0, results in database 1
  postgres     a private PostgreSQL (initdb into a temp dir)
  celeriac     build/celeriac (or $CELERIAC_BIN) -Q native, with the PostgreSQL tasks allowed on demo_rows
  python       the stock worker running python_tasks.fallbacks, -Q python
  web          the Flask demo (python_tasks.web) under gunicorn, on $CELERIAC_WEB_PORT or else a free port

and prints the page's address; Ctrl-C stops everything. Exit status 1, with what is missing, when a piece
cannot start.
"""
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests", "integration"))

from servers import (Celeriac, CeleryWorker, PostgresServer, RedisServer, _Process,  # noqa: E402
                     celeriac_binary, free_port, postgres_bin_dir)

PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
TABLE = "demo_rows"
NATIVE_QUEUE = "native"
PYTHON_QUEUE = "python"
# Options of the stock worker that only cost start-up time here.
PY_FAST_START = ["--without-mingle", "--without-gossip"]


def missing_prerequisites():
    """What this machine lacks to run the stack, each with the command that fixes it."""
    missing = []
    for mod, pkg in (("celery", "python3-celery"), ("redis", "python3-redis"), ("flask", "python3-flask"),
                     ("sqlalchemy", "python3-sqlalchemy"), ("psycopg2", "python3-psycopg2"),
                     ("gunicorn", "gunicorn")):
        r = subprocess.run([PYTHON, "-c", f"import {mod}"], capture_output=True)
        if r.returncode != 0:
            missing.append(f"Python module {mod} for {PYTHON}: apt-get install -y {pkg}")
    if shutil.which("redis-server") is None:
        missing.append("redis-server: apt-get install -y redis-server")
    if postgres_bin_dir() is None:
        missing.append("PostgreSQL's initdb/postgres: apt-get install -y postgresql")
    exe = celeriac_binary()
    if not os.access(exe, os.X_OK):
        missing.append(f"the celeriac binary {exe}: `make build` (or set CELERIAC_BIN)")
    return missing


class WebServer(_Process):
    """The Flask demo under gunicorn (sync workers: each request holds one process, as the Celery client's
    result consumer is not thread-safe). Ready when /healthz answers."""

    name = "web"

    def __init__(self, env, port=None, workers=3, log_dir=None):
        super().__init__(log_dir)
        self.port = port or free_port()
        self.workers = workers
        self.env = env

    def command(self):
        return [PYTHON, "-m", "gunicorn", "--bind", f"127.0.0.1:{self.port}", "--workers", str(self.workers),
                "--timeout", "120", "--access-logfile", "-", "python_tasks.web.wsgi:app"]

    def environment(self):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.update(self.env)
        return env

    def cwd(self):
        return REPO

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout=30.0):
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if not self.running():
                raise RuntimeError(f"gunicorn exited with code {self.proc.poll()}:\n{self.log_tail()}")
            if time.monotonic() >= deadline:
                raise TimeoutError(f"the web app did not answer /healthz within {timeout}s:\n{self.log_tail()}")
            time.sleep(0.1)


class Stack:
    """Every server of the demo. postgres: an already running PostgresServer to use (the tests share
    theirs); otherwise the stack starts its own. stop() ends what it started, web first."""

    def __init__(self, postgres=None, web_port=None, celeriac_args=(), python_concurrency=1, web_workers=3):
        self.procs = []
        self.redis = None
        self.postgres = postgres
        self._own_postgres = postgres is None
        self.web_port = web_port
        self.celeriac_args = list(celeriac_args)
        self.python_concurrency = python_concurrency
        self.web_workers = web_workers
        self.celeriac = self.python = self.web = None

    def env(self):
        """The configuration every piece gets: the same variables as in docker/docker-compose.yml."""
        return {
            "CELERY_BROKER_URL": self.redis.url(0),
            "CELERY_RESULT_BACKEND": self.redis.url(1),
            "DATABASE_URL": self.postgres.url(),
            "CELERIAC_PG_TABLES": TABLE,
            "CELERIAC_NATIVE_QUEUE": NATIVE_QUEUE,
            "CELERIAC_PYTHON_QUEUE": PYTHON_QUEUE,
        }

    def start(self):
        try:
            self.redis = RedisServer().start()
            if self.postgres is None:
                self.postgres = PostgresServer()
                self.postgres.start()
            env = self.env()
            self.http_port = free_port()
            self.celeriac = Celeriac(["-Q", NATIVE_QUEUE, "-n", "celeriac@%h", "--http-port", str(self.http_port),
                                      "--http-bind", "127.0.0.1"] + self.celeriac_args, env=env)
            self.python = CeleryWorker(PY_FAST_START + ["-Q", PYTHON_QUEUE, "-n", "python@%h",
                                                        "-c", str(self.python_concurrency)],
                                       app="python_tasks.fallbacks", pythonpath=REPO, env=env)
            self.web = WebServer(env, port=self.web_port, workers=self.web_workers)
            for p in (self.celeriac, self.python, self.web):
                self.procs.append(p)
                p.start()
            self.celeriac.wait_ready(30)
            self.python.wait_ready(60)
            self.web.wait_ready(30)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self):
        for p in reversed(self.procs):
            if p.running():
                try:
                    p.stop(signal.SIGTERM, 20)
                except TimeoutError:
                    pass
        for p in self.procs:
            p.cleanup()
        self.procs = []
        if self.redis is not None:
            self.redis.cleanup()
            self.redis = None
        if self._own_postgres and self.postgres is not None:
            self.postgres.cleanup()
            self.postgres = None

    def logs(self):
        return "\n".join(f"----- {p.name} (pid {p.pid})\n{p.log_tail(40)}" for p in self.procs)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def main():
    missing = missing_prerequisites()
    if missing:
        print("celeriac stack: cannot run, missing:\n  - " + "\n  - ".join(missing), file=sys.stderr)
        return 1
    port = int(os.environ.get("CELERIAC_WEB_PORT") or 0) or None
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    print("starting redis-server, PostgreSQL, celeriac, the Python worker and the web app ...", flush=True)
    with Stack(web_port=port, python_concurrency=2) as st:
        print(f"""
  demo page         {st.web.url}/
  celeriac          pid {st.celeriac.pid}, queue {NATIVE_QUEUE}, health http://127.0.0.1:{st.http_port}/healthz
  Python worker     pid {st.python.pid}, queue {PYTHON_QUEUE}
  broker / results  {st.redis.url(0)} / {st.redis.url(1)}
  PostgreSQL        {st.postgres.url(password=False)} (table {TABLE})

Ctrl-C stops everything.""", flush=True)
        try:
            while not stopping:
                dead = [p for p in st.procs if not p.running()]
                if dead:
                    print(f"{dead[0].name} exited:\n{dead[0].log_tail()}", file=sys.stderr)
                    return 1
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        print("\nstopping ...", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
