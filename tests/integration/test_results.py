"""Results as stock Celery stores them (protocol doc section 5), and the options and URLs that place them."""

import datetime
import json
import socket
import time
import uuid

import pytest

from conftest import make_client, close_client
from servers import RedisServer
from util import TIMEOUT, exc_name_of, result_doc, result_key, wait_until

DOC_FIELDS = {"status", "result", "traceback", "children", "date_done", "task_id"}


def _utc_now():
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


def test_success_document(app, worker, backend):
    res = app.send_task("native.add", args=[1, 2])
    assert res.get(timeout=TIMEOUT) == 3
    doc = result_doc(backend, res.id)
    assert set(doc) == DOC_FIELDS
    assert doc["status"] == "SUCCESS"
    assert doc["result"] == 3
    assert doc["traceback"] is None
    assert doc["children"] == []
    assert doc["task_id"] == res.id
    done = datetime.datetime.fromisoformat(doc["date_done"])
    assert done.tzinfo is None, "date_done is naive UTC, without an offset"
    assert abs((done - _utc_now()).total_seconds()) < 300, f"date_done {doc['date_done']} is not UTC now"
    assert res.date_done is not None


def test_result_is_published_on_the_key_channel(app, worker, backend):
    """AsyncResult.get() waits on SUBSCRIBE celery-task-meta-<id>: the stored document must be PUBLISHed."""
    task_id = str(uuid.uuid4())
    sub = backend.pubsub()
    sub.subscribe(result_key(task_id))
    try:
        wait_until(lambda: sub.get_message(timeout=0.1), what="subscribe confirmation")
        app.send_task("native.echo", args=["published"], task_id=task_id)
        msg = wait_until(lambda: sub.get_message(timeout=0.1), what="the PUBLISH of the result")
        assert msg["type"] == "message"
        published = json.loads(msg["data"])
        assert published["status"] == "SUCCESS"
        assert published["result"] == {"args": ["published"], "kwargs": {}}
        assert published == result_doc(backend, task_id)
    finally:
        sub.close()


def test_ignore_result_writes_and_publishes_nothing(app, workers, broker, backend):
    workers.start("-c", "1")
    ignored_id = str(uuid.uuid4())
    sub = backend.pubsub()
    sub.subscribe(result_key(ignored_id))
    try:
        wait_until(lambda: sub.get_message(timeout=0.1), what="subscribe confirmation")
        ignored = app.tasks["native.incr"].apply_async(("ir",), task_id=ignored_id, ignore_result=True)
        ignored2 = app.send_task("native.add", args=[1, 1], ignore_result=True)
        wait_until(lambda: broker.get("ir") == b"1", what="the ignored task to run")
        # -c 1 runs in order: once this is stored, the ignored tasks are long finished.
        assert app.send_task("native.noop").get(timeout=TIMEOUT) is None
        for tid in (ignored.id, ignored2.id):
            assert not backend.exists(result_key(tid))
            assert not broker.exists(result_key(tid))
        assert sub.get_message(timeout=0.2) is None, "a result was published for an ignore_result task"
        assert ignored.state == "PENDING"
    finally:
        sub.close()


def test_ignore_result_still_stores_a_failure(app, workers, backend):
    """What the stock worker does: request-level ignore_result skips only the SUCCESS store
    (celery/backends/base.py mark_as_done checks request.ignore_result; mark_as_failure does not, and
    celery/app/trace.py handle_error_state looks at the task class's ignore_result only), so the client's
    failure is there for anyone who looks it up (the AsyncResult send_task returned has .ignored set, so its
    own .get() returns None at once; a fresh one waits for the stored state)."""
    workers.start("-c", "1")
    sent = app.send_task("native.fail", args=["ignored but failed"], ignore_result=True)
    name, _ = exc_name_of(app.AsyncResult(sent.id))
    assert name == "ValueError"
    assert result_doc(backend, sent.id)["status"] == "FAILURE"


