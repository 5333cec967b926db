"""Real processes for celeriac's integration tests, benchmark and demo: redis-server, celeriac, stock Celery.

Dependency-free apart from redis-py, so bench/ and scripts/demo.py can use it too:

    sys.path.insert(0, "<repo>/tests/integration")
    from servers import RedisServer, Celeriac, CeleryWorker

    with RedisServer() as rs:                       # private redis-server on a free loopback port
        with Celeriac(["-c", "2"], broker_url=rs.url(0), backend_url=rs.url(1)) as w:
            ...                                     # w.wait_ready() already done by __enter__
            print(w.log())

Every process is started in its own session (so it is its own process group, and a Ctrl-C in the terminal
reaches only the Python side); it is stopped by its pid, and whatever it left running in its group (pool
children) is killed afterwards by that group id, never by name.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import redis

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

# Lines a sanitizer prints when it finds something (ASan, LSan, UBSan).
SANITIZER_RE = re.compile(
    r"ERROR: AddressSanitizer|ERROR: LeakSanitizer|SUMMARY: AddressSanitizer|"
    r"runtime error:|SUMMARY: UndefinedBehaviorSanitizer"
)


def free_port():
    """A TCP port on 127.0.0.1 that nobody listens on right now (the kernel's pick; never 6379)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port != 6379:
            return port


def _wait(pred, timeout, interval=0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def _group_alive(pgid):
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


class _Process:
    """A child process in its own process group whose stdout+stderr go to one log file."""

    name = "process"
    ready_re = re.compile(r" ready\.")

    def __init__(self, log_dir=None):
        self.proc = None
        self.returncode = None
        self.orphans = False  # set when processes of the group outlived the main process
        self._own_dir = log_dir is None
        self.log_dir = log_dir or tempfile.mkdtemp(prefix=f"{self.name}-")
        self.log_path = os.path.join(self.log_dir, f"{self.name}.log")
        self._log_file = None

    # -- to be provided by subclasses
    def command(self):
        raise NotImplementedError

    def environment(self):
        return dict(os.environ)

    def cwd(self):
        return None

    # -- life cycle
    def start(self):
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"{self.name} is already running (pid {self.proc.pid})")
        self.returncode = None
        self.orphans = False
        self._log_file = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                env=self.environment(),
                cwd=self.cwd(),
                start_new_session=True,
            )
        finally:
            self._log_file.close()
        return self

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def log(self):
        """Everything the process wrote to stdout and stderr so far."""
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines=40):
        return "\n".join(self.log().splitlines()[-lines:])

    def wait_log(self, pattern, timeout=30.0):
        """Waits until the log matches pattern (a regex string or compiled); returns the match.
        Raises RuntimeError if the process exits first, TimeoutError after timeout seconds."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.log())
            if m:
                return m
            if not self.running():
                raise RuntimeError(
                    f"{self.name} exited with code {self.proc.poll() if self.proc else None} "
                    f"before logging {rx.pattern!r}; log:\n{self.log_tail()}"
                )
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{self.name} did not log {rx.pattern!r} within {timeout}s; log:\n{self.log_tail()}")
            time.sleep(0.02)

    def wait_ready(self, timeout=30.0):
        """Waits for the "<node> ready." line (logged at INFO once the worker consumes)."""
        return self.wait_log(self.ready_re, timeout)

    def _reap_group(self):
        pgid = self.proc.pid
        if _group_alive(pgid):
            self.orphans = True
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _wait(lambda: not _group_alive(pgid), 10)

    def stop(self, sig=signal.SIGTERM, timeout=30.0):
        """Sends sig to the main process and waits for it; returns its exit code (negative: killed by a
        signal). Processes it leaves behind in its group are then killed. If it does not exit within
        timeout seconds the whole group is SIGKILLed and TimeoutError raised."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(10)
                self.returncode = self.proc.returncode
                self._reap_group()
                raise TimeoutError(
                    f"{self.name} (pid {self.proc.pid}) did not exit within {timeout}s of signal {sig!s}; "
                    f"log:\n{self.log_tail()}"
                )
        self.returncode = self.proc.returncode
        self._reap_group()
        return self.returncode

    def kill(self):
        """SIGKILL of the main process only (a crash), then of whatever is left in its group."""
        return self.stop(signal.SIGKILL, timeout=10)

    def kill_group(self):
        """SIGKILL of the main process and its pool children at the same instant (a machine crash)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)
        self.returncode = self.proc.returncode
        _wait(lambda: not _group_alive(self.proc.pid), 10)
        return self.returncode

    def cleanup(self):
        """Stops the process if needed and removes the log directory when this object created it."""
        if self.running():
            try:
                self.stop()
            except TimeoutError:
                pass
        if self._own_dir:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.cleanup()


class RedisServer(_Process):
    """A private redis-server on 127.0.0.1 (and a unix socket in its temp dir), no persistence.

    .start() waits until PING answers; .stop() ends it by pid; .restart() brings up an empty server on the
    same port. password: if given, the server requires it (requirepass) and urls/clients carry it."""

    name = "redis"

    def __init__(self, port=None, password=None, binary="redis-server", extra_args=()):
        self.tmpdir = tempfile.mkdtemp(prefix="celeriac-redis-")
        super().__init__(log_dir=self.tmpdir)
        self._own_dir = True
        self._fixed_port = port is not None
        self.port = port or free_port()
        self.password = password
        self.binary = binary
        self.extra_args = list(extra_args)
        self.socket_path = os.path.join(self.tmpdir, "redis.sock")

    def command(self):
        exe = shutil.which(self.binary) or self.binary
        cmd = [
            exe,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", self.tmpdir,
            "--daemonize", "no",
            "--unixsocket", self.socket_path,
            "--unixsocketperm", "700",
            "--databases", "16",
        ]
        if self.password:
            cmd += ["--requirepass", self.password]
        return cmd + self.extra_args

    def start(self, timeout=15.0):
        if shutil.which(self.binary) is None and not os.path.exists(self.binary):
            raise FileNotFoundError(
                f"{self.binary} not found: install Debian's redis-server package (scripts/deps.sh test)"
            )
        for attempt in range(5):
            super().start()
            _wait(lambda: not self.running() or self._ping(), timeout)
            if self.running() and self._ping():
                return self
            if self.running():
                self.stop(signal.SIGKILL)
                raise TimeoutError(f"redis-server did not answer PING within {timeout}s:\n{self.log_tail()}")
            # It exited: most likely the port was taken between free_port() and bind(); pick another one.
            if self._fixed_port or attempt == 4:
                raise RuntimeError(f"redis-server exited with code {self.proc.returncode}:\n{self.log_tail()}")
            self.port = free_port()
        return self

    def _ping(self):
        try:
            return self.client(socket_timeout=1).ping()
        except redis.RedisError:
            return False

    def url(self, db=0):
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    def socket_url(self, db=0):
        auth = f":{self.password}@" if self.password else ""
        return f"redis+socket://{auth}{self.socket_path}?virtual_host={db}"

    def client(self, db=0, **kw):
        return redis.Redis(host="127.0.0.1", port=self.port, db=db, password=self.password, **kw)

    def stop(self, sig=signal.SIGTERM, timeout=30.0):
        return super().stop(sig, timeout)

    def restart(self):
        """Stops the server and starts an empty one on the same port."""
        self.stop()
        self._fixed_port = True
        return self.start()

    def cleanup(self):
        super().cleanup()
        shutil.rmtree(self.tmpdir, ignore_errors=True)


def rabbitmq_server_script():
    """The rabbitmq-server script of Debian's rabbitmq-server package (the one that runs as the caller, not the
    /usr/sbin wrapper that switches to the rabbitmq user and its /var/lib data), or None."""
    import glob

    found = sorted(glob.glob("/usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin/rabbitmq-server"))
    return found[-1] if found else None


class EpmdServer(_Process):
    """Erlang's port mapper on a private port, in the foreground, so that it is ours to stop by pid (a node
    started without one would spawn a daemonized epmd that outlives it)."""

    name = "epmd"
    ready_re = None

    def __init__(self, port, log_dir):
        super().__init__(log_dir=log_dir)
        self._own_dir = False
        self.port = port

    def command(self):
        return [shutil.which("epmd") or "epmd", "-port", str(self.port), "-address", "127.0.0.1"]


class RabbitServer(_Process):
    """A private RabbitMQ node (Debian's rabbitmq-server package): its own node name, AMQP, distribution and
    epmd ports (free loopback ports), data and logs in a temp dir, listening on 127.0.0.1 only, guest/guest.

    .start() waits until an AMQP login succeeds; .stop() ends it by pid (SIGTERM: a clean shutdown) and its
    epmd with it; .restart() brings the same node back (durable queues and persistent messages survive)."""

    name = "rabbitmq"

    def __init__(self, tls=False):
        self.tmpdir = tempfile.mkdtemp(prefix="celeriac-rabbit-")
        super().__init__(log_dir=self.tmpdir)
        self._own_dir = True
        self.port = free_port()
        self.dist_port = free_port()
        self.tls_port = free_port() if tls else None
        self.epmd = EpmdServer(free_port(), self.tmpdir)
        self.nodename = f"celeriac{self.port}@localhost"
        self.conf = os.path.join(self.tmpdir, "rabbitmq.conf")
        conf = (f"listeners.tcp.1 = 127.0.0.1:{self.port}\n"
                "loopback_users.guest = true\n"
                "log.console = true\nlog.console.level = warning\nlog.file = false\n")
        if tls:
            self.certs = self._make_certs()
            conf += (f"listeners.ssl.1 = 127.0.0.1:{self.tls_port}\n"
                     f"ssl_options.cacertfile = {self.certs['ca']}\n"
                     f"ssl_options.certfile = {self.certs['server_cert']}\n"
                     f"ssl_options.keyfile = {self.certs['server_key']}\n"
                     "ssl_options.verify = verify_peer\nssl_options.fail_if_no_peer_cert = true\n")
        with open(self.conf, "w") as f:
            f.write(conf)
        with open(os.path.join(self.tmpdir, "enabled_plugins"), "w") as f:
            f.write("[].\n")

    def _make_certs(self):
        """A throw-away CA, a server certificate for localhost and a client certificate (openssl CLI)."""
        d = os.path.join(self.tmpdir, "tls")
        os.makedirs(d)
        f = {k: os.path.join(d, k + ".pem") for k in ("ca", "ca_key", "server_cert", "server_key", "client_cert",
                                                      "client_key")}

        def run(*args):
            subprocess.run(["openssl", *args], check=True, stdin=subprocess.DEVNULL, capture_output=True, cwd=d)

        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=celeriac test CA",
            "-keyout", f["ca_key"], "-out", f["ca"])
        ext = os.path.join(d, "ext.cnf")
        with open(ext, "w") as e:
            e.write("subjectAltName = DNS:localhost, IP:127.0.0.1\n")
        for who, cn in (("server", "localhost"), ("client", "celeriac")):
            csr = os.path.join(d, who + ".csr")
            run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}", "-keyout", f[who + "_key"],
                "-out", csr)
            run("x509", "-req", "-in", csr, "-CA", f["ca"], "-CAkey", f["ca_key"], "-CAcreateserial", "-days", "2",
                "-extfile", ext, "-out", f[who + "_cert"])
        return f

    def command(self):
        return [rabbitmq_server_script()]

    def environment(self):
        env = dict(os.environ)
        env.update({
            "HOME": self.tmpdir,  # the Erlang cookie goes here
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_PORT": str(self.epmd.port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_CONFIG_FILE": self.conf,
            "RABBITMQ_ENABLED_PLUGINS_FILE": os.path.join(self.tmpdir, "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": os.path.join(self.tmpdir, "mnesia"),
            "RABBITMQ_LOG_BASE": os.path.join(self.tmpdir, "log"),
            "RABBITMQ_PID_FILE": os.path.join(self.tmpdir, "rabbit.pid"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": os.path.join(self.tmpdir, "advanced.config"),
        })
        return env

    def cwd(self):
        return self.tmpdir

    def ready(self):
        import amqp

        try:
            c = amqp.Connection(f"127.0.0.1:{self.port}", connect_timeout=1)
            c.connect()
            c.close()
            return True
        except Exception:
            return False

    def start(self, timeout=60.0):
        if rabbitmq_server_script() is None:
            raise FileNotFoundError("rabbitmq-server not found: install Debian's rabbitmq-server package "
                                    "(scripts/deps.sh test)")
        if not self.epmd.running():
            self.epmd.start()
            _wait(lambda: not self.epmd.running() or _port_open(self.epmd.port), 10)
        super().start()
        _wait(lambda: not self.running() or self.ready(), timeout, interval=0.2)
        if self.running() and self.ready():
            return self
        if self.running():
            self.stop()
            raise TimeoutError(f"rabbitmq did not accept AMQP logins within {timeout}s:\n{self.log_tail()}")
        raise RuntimeError(f"rabbitmq exited with code {self.proc.returncode}:\n{self.log_tail()}")

    def stop(self, sig=signal.SIGTERM, timeout=60.0, keep_epmd=False):
        rc = super().stop(sig, timeout)
        if not keep_epmd:
            self.epmd.stop()
        return rc

    def restart(self):
        """Stops the node (clean shutdown) and starts it again on the same ports and data."""
        self.stop(keep_epmd=True)
        return self.start()

    def ctl(self, *args, timeout=60):
        """Runs rabbitmqctl against this node (the package's own script, as the caller: it needs our cookie)."""
        exe = os.path.join(os.path.dirname(rabbitmq_server_script()), "rabbitmqctl")
        return subprocess.run([exe, "-n", self.nodename, *args], env=self.environment(), cwd=self.tmpdir,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, check=True)

    def url(self, vhost="/"):
        from urllib.parse import quote

        return f"amqp://guest:guest@127.0.0.1:{self.port}/{quote(vhost, safe='')}"

    def cleanup(self):
        super().cleanup()
        if self.epmd.running():
            self.epmd.stop()
        shutil.rmtree(self.tmpdir, ignore_errors=True)


def _port_open(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def celeriac_binary():
    """The celeriac executable: $CELERIAC_BIN (relative paths are taken from the current directory, then
    from the repository root), else build/celeriac in the repository."""
    env = os.environ.get("CELERIAC_BIN")
    if env:
        if os.path.isabs(env) or os.path.exists(env):
            return os.path.abspath(env)
        return os.path.join(REPO, env)
    return os.path.join(REPO, "build", "celeriac")


def _has_log_level(args):
    return any(a in ("-l", "--loglevel") or a.startswith("--loglevel=") or (a.startswith("-l") and len(a) > 2)
               for a in args)


class Celeriac(_Process):
    """`celeriac worker <args>`. broker_url/backend_url become -b/--result-backend when given; env is added to
    (and overrides) the inherited environment. `-l info` is added unless args choose a level, because the
    "ready." line is logged at INFO."""

    name = "celeriac"

    def __init__(self, args=(), broker_url=None, backend_url=None, env=None, binary=None, log_dir=None,
                 inherit_env=True):
        super().__init__(log_dir)
        self.binary = binary or celeriac_binary()
        self.args = list(args)
        if broker_url:
            self.args += ["-b", broker_url]
        if backend_url:
            self.args += ["--result-backend", backend_url]
        if not _has_log_level(self.args):
            self.args += ["-l", "info"]
        self.env = dict(env or {})
        self.inherit_env = inherit_env

    def command(self):
        return [self.binary, "worker"] + self.args

    def environment(self):
        env = dict(os.environ) if self.inherit_env else {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        # Do not let a developer's shell settings leak into the worker under test.
        if self.inherit_env:
            for k in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND"):
                env.pop(k, None)
        env.setdefault("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=0")
        env.setdefault("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1")
        env.update(self.env)
        return env

    def start(self):
        if not os.access(self.binary, os.X_OK):
            raise FileNotFoundError(f"celeriac binary not found or not executable: {self.binary} "
                                    "(build it with `make build`, or set CELERIAC_BIN)")
        return super().start()

    def __enter__(self):
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.cleanup()  # __exit__ is not called when __enter__ fails: the worker would be left running
            raise
        return self

    def sanitizer_reports(self):
        """Lines of the log where ASan/LSan/UBSan reported a problem (empty when clean)."""
        return [line for line in self.log().splitlines() if SANITIZER_RE.search(line)]

    @staticmethod
    def run(args, env=None, timeout=30, binary=None):
        """Runs `celeriac <args>` to completion (for --version, --help, bad flags): a CompletedProcess with
        text stdout and stderr."""
        full_env = dict(os.environ)
        for k in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND"):
            full_env.pop(k, None)
        full_env.update(env or {})
        return subprocess.run([binary or celeriac_binary()] + list(args), stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, errors="replace", env=full_env, timeout=timeout)


class CeleryWorker(_Process):
    """The stock Python worker: `python3 -m celery -A <app> worker -P prefork <args>`.

    app is a module importable from pythonpath (default: this folder, whose pyworker_tasks.py defines the
    native.* tasks in Python). broker_url/backend_url are passed as CELERY_BROKER_URL/CELERY_RESULT_BACKEND.
    `-l info` is added unless args choose a level."""

    name = "celery"

    def __init__(self, args=(), app="pyworker_tasks", broker_url=None, backend_url=None, env=None,
                 pythonpath=None, python=None, log_dir=None):
        super().__init__(log_dir)
        self.app = app
        self.args = list(args)
        if not _has_log_level(self.args):
            self.args += ["-l", "info"]
        self.env = dict(env or {})
        if broker_url:
            self.env["CELERY_BROKER_URL"] = broker_url
        if backend_url:
            self.env["CELERY_RESULT_BACKEND"] = backend_url
        self.pythonpath = pythonpath or HERE
        self.python = python or sys.executable or "/usr/bin/python3"

    def command(self):
        return [self.python, "-m", "celery", "-A", self.app, "worker", "-P", "prefork"] + self.args

    def environment(self):
        env = dict(os.environ)
        for k in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND"):
            env.pop(k, None)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (self.pythonpath, env.get("PYTHONPATH")) if p)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.update(self.env)
        return env

    def cwd(self):
        return self.pythonpath

    def __enter__(self):
        self.start()
        try:
            self.wait_ready(60)
        except BaseException:
            self.cleanup()  # as Celeriac.__enter__: no worker left running when it never got ready
            raise
        return self


def postgres_bin_dir():
    """The newest /usr/lib/postgresql/<version>/bin holding initdb (Debian's postgresql package), else None."""
    import glob

    dirs = [d for d in glob.glob("/usr/lib/postgresql/*/bin") if os.path.exists(os.path.join(d, "initdb"))]
    dirs.sort(key=lambda d: [int(x) if x.isdigit() else 0 for x in d.split("/")[-2].split(".")])
    return dirs[-1] if dirs else None


class PostgresServer(_Process):
    """A private PostgreSQL: initdb into a temp dir, `postgres` on 127.0.0.1:<free port> with its unix socket
    in that temp dir. Stopped by pid (SIGINT: PostgreSQL's fast shutdown, which disconnects clients).

    PostgreSQL refuses to run as root: when this runs as root, initdb and postgres run as the `postgres`
    system user (created by Debian's package) through setpriv, which execs without forking, so the pid
    stopped is the postmaster's. The superuser `user` has `password` over TCP (scram-sha-256); the unix socket
    trusts everyone (for the tests' own checks). settings: extra `-c name=value` pairs, e.g. {"fsync": "off"}.
    """

    name = "postgres"
    user = "celeriac"
    password = "pg-secret-4711"

    def __init__(self, settings=None, database="postgres"):
        self.bindir = postgres_bin_dir()
        self.tmpdir = tempfile.mkdtemp(prefix="celeriac-pg-")
        super().__init__(log_dir=self.tmpdir)
        self._own_dir = True
        self.datadir = os.path.join(self.tmpdir, "data")
        self.port = free_port()
        self.database = database
        self.settings = dict(settings or {})
        self._initialised = False
        self._run_as = None  # (uid, gid) when we are root
        if os.geteuid() == 0:
            import pwd

            pw = pwd.getpwnam("postgres")
            self._run_as = (pw.pw_uid, pw.pw_gid)
            os.chown(self.tmpdir, *self._run_as)

    def _as_user(self, cmd):
        if not self._run_as:
            return cmd
        uid, gid = self._run_as
        return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--"] + cmd

    def _initdb(self):
        if self.bindir is None:
            raise FileNotFoundError("initdb not found under /usr/lib/postgresql/*/bin: install Debian's "
                                    "postgresql package (scripts/deps.sh test)")
        pwfile = os.path.join(self.tmpdir, "pwfile")
        with open(pwfile, "w") as f:
            f.write(self.password + "\n")
        if self._run_as:
            os.chown(pwfile, *self._run_as)
        subprocess.run(self._as_user([os.path.join(self.bindir, "initdb"), "-D", self.datadir, "-U", self.user,
                                      f"--pwfile={pwfile}", "--auth-local=trust", "--auth-host=scram-sha-256",
                                      "-E", "UTF8", "--locale=C", "--no-sync"]),
                       check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       cwd=self.tmpdir)
        os.unlink(pwfile)
        self._initialised = True

    def command(self):
        cmd = [os.path.join(self.bindir, "postgres"), "-D", self.datadir, "-p", str(self.port),
               "-h", "127.0.0.1", "-k", self.tmpdir]
        for k, v in self.settings.items():
            cmd += ["-c", f"{k}={v}"]
        return self._as_user(cmd)

    def cwd(self):
        return self.tmpdir

    def ready(self):
        r = subprocess.run([os.path.join(self.bindir, "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return r.returncode == 0

    def start(self, timeout=60.0):
        if not self._initialised:
            self._initdb()
        for attempt in range(5):
            super().start()
            _wait(lambda: not self.running() or self.ready(), timeout, interval=0.05)
            if self.running() and self.ready():
                return self
            if self.running():
                self.stop(signal.SIGKILL)
                raise TimeoutError(f"postgres did not accept connections within {timeout}s:\n{self.log_tail()}")
            if attempt == 4 or "could not bind" not in self.log():
                raise RuntimeError(f"postgres exited with code {self.proc.returncode}:\n{self.log_tail()}")
            self.port = free_port()  # the port was taken between free_port() and bind()
        return self

    def stop(self, sig=signal.SIGINT, timeout=30.0):
        return super().stop(sig, timeout)

    def restart(self):
        """Fast shutdown (clients are disconnected), then the same cluster again on the same port."""
        self.stop()
        return self.start()

    def url(self, database=None, password=True):
        """A libpq URI over TCP with the superuser's password."""
        auth = f"{self.user}:{self.password}" if password else self.user
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{database or self.database}"

    def socket_dsn(self, database=None):
        """libpq keyword form over the unix socket (trusted: no password)."""
        return f"host={self.tmpdir} port={self.port} user={self.user} dbname={database or self.database}"

    def cleanup(self):
        super().cleanup()
        shutil.rmtree(self.tmpdir, ignore_errors=True)
