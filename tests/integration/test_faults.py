"""Redis access with an ACL user and password (Redis 6+): the broker, the backend and the tasks' own
connection (native.incr) all authenticate as that user."""

import pytest

from conftest import close_client, make_client
from servers import Celeriac
from util import TIMEOUT

pytestmark = pytest.mark.celeriac_only("the ACL user is set up for celeriac's connections")


def test_acl_user_and_password(workers, redis_server):
    admin = redis_server.client(0)
    admin.execute_command("ACL", "SETUSER", "celeriac-user", "on", ">s3cr3t-pw", "~*", "&*", "+@all")
    try:
        port = redis_server.port
        broker = f"redis://celeriac-user:s3cr3t-pw@127.0.0.1:{port}/0"
        backend = f"redis://celeriac-user:s3cr3t-pw@127.0.0.1:{port}/1"
        w = workers.start("-c", "1", broker_url=broker, backend_url=backend)
        app = make_client(broker, backend)
        try:
            assert app.send_task("native.add", args=[20, 22]).get(timeout=TIMEOUT) == 42
            assert app.send_task("native.incr", args=["acl-counter"]).get(timeout=TIMEOUT) == 1
        finally:
            close_client(app)
        assert "s3cr3t-pw" not in w.log()
        assert admin.get("acl-counter") == b"1"
    finally:
        admin.execute_command("ACL", "DELUSER", "celeriac-user")


def test_wrong_password_is_a_clear_error(workers, redis_server):
    admin = redis_server.client(0)
    admin.execute_command("ACL", "SETUSER", "celeriac-user2", "on", ">right-pw", "~*", "&*", "+@all")
    try:
        url = f"redis://celeriac-user2:wrong-pw@127.0.0.1:{redis_server.port}/0"
        w = Celeriac(["-c", "1"], broker_url=url, backend_url=url)
        w.start()
        try:
            rc = w.proc.wait(timeout=TIMEOUT)
            log = w.log()
        finally:
            w.cleanup()
        assert rc == 1
        assert "authentication" in log and "wrong-pw" not in log
    finally:
        admin.execute_command("ACL", "DELUSER", "celeriac-user2")