@pytest.mark.parametrize("flags, low, high", [
    ((), 86400 - 120, 86400),
    (("--result-expires", "120"), 60, 120),
    (("--result-expires", "0"), -1, -1),
], ids=["default-1-day", "120s", "0-never"])
def test_result_expires(app, workers, backend, flags, low, high):
    workers.start("-c", "1", *flags)
    ok = app.send_task("native.noop")
    bad = app.send_task("native.fail", args=["x"])
    ok.get(timeout=TIMEOUT)
    with pytest.raises(Exception):
        bad.get(timeout=TIMEOUT)
    for res in (ok, bad):
        ttl = backend.ttl(result_key(res.id))
        assert low <= ttl <= high, f"TTL {ttl} of {res.id} not in [{low}, {high}]"


def test_track_started(app, workers, backend):
    workers.start("-c", "1", "--track-started", "-n", "it-node@testhost")
    res = app.send_task("native.sleep_ms", args=[1000])
    doc = wait_until(lambda: (d := result_doc(backend, res.id)) and d["status"] == "STARTED" and d,
                     what="the STARTED document")
    assert set(doc) == DOC_FIELDS
    assert doc["result"]["hostname"] == "it-node@testhost"
    assert isinstance(doc["result"]["pid"], int) and doc["result"]["pid"] > 0
    assert doc["date_done"] is None and doc["traceback"] is None and doc["task_id"] == res.id
    assert res.state in ("STARTED", "SUCCESS")
    assert res.get(timeout=TIMEOUT) == 1000
    assert result_doc(backend, res.id)["status"] == "SUCCESS"


def test_no_started_state_without_track_started(app, workers, backend):
    workers.start("-c", "1")
    res = app.send_task("native.sleep_ms", args=[600])
    seen = set()
    while "SUCCESS" not in seen:
        doc = result_doc(backend, res.id)
        seen.add(doc and doc["status"])
        time.sleep(0.005)
    assert seen <= {None, "SUCCESS"}
    assert res.get(timeout=TIMEOUT) == 600


# -- where results and messages live -----------------------------------------------------------------------

def test_results_in_another_backend_database(client_factory, workers, redis_server):
    workers.start("-c", "1", backend_url=redis_server.url(5))
    app5 = client_factory(backend_db=5)
    res = app5.send_task("native.add", args=[2, 2])
    assert res.get(timeout=TIMEOUT) == 4
    assert redis_server.client(5).exists(result_key(res.id))
    assert redis_server.client(1).dbsize() == 0
    assert not redis_server.client(0).exists(result_key(res.id))


def test_broker_in_another_database(client_factory, workers, redis_server):
    workers.start("-c", "1", broker_url=redis_server.url(3))
    app3 = client_factory(broker_db=3)
    res = app3.send_task("native.incr", args=["db3"])
    assert res.get(timeout=TIMEOUT) == 1
    assert redis_server.client(3).get("db3") == b"1"
    assert redis_server.client(0).get("db3") is None


def test_urls_from_the_environment(client_factory, workers, redis_server):
    workers.start("-c", "1", broker_url=False, backend_url=False,
                  env={"CELERY_BROKER_URL": redis_server.url(2), "CELERY_RESULT_BACKEND": redis_server.url(4)})
    res = client_factory(broker_db=2, backend_db=4).send_task("native.add", args=[5, 5])
    assert res.get(timeout=TIMEOUT) == 10
    assert redis_server.client(4).exists(result_key(res.id))


@pytest.mark.celeriac_only("flag spelling differs: the stock worker takes -b before `worker`")
def test_flags_win_over_the_environment(client_factory, workers, redis_server):
    workers.start("-c", "1", broker_url=redis_server.url(2), backend_url=redis_server.url(4),
                  env={"CELERY_BROKER_URL": redis_server.url(7), "CELERY_RESULT_BACKEND": redis_server.url(8)})
    app7 = client_factory(broker_db=7, backend_db=8)
    stray = app7.send_task("native.incr", args=["stray"])
    res = client_factory(broker_db=2, backend_db=4).send_task("native.add", args=[6, 6])
    assert res.get(timeout=TIMEOUT) == 12
    assert redis_server.client(4).exists(result_key(res.id))
    assert redis_server.client(7).llen("celery") == 1 and stray.state == "PENDING"
    assert redis_server.client(8).dbsize() == 0


