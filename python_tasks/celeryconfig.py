"""Celery settings shared by the client app (python_tasks.app) and the fallback worker app.

Everything comes from the environment, with the same defaults as `celeriac worker`:

  CELERY_BROKER_URL       broker             [redis://127.0.0.1:6379/0]
  CELERY_RESULT_BACKEND   result backend     [none: results are not stored, as in Celery and celeriac]
  CELERIAC_QUEUE          default queue      [celery]
  CELERIAC_MODE           which engine runs the native.* tasks                                 [native]
                          native: celeriac, on CELERIAC_NATIVE_QUEUE (start it with `celeriac worker -Q native`)
                          python: a stock Celery worker running the pure-Python versions of the built-ins
                                  (`python3 -m celery -A python_tasks.fallbacks worker`), on CELERIAC_PYTHON_QUEUE
  CELERIAC_NATIVE_QUEUE   the queue celeriac consumes                                          [native]
  CELERIAC_PYTHON_QUEUE   the queue the fallback worker consumes          [the default queue, CELERIAC_QUEUE]

One call site, two engines: `fib.delay(30)` runs natively or in Python depending on CELERIAC_MODE alone, so a
team can compare the two and roll back without touching code. Only JSON is used: celeriac refuses pickle,
yaml and msgpack.
"""
import os

broker_url = os.environ.get("CELERY_BROKER_URL") or "redis://127.0.0.1:6379/0"
result_backend = os.environ.get("CELERY_RESULT_BACKEND") or None

task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
result_accept_content = ["json"]

enable_utc = True
timezone = "UTC"

task_default_queue = os.environ.get("CELERIAC_QUEUE") or "celery"

MODE = (os.environ.get("CELERIAC_MODE") or "native").strip().lower()
if MODE not in ("native", "python"):
    raise ValueError(f"CELERIAC_MODE must be 'native' or 'python', not {MODE!r}")
if MODE == "native":
    NATIVE_QUEUE = os.environ.get("CELERIAC_NATIVE_QUEUE") or "native"
else:
    NATIVE_QUEUE = os.environ.get("CELERIAC_PYTHON_QUEUE") or task_default_queue
task_routes = {"native.*": {"queue": NATIVE_QUEUE}}
