"""The Celery app a Flask application imports: ``from python_tasks.app import app``.

Its tasks (``python_tasks.native``) are stubs for celeriac's built-ins: a celeriac worker runs them.
"""
from celery import Celery

app = Celery("python_tasks", include=["python_tasks.native"])
app.config_from_object("python_tasks.celeryconfig")