def test_broker_over_a_unix_socket(client_factory, workers, redis_server):
    workers.start("-c", "1", broker_url=redis_server.socket_url(6))
    app6 = client_factory(broker_db=6)
    res = app6.send_task("native.add", args=[3, 4])
    assert res.get(timeout=TIMEOUT) == 7
    assert redis_server.client(6).llen("celery") == 0  # consumed from database 6, through the socket


@pytest.mark.celeriac_only("the stock Redis result backend spells socket URLs differently (socket://)")
def test_result_backend_over_a_unix_socket(client_factory, workers, redis_server):
    workers.start("-c", "1", backend_url=redis_server.socket_url(7))
    res = client_factory(backend_db=7).send_task("native.add", args=[3, 5])
    assert res.get(timeout=TIMEOUT) == 8
    assert redis_server.client(7).exists(result_key(res.id))


# -- passwords -----------------------------------------------------------------------------------------

PASSWORD = "s3cr3t-Pw0rd-xyzzy"


@pytest.fixture
def secured_redis():
    rs = RedisServer(password=PASSWORD)
    rs.start()
    yield rs
    rs.cleanup()


@pytest.mark.parametrize("userinfo", [f":{PASSWORD}", f"default:{PASSWORD}"], ids=["password", "user-password"])
def test_password_works_and_never_appears_in_the_log(workers, secured_redis, userinfo):
    port = secured_redis.port
    w = workers.start("-c", "1", "-l", "debug", broker_url=f"redis://{userinfo}@127.0.0.1:{port}/0",
                      backend_url=f"redis://{userinfo}@127.0.0.1:{port}/1")
    client = make_client(secured_redis.url(0), secured_redis.url(1))
    try:
        assert client.send_task("native.add", args=[1, 1]).get(timeout=TIMEOUT) == 2
        with pytest.raises(ValueError):  # a failure too, so error paths log as well
            client.send_task("native.fail", args=["x"]).get(timeout=TIMEOUT)
    finally:
        close_client(client)
    workers.stop(w)
    log = w.log()
    assert PASSWORD not in log
    assert log.strip(), "the worker logged nothing at debug level"


@pytest.mark.celeriac_only("connection-failure behaviour of celeriac")
def test_password_not_logged_when_the_connection_fails(workers, secured_redis):
    # Right server, wrong password: authentication fails; the log must not show either password.
    wrong = "wr0ng-" + PASSWORD
    url = f"redis://:{wrong}@127.0.0.1:{secured_redis.port}/0"
    w = workers.start("-c", "1", "-l", "debug", broker_url=url, backend_url=url.replace("/0", "/1"), ready=False)
    try:
        w.wait_log(r"(?i)error|fail|denied|auth|invalid", TIMEOUT)
    except RuntimeError:
        pass  # it exited: fine, as long as it said why without the password
    workers.stop(w)
    workers.expect_clean_exit = False
    log = w.log()
    assert wrong not in log and PASSWORD not in log
    assert log.strip(), "nothing logged about the failed connection"


# -- node name and options ---------------------------------------------------------------------------------

@pytest.mark.celeriac_only("the stock worker's default name is celery@<host>")
def test_default_node_name(workers):
    w = workers.start("-c", "1")
    assert f"celeriac@{socket.gethostname()} ready." in w.log()


@pytest.mark.parametrize("flags", [
    ("-c", "1", "-E"),
    ("--concurrency", "2", "--queues", "celery,other", "--hostname", "long@forms", "--loglevel", "DEBUG"),
    ("-c", "1", "-l", "INFO", "-n", "x@y", "--prefetch-multiplier", "10"),
], ids=["events", "long-forms", "mixed"])
def test_option_forms_run(app, workers, flags):
    workers.start(*flags)
    assert app.send_task("native.add", args=[2, 3]).get(timeout=TIMEOUT) == 5


@pytest.mark.parametrize("level", ["warning", "error"])
def test_quiet_log_levels(app, workers, level):
    w = workers.start("-c", "1", "-l", level, ready=False)
    res = app.send_task("native.add", args=[2, 3])
    assert res.get(timeout=TIMEOUT) == 5
    log = w.log()
    assert res.id not in log, f"-l {level} still logs the INFO line of a successful task"
    assert " ready." not in log
