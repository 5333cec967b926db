"""The built-in native tasks, seen from the stock Celery client: values, errors, unknown names, log lines.

One worker (-c 2) serves the whole module; every test also checks that it is still serving afterwards."""

import math
import re

import pytest

from util import TIMEOUT, exc_name_of, result_doc

INT64_MAX = 2 ** 63 - 1
INT64_MIN = -(2 ** 63)


@pytest.fixture(scope="module")
def shared_worker(module_workers):
    return module_workers.start("-c", "2")


@pytest.fixture
def run(app, shared_worker):
    """run(name, *args, **kwargs) -> the value .get() returns."""
    def call(name, /, *args, **kwargs):
        return app.send_task(name, args=list(args), kwargs=kwargs).get(timeout=TIMEOUT)
    return call


@pytest.fixture
def fails(app, shared_worker):
    """fails(name, *args, **kwargs) -> (exception class name, exception) that .get() raised."""
    def call(name, /, *args, **kwargs):
        return exc_name_of(app.send_task(name, args=list(args), kwargs=kwargs))
    return call


def still_serving(run):
    assert run("native.add", 20, 22) == 42


# -- good arguments ---------------------------------------------------------------------------------------

def test_noop_returns_none(run):
    assert run("native.noop") is None


@pytest.mark.parametrize("x, y, expected", [
    (1, 2, 3),
    (-5, 3, -2),
    (0, 0, 0),
    (INT64_MAX - 1, 1, INT64_MAX),
    (INT64_MIN + 1, -1, INT64_MIN),
    (INT64_MAX, INT64_MIN, -1),
    (1.5, 2.25, 3.75),
    (1, 0.5, 1.5),
    (-0.1, 0.1, 0.0),
    (1e308, 1e308 * -1, 0.0),
])
def test_add(run, x, y, expected):
    got = run("native.add", x, y)
    assert got == expected
    assert type(got) is type(expected), f"add({x!r}, {y!r}) returned {got!r}, a {type(got).__name__}"


def test_add_keyword_arguments(run):
    assert run("native.add", x=1, y=2) == 3
    assert run("native.add", 1, y=2) == 3


def test_add_float_result_keeps_full_precision(run):
    assert run("native.add", 0.1, 0.2) == 0.30000000000000004


ECHO_VALUES = [
    pytest.param([], id="nothing"),
    pytest.param([INT64_MAX, INT64_MIN, 0, -1], id="int64"),
    pytest.param([0.1, 1 / 3, 1e300, -2.5e-300, 5e-324, 1.0, -0.0, 123456789.125], id="floats"),
    pytest.param([True, False, None], id="true-false-null"),
    pytest.param(["", [], {}, [[]], {"": {}}], id="empty-containers"),
    pytest.param(["h\u00e9llo w\u00f6rld", "\u2603 \u65e5\u672c\u8a9e", "\U0001d11e \U0001f600", "\u00ff\u0100"],
                 id="unicode"),
    pytest.param(['quote " backslash \\ slash /', "\n\r\t\b\f", "\x01\x1f\x7f"], id="escapes"),
    pytest.param([{"a": [1, {"b": [None, True, {"c": [[[[["deep"]]]]]}]}], "z": {"y": {"x": {}}}}], id="nesting"),
    pytest.param([list(range(1000)), "x" * 100000], id="large"),
]


@pytest.mark.parametrize("args", ECHO_VALUES)
def test_echo_keeps_every_json_value(run, args):
    got = run("native.echo", *args)
    assert got == {"args": args, "kwargs": {}}
    # 1 == 1.0 and 0 == False in Python: compare the JSON types too.
    assert [type(v) for v in got["args"]] == [type(v) for v in args]
    for v, w in zip(got["args"], args):
        if isinstance(w, float):
            assert math.copysign(1, v) == math.copysign(1, w), f"sign of {w!r} lost"


def test_messages_over_a_mebibyte_reach_their_tasks_intact(app, shared_worker):
    """Messages of 1 MiB and more go to the pool child in a memfd rather than through the socket: several at
    once, mixed with small ones, each must reach its own task whole and in its order."""
    payloads = [chr(ord("a") + i) * (1_100_000 + 4099 * i) if i % 3 != 1 else f"small-{i}" for i in range(9)]
    results = [app.send_task("native.echo", args=[p, i]) for i, p in enumerate(payloads)]
    for i, (p, res) in enumerate(zip(payloads, results)):
        assert res.get(timeout=TIMEOUT) == {"args": [p, i], "kwargs": {}}
    assert app.send_task("native.add", args=[20, 22]).get(timeout=TIMEOUT) == 42


