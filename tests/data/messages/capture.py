#!/usr/bin/python3
"""Regenerates the message decoder's test data: tests/data/messages/<case>/{message.json,expected.json}.

Good cases are real messages published by the stock Celery client (Debian's celery 5.2.6) into a private
redis-server and read back raw with LRANGE, so message.json holds the exact bytes a worker pops.
bad-* cases are derived from those captures by hand-made damage (see BAD below).

expected.json is written from what this script asked Celery to send (task name, id, limits...) and, for
values Celery makes up (eta, origin, delivery_tag...), from Python's own json/base64 reading of the capture:
an oracle independent of the C decoder. Keys the C test knows:
  status      "MSG_OK" or the name of an enum msg_status value
  fields      every string field of struct msg_request (null = absent) plus the numeric ones; checked in
              full for MSG_OK, and only the keys present for errors
  body        the body text after the body encoding is undone (MSG_OK only)
  error_has   a substring the error line must contain (errors only)

Usage: /usr/bin/python3 tests/data/messages/capture.py   (from anywhere; needs redis-server on PATH)
"""
import base64
import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import redis
from celery import Celery, chain, chord, group, signature

HERE = os.path.dirname(os.path.abspath(__file__))
STR_FIELDS = ["task", "id", "shadow", "root_id", "parent_id", "group", "eta", "expires", "origin",
              "argsrepr", "kwargsrepr", "content_type", "content_encoding", "body_encoding",
              "correlation_id", "reply_to", "delivery_tag", "exchange", "routing_key"]
ID = "c0ffee00-0000-4000-8000-%012d"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis():
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL)
    r = redis.Redis(port=port, db=0)
    for _ in range(100):
        try:
            r.ping()
            return proc, port, r
        except redis.ConnectionError:
            time.sleep(0.05)
    proc.kill()
    sys.exit("redis-server did not start")


def app_for(port, **conf):
    app = Celery("capture", broker="redis://127.0.0.1:%d/0" % port, backend="redis://127.0.0.1:%d/1" % port)
    app.conf.update(**conf)
    return app


def drain(r):
    """Every message now queued in db 0, priority sub-lists included, oldest first; empties them."""
    out = []
    for key in sorted(r.keys("*")):
        if r.type(key) != b"list":
            continue
        out.extend(reversed(r.lrange(key, 0, -1)))  # LPUSH puts the newest at the head
        r.delete(key)
    return out


def expect_from(raw, **override):
    """What a correct decoder yields for raw, read with Python's json (the oracle), then overridden."""
    m = json.loads(raw)
    h = m.get("headers") or {}
    p = m.get("properties") or {}
    di = p.get("delivery_info") or {}
    body = m["body"]
    if p.get("body_encoding") == "base64":
        body = base64.b64decode(body, validate=True)
    else:
        body = body.encode()
    f = {k: None for k in STR_FIELDS}
    f.update(content_type=m.get("content-type"), content_encoding=m.get("content-encoding"),
             body_encoding=p.get("body_encoding"), correlation_id=p.get("correlation_id"),
             reply_to=p.get("reply_to"), delivery_tag=p.get("delivery_tag"),
             exchange=di.get("exchange"), routing_key=di.get("routing_key"), priority=p.get("priority") or 0,
             redelivered=bool(h.get("redelivered") or di.get("redelivered")))
    if "task" in h:
        src, proto = h, 2
        f["ignore_result"] = bool(h.get("ignore_result"))
    else:
        src, proto = json.loads(body), 1
        f["ignore_result"] = False
    for k in ["task", "id", "shadow", "root_id", "parent_id", "group", "eta", "expires", "origin",
              "argsrepr", "kwargsrepr"]:
        if k in src:
            f[k] = src[k]
    if proto == 1 and "taskset" in src:
        f["group"] = src["taskset"]
    if f["id"] is None:
        f["id"] = p.get("correlation_id")
    tl = src.get("timelimit") or [None, None]
    f.update(protocol=proto, retries=src.get("retries") or 0, group_index=src.get("group_index"),
             time_limit=tl[0], soft_time_limit=tl[1])
    f.update(override)
    return {"status": "MSG_OK", "fields": f, "body": body.decode("utf-8")}


def save(case, raw, expected):
    d = os.path.join(HERE, case)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "message.json"), "wb") as fp:
        fp.write(raw)
    with open(os.path.join(d, "expected.json"), "w") as fp:
        json.dump(expected, fp, indent=1, ensure_ascii=False)
        fp.write("\n")


def main():
    for name in os.listdir(HERE):
        if os.path.isfile(os.path.join(HERE, name, "message.json")):
            shutil.rmtree(os.path.join(HERE, name))
    proc, port, r = start_redis()
    try:
        captured = capture(port, r)
    finally:
        proc.terminate()
        proc.wait()
    make_bad(captured)
    print("wrote %d cases into %s" % (len(os.listdir(HERE)) - 1, HERE))


