"""Helpers for the integration tests: waiting, kombu's Redis key layout, raw task messages, result documents.

Facts about the wire format come from shared/docs/celery-protocol.md (sections 1-3 and 5)."""

import base64
import json
import os
import time
import uuid

# Seconds any single wait may take before a test gives up. Generous: the test build runs under ASan+UBSan.
TIMEOUT = float(os.environ.get("CELERIAC_IT_TIMEOUT", "30"))

SEP = b"\x06\x16"  # kombu's key separator
PRIORITY_STEPS = (0, 3, 6, 9)


def wait_until(pred, timeout=TIMEOUT, what="condition", interval=0.01):
    """Polls pred() until it returns something truthy, and returns that; AssertionError after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last value: {value!r})")
        time.sleep(interval)


# -- kombu's Redis transport ------------------------------------------------------------------------------

def priority_keys(queue):
    """The four lists of a queue in BRPOP order: Q, Q SEP 3, Q SEP 6, Q SEP 9 (section 3.1)."""
    q = queue.encode() if isinstance(queue, str) else queue
    return [q] + [q + SEP + str(p).encode() for p in PRIORITY_STEPS[1:]]


def priority_bucket(priority):
    """The step a priority is rounded down to when published (clamped to 0..9)."""
    p = max(0, min(9, priority))
    return max(s for s in PRIORITY_STEPS if s <= p)


def queue_len(r, queue="celery"):
    """Messages waiting in all priority lists of queue (one MULTI, so it is a consistent snapshot)."""
    pipe = r.pipeline(transaction=True)
    for k in priority_keys(queue):
        pipe.llen(k)
    return sum(pipe.execute())


def queue_messages(r, queue="celery"):
    """Every message waiting in queue, decoded, in the order they would be popped."""
    out = []
    for k in priority_keys(queue):
        out += [json.loads(m) for m in reversed(r.lrange(k, 0, -1))]
    return out


def broker_snapshot(r, queue="celery"):
    """(messages waiting in queue, unacked records) read atomically in one MULTI."""
    pipe = r.pipeline(transaction=True)
    for k in priority_keys(queue):
        pipe.llen(k)
    pipe.hlen("unacked")
    res = pipe.execute()
    return sum(res[:-1]), res[-1]


def unacked(r):
    """{delivery_tag: [message, exchange, routing_key]} from the `unacked` hash."""
    return {k.decode(): json.loads(v) for k, v in r.hgetall("unacked").items()}


def unacked_index(r):
    """{delivery_tag: score} from the `unacked_index` sorted set."""
    return {k.decode(): s for k, s in r.zrange("unacked_index", 0, -1, withscores=True)}


def wait_unacked_older_than(r, seconds, timeout=TIMEOUT):
    """Waits until every record in unacked_index is more than `seconds` old (so that a restorer whose
    visibility_timeout is `seconds` will take them all)."""
    def old_enough():
        scores = unacked_index(r).values()
        return bool(scores) and time.time() - max(scores) > seconds + 0.5
    wait_until(old_enough, timeout, f"unacked records older than {seconds}s")


# -- raw messages -------------------------------------------------------------------------------------------

EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def task_envelope(task, task_id=None, args=(), kwargs=None, queue="celery", priority=0,
                  content_type="application/json", content_encoding="utf-8", body=None, body_encoding="base64"):
    """A protocol-v2 task message shaped exactly like the stock client's (section 1.1), as a dict.
    body: raw serialized body bytes (default: the JSON [args, kwargs, embed])."""
    task_id = task_id or str(uuid.uuid4())
    kwargs = kwargs or {}
    if body is None:
        body = json.dumps([list(args), kwargs, EMBED]).encode()
    headers = {
        "lang": "py", "task": task, "id": task_id, "shadow": None, "eta": None, "expires": None,
        "group": None, "group_index": None, "retries": 0, "timelimit": [None, None], "root_id": task_id,
        "parent_id": None, "argsrepr": repr(tuple(args)), "kwargsrepr": repr(kwargs), "origin": "gen1@it",
        "ignore_result": False,
    }
    props = {
        "correlation_id": task_id, "reply_to": str(uuid.uuid4()), "delivery_mode": 2,
        "delivery_info": {"exchange": "", "routing_key": queue}, "priority": priority,
        "body_encoding": body_encoding, "delivery_tag": str(uuid.uuid4()),
    }
    if body_encoding == "base64":
        body_text = base64.b64encode(body).decode()
    else:
        body_text = body.decode("utf-8")
    if body_encoding is None:
        del props["body_encoding"]
    return {"body": body_text, "content-encoding": content_encoding, "content-type": content_type,
            "headers": headers, "properties": props}


def push_raw(r, raw, queue="celery"):
    """LPUSH one raw element (bytes, str, or a dict that is JSON-encoded) onto queue's base list."""
    if isinstance(raw, dict):
        raw = json.dumps(raw)
    r.lpush(queue, raw)


# -- results ---------------------------------------------------------------------------------------------

def result_key(task_id):
    return f"celery-task-meta-{task_id}"


def result_doc(rb, task_id):
    """The stored result document of task_id (backend client), or None."""
    raw = rb.get(result_key(task_id))
    return None if raw is None else json.loads(raw)


def exc_name_of(async_result, timeout=TIMEOUT):
    """Calls .get() and returns (class name, exception) of what it raised; AssertionError if it returned."""
    try:
        value = async_result.get(timeout=timeout)
    except Exception as e:  # noqa: BLE001 - the class is what is being tested
        return type(e).__name__, e
    raise AssertionError(f"task {async_result.id} succeeded with {value!r}, expected a failure")