def test_big_messages_one_after_another_go_to_the_same_pool_process(app, workers):
    """A pool process keeps the decoding buffer of its last big message for the next one (its pages are
    already there), so big messages sent one after another go to the process that ran the previous one,
    whether a waiting process took it or the main process handed it over."""
    w = workers.start("-c", "2", "-l", "debug", "-Q", "big-in-turn")  # its own queue: this module's worker runs
    assert app.send_task("native.noop", queue="big-in-turn").get(timeout=TIMEOUT) is None
    ids = []
    for i in range(4):
        big = chr(ord("k") + i) * (1_200_000 + i)
        res = app.send_task("native.echo", args=[big], queue="big-in-turn")
        assert res.get(timeout=TIMEOUT) == {"args": [big], "kwargs": {}}
        ids.append(res.id)
    log = w.log()
    pids = []
    for tid in ids:
        m = re.search(r"native\.echo\[" + tid + r"\] (?:taken by|handed to) pool process (\d+)", log)
        assert m, f"no hand-over of {tid} in the debug log:\n{log[-3000:]}"
        pids.append(m.group(1))
    assert len(set(pids)) == 1, f"big messages went to pool processes {pids}"


def test_echo_kwargs_and_args_together(run):
    kwargs = {"name": "\u00e9t\u00e9", "n": INT64_MIN, "f": 2.5, "flag": False, "none": None, "list": [],
              "obj": {"k": [1, "2", 3.0]}}
    got = run("native.echo", 1, "two", **kwargs)
    assert got == {"args": [1, "two"], "kwargs": kwargs}
    assert type(got["kwargs"]["obj"]["k"][2]) is float


def test_echo_string_with_nul(run):
    assert run("native.echo", "a\x00b") == {"args": ["a\x00b"], "kwargs": {}}


@pytest.mark.parametrize("n, expected", [(0, 0), (1, 1), (2, 1), (10, 55), (20, 6765), (25, 75025)])
def test_fib(run, n, expected):
    assert run("native.fib", n) == expected


@pytest.mark.parametrize("ms", [0, 1, 50])
def test_sleep_ms_returns_its_argument(run, ms):
    assert run("native.sleep_ms", ms) == ms


@pytest.mark.parametrize("values, expected", [
    ([1, 2, 3], 6),
    ([], 0),
    ([1.5, 2], 3.5),
    ([INT64_MAX, 0], INT64_MAX),
    ([-1] * 1000, -1000),
])
def test_xsum(run, values, expected):
    got = run("native.xsum", values)
    assert got == expected and type(got) is type(expected)


def test_incr_counts_in_the_broker_database(run, broker, backend):
    assert run("native.incr", "it:counter") == 1
    assert run("native.incr", "it:counter") == 2
    assert broker.get("it:counter") == b"2"
    assert backend.get("it:counter") is None


# -- errors: the class name the client sees ---------------------------------------------------------------

@pytest.mark.parametrize("args, kwargs, words", [
    ([1], {}, "missing 1 required positional argument: 'y'"),
    ([], {}, "missing 2 required positional arguments: 'x' and 'y'"),
    ([1, 2, 3], {}, "takes 2 positional arguments but 3 were given"),
    ([1, 2], {"z": 3}, "got an unexpected keyword argument 'z'"),
    ([1], {"x": 2}, "got multiple values for argument 'x'"),
])
def test_wrong_argument_count_is_type_error(fails, run, args, kwargs, words):
    name, exc = fails("native.add", *args, **kwargs)
    assert name == "TypeError"
    assert words in str(exc)
    still_serving(run)


@pytest.mark.parametrize("task, args", [
    ("native.noop", [1]),
    ("native.fib", []),
    ("native.fib", [1, 2]),
    ("native.sleep_ms", []),
    ("native.fail", []),
    ("native.xsum", []),
    ("native.incr", []),
])
def test_wrong_argument_count_other_tasks(fails, task, args):
    name, _ = fails(task, *args)
    assert name == "TypeError"