def capture(port, r):
    app = app_for(port)
    add, mul, tsum = (lambda *a, **k: signature(n, args=a, kwargs=k, app=app) for n in
                      ("tasks.add", "tasks.mul", "tasks.xsum"))
    got = {}

    def one(case, send, expect=None, **override):
        send()
        msgs = drain(r)
        for i, raw in enumerate(msgs):
            name = case if len(msgs) == 1 else "%s-%d" % (case, i)
            got[name] = raw
            save(name, raw, expect or expect_from(raw, **override))
        return msgs

    st = app.send_task
    one("plain-args", lambda: st("tasks.add", (2, 3), task_id=ID % 1), task="tasks.add", id=ID % 1,
        argsrepr="(2, 3)", kwargsrepr="{}", protocol=2)
    one("noop-no-args", lambda: st("native.noop", task_id=ID % 2), task="native.noop", argsrepr="()")
    one("kwargs", lambda: st("native.echo", kwargs={"x": 1, "y": "two", "z": None}, task_id=ID % 3),
        kwargsrepr="{'x': 1, 'y': 'two', 'z': None}")
    uni = ["héllo wörld", "日本語", "😀 emoji 𝄞", 'quote " backslash \\ tab \t nl \n', "\x01\x1f", "/"]
    one("unicode", lambda: st("native.echo", (uni,), task_id=ID % 4))
    one("nested", lambda: st("native.echo", ([{"a": [1, [2, [3, {"b": None, "c": True}]]]}, [], {}],),
                             task_id=ID % 5))
    one("int64", lambda: st("native.add", (2**63 - 1, -2**63), kwargs={"big": 2**64}, task_id=ID % 6))
    one("floats", lambda: st("native.echo", (0.1, -1.5e-300, 1e308, 3.0, -0.0, 5e-324), task_id=ID % 7))
    one("countdown", lambda: st("tasks.add", (1, 1), countdown=60, task_id=ID % 8))
    eta = datetime.datetime(2030, 1, 2, 3, 4, 5, 600000, tzinfo=datetime.timezone.utc)
    one("eta", lambda: st("tasks.add", (1, 1), eta=eta, task_id=ID % 9), eta="2030-01-02T03:04:05.600000+00:00")
    one("expires-seconds", lambda: st("tasks.add", (1, 1), expires=60, task_id=ID % 10))
    one("expires-datetime", lambda: st("tasks.add", (1, 1), expires=eta, task_id=ID % 11),
        expires="2030-01-02T03:04:05.600000+00:00")
    one("priority-5", lambda: st("tasks.add", (1, 1), priority=5, task_id=ID % 12), priority=5)
    one("priority-9", lambda: st("tasks.add", (1, 1), priority=9, task_id=ID % 13), priority=9)
    one("time-limits", lambda: st("tasks.add", (1, 1), time_limit=10, soft_time_limit=5, task_id=ID % 14),
        time_limit=10, soft_time_limit=5)
    one("soft-time-limit-float", lambda: st("tasks.add", (1, 1), soft_time_limit=2.5, task_id=ID % 15),
        time_limit=None, soft_time_limit=2.5)
    one("chain", lambda: (add(1, 2) | mul(3) | add(4)).apply_async(task_id=ID % 16))
    one("group", lambda: group(add(1, 1), add(2, 2)).apply_async())
    one("chord-header", lambda: chord([add(1, 1), add(2, 2)], tsum()).apply_async())
    one("link", lambda: st("tasks.add", (1, 2), link=mul(10), link_error=signature("tasks.on_error", app=app),
                           task_id=ID % 17))
    one("ignore-result", lambda: st("tasks.add", (1, 2), ignore_result=True, task_id=ID % 18),
        ignore_result=True)
    one("custom-headers", lambda: st("tasks.add", (1, 2), headers={"custom_hdr": "x", "n": [1, {"d": 2}]},
                                     task_id=ID % 19))
    one("shadow", lambda: st("tasks.add", (1, 2), shadow="custom.name", task_id=ID % 20), shadow="custom.name")
    one("queue-native", lambda: st("native.noop", queue="native", task_id=ID % 21), routing_key="native")
    one("retries-parent", lambda: st("tasks.add", (1, 2), retries=3, root_id=ID % 90, parent_id=ID % 91,
                                     task_id=ID % 22), retries=3, root_id=ID % 90, parent_id=ID % 91)
    big = "x" * 20000
    one("large-args", lambda: st("native.echo", (big,), task_id=ID % 23))

    v1 = app_for(port, task_protocol=1)
    v1st = v1.send_task
    one("protocol1", lambda: v1st("tasks.add", (2, 3), kwargs={"k": "ü"}, task_id=ID % 30), protocol=1,
        task="tasks.add", id=ID % 30)
    one("protocol1-options", lambda: v1st("tasks.add", (2, 3), countdown=30, expires=60, time_limit=7.5,
                                          soft_time_limit=3, retries=2, group_id=ID % 92, task_id=ID % 31),
        protocol=1, group=ID % 92, retries=2, time_limit=7.5, soft_time_limit=3)

    pk = app_for(port, task_serializer="pickle")
    one("pickle", lambda: pk.send_task("tasks.add", (2, 3), task_id=ID % 40),
        {"status": "MSG_ERR_CONTENT_TYPE", "fields": {"task": "tasks.add", "id": ID % 40, "protocol": 2},
         "error_has": "refusing content type 'application/x-python-serialize'"})
    ym = app_for(port, task_serializer="yaml")
    one("yaml", lambda: ym.send_task("tasks.add", (2, 3), task_id=ID % 41),
        {"status": "MSG_ERR_CONTENT_TYPE", "fields": {"task": "tasks.add", "id": ID % 41},
         "error_has": "'application/x-yaml'"})
    pk1 = app_for(port, task_serializer="pickle", task_protocol=1)
    one("pickle-protocol1", lambda: pk1.send_task("tasks.add", (2, 3), task_id=ID % 42),
        {"status": "MSG_ERR_CONTENT_TYPE", "fields": {"id": ID % 42, "task": None},
         "error_has": "only application/json is accepted"})
    return got


