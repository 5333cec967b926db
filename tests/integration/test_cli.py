"""celeriac's command line: --version, --help, and one clear line with exit code 2 for anything wrong.

Every invocation that should be refused also gets a -b to a closed loopback port, so a celeriac that wrongly
accepted it could never reach a Redis on the default port 6379; it would simply time out here."""

import re
import subprocess

import pytest

from servers import Celeriac, free_port

pytestmark = pytest.mark.celeriac_only("celeriac's own command line")

SECRET = "hunter2-Sekr1t"


def run(*args, env=None, timeout=15):
    try:
        return Celeriac.run(list(args), env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`celeriac {' '.join(args)}` was still running after {timeout}s: it accepted what it should "
                    "have refused", pytrace=False)


def dead_url(db=0):
    return f"redis://127.0.0.1:{free_port()}/{db}"


def test_version():
    p = run("--version")
    assert p.returncode == 0, p.stderr
    assert re.search(r"\b\d+\.\d+\.\d+\b", p.stdout), f"no version number in {p.stdout!r}"
    assert "celeriac" in p.stdout.lower()
    assert p.stderr == ""


def test_help_lists_every_option():
    p = run("--help")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "worker" in out
    for flag in ("-Q", "-c", "-n", "-E", "-l", "--prefetch-multiplier", "--acks-late", "-b", "--result-backend",
                 "--visibility-timeout", "--result-expires", "--track-started", "--version", "--help"):
        assert re.search(r"(^|[\s,])" + re.escape(flag) + r"\b", out), f"--help does not mention {flag}"


def test_worker_help():
    p = run("worker", "--help")
    assert p.returncode == 0, p.stderr
    assert "--acks-late" in p.stdout


def _one_line_exit_2(p, *must_mention):
    assert p.returncode == 2, f"exit code {p.returncode}, stderr {p.stderr!r}"
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {p.stderr!r}"
    for word in must_mention:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    assert p.stdout == ""
    return lines[0]


@pytest.mark.parametrize("args, mention", [
    (["worker", "--bogus"], "--bogus"),
    (["worker", "-Z"], "-Z"),
    (["worker", "-c"], None),
    (["worker", "-c", "abc"], "abc"),
    (["worker", "-c", "-3"], None),
    (["worker", "-c", "2x"], None),
    (["worker", "--concurrency=abc"], None),
    (["worker", "--prefetch-multiplier", "-1"], None),
    (["worker", "--prefetch-multiplier", "many"], None),
    (["worker", "-l", "loud"], "loud"),
    (["worker", "--visibility-timeout", "soon"], None),
    (["worker", "--visibility-timeout", "-5"], None),
    (["worker", "--result-expires", "x"], None),
    (["worker", "--acks-late=yes"], None),
    (["worker", "-Q", ""], None),
    (["worker", "--autoscale", "0"], "'0'"),
    (["worker", "--autoscale", "2,3"], "'2,3'"),
    (["worker", "--autoscale", "4,x"], "'4,x'"),
    (["frobnicate"], None),
    ([], None),
], ids=lambda v: " ".join(v) if isinstance(v, list) else str(v))
def test_bad_flag_is_one_line_and_exit_2(args, mention):
    extra = ["-b", dead_url()] if args[:1] == ["worker"] else []
    p = run(*args, *extra)
    _one_line_exit_2(p, *([mention] if mention else []))


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:6390/0",
    "redis://127.0.0.1:notaport/0",
    "redis://127.0.0.1:99999/0",
    "redis://127.0.0.1:6390/notadb",
    "redis://127.0.0.1:6390/-1",
    "redis+socket://",
    "not a url at all",
    "foo://bar",
])
def test_bad_broker_url_is_one_line_and_exit_2(url):
    p = run("worker", "-b", url)
    _one_line_exit_2(p)


@pytest.mark.parametrize("url", ["http://x/1", "redis://127.0.0.1:bad/1", "redis://127.0.0.1:6390/x"])
def test_bad_backend_url_is_one_line_and_exit_2(url):
    p = run("worker", "-b", dead_url(), "--result-backend", url)
    _one_line_exit_2(p)


def test_bad_url_from_the_environment_is_exit_2():
    p = run("worker", env={"CELERY_BROKER_URL": "redis://127.0.0.1:notaport/0"})
    _one_line_exit_2(p)
    p = run("worker", "-b", dead_url(), env={"CELERY_RESULT_BACKEND": "redis://127.0.0.1:6390/abc"})
    _one_line_exit_2(p)


@pytest.mark.parametrize("url", [
    f"redis://:{SECRET}@127.0.0.1:notaport/0",
    f"redis://user:{SECRET}@127.0.0.1:6390/notadb",
    f"http://:{SECRET}@127.0.0.1:6390/0",
])
def test_password_is_not_echoed_in_url_errors(url):
    p = run("worker", "-b", url)
    line = _one_line_exit_2(p)
    assert SECRET not in line
    p = run("worker", "-b", dead_url(), "--result-backend", url)
    line = _one_line_exit_2(p)
    assert SECRET not in line


def test_a_flag_wins_over_a_bad_environment_url(workers, app, redis_server):
    """Like Celery, the flag is used when both are given, so a bad environment value does not matter."""
    w = workers.start("-c", "1", env={"CELERY_BROKER_URL": "redis://127.0.0.1:notaport/0",
                                      "CELERY_RESULT_BACKEND": "redis://127.0.0.1:6390/abc"})
    assert w.running()
    assert app.send_task("native.add", args=[1, 2]).get(timeout=30) == 3