@pytest.mark.parametrize("x, y", [("a", 1), (1, "b"), (None, 1), ([1], 2), ({"a": 1}, 1), ("1", "2")])
def test_add_non_number_is_type_error(fails, run, x, y):
    name, _ = fails("native.add", x, y)
    assert name == "TypeError"
    still_serving(run)


@pytest.mark.parametrize("x, y", [(INT64_MAX, 1), (INT64_MIN, -1), (INT64_MAX, INT64_MAX), (INT64_MIN, INT64_MIN)])
def test_add_int64_overflow_is_overflow_error(fails, run, x, y):
    name, _ = fails("native.add", x, y)
    assert name == "OverflowError"
    still_serving(run)


@pytest.mark.parametrize("n", [93, 100, -1])
def test_fib_out_of_range_is_value_error(fails, run, n):
    name, _ = fails("native.fib", n)
    assert name == "ValueError"
    still_serving(run)


@pytest.mark.parametrize("values", [["a"], [1, None], [[1]]])
def test_xsum_non_numbers_is_type_error(fails, values):
    name, _ = fails("native.xsum", values)
    assert name == "TypeError"


def test_fail_raises_value_error_with_the_message(app, backend, fails, run):
    name, exc = fails("native.fail", "boom \u00e9 1")
    assert name == "ValueError"
    assert exc.args == ("boom \u00e9 1",)
    assert str(exc) == "boom \u00e9 1"
    still_serving(run)


def test_failure_document_and_traceback(app, backend):
    res = app.send_task("native.fail", args=["boom 1"])
    exc_name_of(res)
    doc = result_doc(backend, res.id)
    assert doc["status"] == "FAILURE"
    assert doc["result"] == {"exc_type": "ValueError", "exc_message": ["boom 1"], "exc_module": "builtins"}
    assert isinstance(doc["traceback"], str) and doc["traceback"].startswith("Traceback (most recent call last):")
    assert "ValueError: boom 1" in doc["traceback"]
    assert res.state == "FAILURE"
    assert isinstance(res.traceback, str)


def test_unknown_task_is_not_registered_and_worker_keeps_serving(app, broker, backend, run):
    res = app.send_task("native.does_not_exist", args=[1])
    name, exc = exc_name_of(res)
    assert name == "NotRegistered"
    assert "native.does_not_exist" in str(exc)
    doc = result_doc(backend, res.id)
    assert doc["result"]["exc_type"] == "NotRegistered"
    assert doc["result"]["exc_module"] == "celery.exceptions"
    still_serving(run)
    # The message was consumed, not requeued and not left unacked.
    assert broker.llen("celery") == 0
    assert broker.hlen("unacked") == 0


# -- log lines --------------------------------------------------------------------------------------------

LOG_PREFIX = r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}: (INFO|WARNING|ERROR|DEBUG)/[\w-]+\] "


def test_success_is_logged_in_celerys_shape(app, shared_worker):
    res = app.send_task("native.add", args=[1, 2])
    assert res.get(timeout=TIMEOUT) == 3
    rx = re.compile(r"^" + LOG_PREFIX.replace("(INFO|WARNING|ERROR|DEBUG)", "INFO") +
                    r"Task native\.add\[" + re.escape(res.id) + r"\] succeeded in [0-9.e+-]+s: 3$", re.M)
    shared_worker.wait_log(rx, TIMEOUT)


def test_failure_is_logged_in_celerys_shape(app, shared_worker):
    res = app.send_task("native.fail", args=["boom 2"])
    exc_name_of(res)
    rx = re.compile(r"^" + LOG_PREFIX.replace("(INFO|WARNING|ERROR|DEBUG)", "ERROR") +
                    r"Task native\.fail\[" + re.escape(res.id) + r"\] raised unexpected: ", re.M)
    shared_worker.wait_log(rx, TIMEOUT)
    # Celery 5.2.6 on Python 3.11 prints "ExceptionWithTraceback()" there; the traceback that follows names
    # the exception. Either way the type and the message must be in the log.
    shared_worker.wait_log(re.compile(r"ValueError.*boom 2"), TIMEOUT)

