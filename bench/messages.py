"""Task messages exactly as the stock Celery client builds them, stamped out in bulk.

capture() sends one task with the stock Celery client (app.send_task) into a queue no worker is consuming,
takes the message back out of Redis (RPOP) and turns it into a template in which only the task id (headers
id/root_id, properties.correlation_id) and properties.delivery_tag vary. Everything else, body included,
stays byte for byte what Celery produced.
"""
import json
import uuid


class Template:
    def __init__(self, raw, task_id, tag, queue):
        if raw.count(task_id) != 3 or raw.count(tag) != 1:
            raise ValueError("captured message does not have the expected id/tag layout")
        self.queue = queue
        self._fmt = (raw.replace("{", "{{").replace("}", "}}")
                     .replace(task_id, "{0}").replace(tag, "{1}"))

    def make(self, task_id=None):
        """-> (task_id, message str) with a fresh id and delivery tag."""
        task_id = task_id or str(uuid.uuid4())
        return task_id, self._fmt.format(task_id, str(uuid.uuid4()))


def capture(app, redis_client, name, args=(), kwargs=None, queue="celery"):
    """Publishes `name` once with the stock client and returns its Template.

    The queue must have no consumer and be empty. redis_client: redis-py client on the broker db."""
    if redis_client.llen(queue):
        raise RuntimeError(f"queue {queue!r} is not empty")
    res = app.send_task(name, args=list(args), kwargs=kwargs or {}, queue=queue)
    raw = redis_client.rpop(queue)
    if raw is None:
        raise RuntimeError("the captured message did not arrive in Redis")
    raw = raw.decode()
    msg = json.loads(raw)
    assert msg["headers"]["id"] == res.id and msg["properties"]["correlation_id"] == res.id
    return Template(raw, res.id, msg["properties"]["delivery_tag"], queue)


def publish(redis_client, template, n, chunk=500):
    """LPUSHes n fresh messages (redis-py pipelines, `chunk` values per LPUSH) and returns their ids in the
    order a worker will pop them."""
    ids = []
    pipe = redis_client.pipeline(transaction=False)
    batch = []
    for _ in range(n):
        tid, raw = template.make()
        ids.append(tid)
        batch.append(raw)
        if len(batch) == chunk:
            pipe.lpush(template.queue, *batch)
            batch = []
    if batch:
        pipe.lpush(template.queue, *batch)
    pipe.execute()
    return ids
