"""Celery settings shared by the client app (python_tasks.app) and the fallback worker app.

Everything comes from the environment, with the same defaults as `celeriac worker`:

  CELERY_BROKER_URL       broker             [redis://127.0.0.1:6379/0]
  CELERY_RESULT_BACKEND   result backend     [none: results are not stored, as in Celery and celeriac]
  CELERIAC_QUEUE          default queue      [celery]
  CELERIAC_NATIVE_QUEUE   if set, native.* tasks are routed to this queue (start celeriac with -Q <it>);
                          unset, they go to the default queue like any other task

Only JSON is used: celeriac refuses pickle, yaml and msgpack.
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

_native_queue = os.environ.get("CELERIAC_NATIVE_QUEUE")
task_routes = {"native.*": {"queue": _native_queue}} if _native_queue else {}