def make_bad(got):
    """Hand-made damage, each starting from a real capture. Python-level edits keep Python's formatting."""
    plain = got["plain-args"]
    m = json.loads(plain)
    pid = m["headers"]["id"]

    def edited(fn):
        c = json.loads(plain)
        fn(c)
        return json.dumps(c).encode()

    def bad(case, raw, status, error_has, **fields):
        save("bad-" + case, raw, {"status": status, "fields": fields, "error_has": error_has})

    def hdr(**kv):
        return lambda c: c["headers"].update(kv)

    bad("invalid-json", plain.replace(b'"headers": {', b'"headers" {', 1), "MSG_ERR_JSON", "expected ':'")
    bad("truncated", plain[: len(plain) // 2], "MSG_ERR_JSON", "end of input")
    bad("empty", b"", "MSG_ERR_JSON", "end of input")
    bad("trailing-garbage", plain + b" x", "MSG_ERR_JSON", "after the JSON value")
    bad("not-object", b"[" + plain + b"]", "MSG_ERR_JSON", "not a JSON object")
    bad("body-not-base64", edited(lambda c: c.update(body="!!not base64!!")), "MSG_ERR_BODY_ENCODING",
        "base64", id=pid, task="tasks.add")
    bad("body-bad-padding", edited(lambda c: c.update(body=c["body"][:-1])), "MSG_ERR_BODY_ENCODING",
        "base64", id=pid)
    bad("unknown-body-encoding", edited(lambda c: c["properties"].update(body_encoding="gzip")),
        "MSG_ERR_BODY_ENCODING", "'gzip'", id=pid)
    bad("missing-headers", edited(lambda c: c.pop("headers")), "MSG_ERR_UNKNOWN", "task", id=pid)
    bad("missing-body", edited(lambda c: c.pop("body")), "MSG_ERR_ENVELOPE", "'body'", id=pid)
    bad("body-not-string", edited(lambda c: c.update(body=[1])), "MSG_ERR_ENVELOPE", "'body'", id=pid)
    bad("v1-without-task", edited(lambda c: (c.update(headers={}, body=base64.b64encode(
        json.dumps({"id": pid, "args": []}).encode()).decode()))), "MSG_ERR_UNKNOWN", "task", id=pid)
    bad("v1-body-not-json", edited(lambda c: (c.update(headers={}, body=base64.b64encode(b"{nope").decode()))),
        "MSG_ERR_JSON", "body", id=pid)
    bad("msgpack", edited(lambda c: c.update({"content-type": "application/x-msgpack"})),
        "MSG_ERR_CONTENT_TYPE", "refusing content type 'application/x-msgpack'", id=pid, task="tasks.add")
    bad("retries-string", edited(hdr(retries="3")), "MSG_ERR_ENVELOPE",
        "header 'retries' must be an integer", id=pid, task="tasks.add")
    bad("retries-float", edited(hdr(retries=1.5)), "MSG_ERR_ENVELOPE", "header 'retries' must be an integer",
        id=pid)
    bad("retries-overflow", plain.replace(b'"retries": 0', b'"retries": 99999999999999999999'),
        "MSG_ERR_ENVELOPE", "header 'retries'", id=pid)
    bad("task-not-string", edited(hdr(task=42)), "MSG_ERR_ENVELOPE", "header 'task' must be a string", id=pid)
    bad("task-null", edited(hdr(task=None)), "MSG_ERR_ENVELOPE", "header 'task' must be a string", id=pid)
    bad("timelimit-string", edited(hdr(timelimit="10")), "MSG_ERR_ENVELOPE", "header 'timelimit'", id=pid)
    bad("timelimit-three", edited(hdr(timelimit=[1, 2, 3])), "MSG_ERR_ENVELOPE", "header 'timelimit'", id=pid)
    bad("timelimit-bool", edited(hdr(timelimit=[True, None])), "MSG_ERR_ENVELOPE", "header 'timelimit'", id=pid)
    bad("ignore-result-string", edited(hdr(ignore_result="yes")), "MSG_ERR_ENVELOPE",
        "header 'ignore_result' must be a boolean", id=pid)
    bad("headers-array", edited(lambda c: c.update(headers=[1])), "MSG_ERR_ENVELOPE", "'headers'",
        correlation_id=pid)
    bad("priority-string", edited(lambda c: c["properties"].update(priority="5")), "MSG_ERR_ENVELOPE",
        "property 'priority' must be an integer", id=pid)
    bad("delivery-tag-int", edited(lambda c: c["properties"].update(delivery_tag=7)), "MSG_ERR_ENVELOPE",
        "property 'delivery_tag' must be a string", id=pid)
    # The id must survive an error that comes before it in the bytes, from the fallback too.
    bad("id-only-in-properties", edited(lambda c: (c["headers"].pop("id"), c["headers"].update(retries="x"))),
        "MSG_ERR_ENVELOPE", "header 'retries'", id=pid)
    deep = b"[" * 100 + b"]" * 100
    bad("deep-nesting", plain.replace(b'"lang": "py"', b'"lang": ' + deep), "MSG_ERR_JSON", "deep")
    bad("invalid-utf8", plain.replace(b'"lang": "py"', b'"lang": "p\xffy"'), "MSG_ERR_JSON", "UTF-8")
    bad("overlong-utf8", plain.replace(b'"lang": "py"', b'"lang": "\xc0\xafy"'), "MSG_ERR_JSON", "UTF-8")
    bad("utf8-surrogate", plain.replace(b'"lang": "py"', b'"lang": "\xed\xa0\x80"'), "MSG_ERR_JSON", "UTF-8")
    bad("lone-surrogate", plain.replace(b'"lang": "py"', b'"lang": "\\ud800x"'), "MSG_ERR_JSON", "surrogate")
    bad("bad-escape", plain.replace(b'"lang": "py"', b'"lang": "\\x41"'), "MSG_ERR_JSON", "escape")
    bad("control-char", plain.replace(b'"lang": "py"', b'"lang": "p\ny"'), "MSG_ERR_JSON", "control")
    bad("leading-zero", plain.replace(b'"retries": 0', b'"retries": 01'), "MSG_ERR_JSON", "")
    bad("bare-word", plain.replace(b'"shadow": null', b'"shadow": nul'), "MSG_ERR_JSON", "")
    bad("nul-in-task", plain.replace(b'"task": "tasks.add"', b'"task": "tasks.add\\u0000x"'),
        "MSG_ERR_ENVELOPE", "NUL", id=pid)
    bad("trailing-comma", plain.replace(b'"ignore_result": false}', b'"ignore_result": false,}'),
        "MSG_ERR_JSON", "")

    # Not bad: variations a worker must accept.
    def good(case, raw, **override):
        save(case, raw, expect_from(raw, **override))

    good("redelivered", edited(lambda c: (c["headers"].update(redelivered=True),
                                          c["properties"]["delivery_info"].update(redelivered=True))),
         redelivered=True)
    good("no-body-encoding", edited(lambda c: (c["properties"].pop("body_encoding"),
                                               c.update(body=base64.b64decode(c["body"]).decode()))))
    good("no-content-type", edited(lambda c: c.pop("content-type")), content_type=None)
    good("compact-whitespace", json.dumps(json.loads(plain), separators=(",", ":")).encode())
    good("hybrid-body", edited(lambda c: c.update(body=base64.b64encode(
        json.dumps({"args": [2, 3], "kwargs": {}}).encode()).decode())))
    good("escaped-keys", plain.replace(b'"task": "tasks.add"', b'"t\\u0061sk": "tasks\\u002eadd"')
         .replace(b'"lang": "py"', b'"lang": "\\ud83d\\ude00\\u00e9\\u20ac\\/\\b\\f\\n\\r\\t\\"\\\\"'))


if __name__ == "__main__":
    main()
