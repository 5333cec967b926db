"""The Python side of celeriac: what a Flask (or any Celery 5) application imports.

- ``python_tasks.app``: the Celery app (settings in ``python_tasks.celeryconfig``, read from the environment);
- ``python_tasks.native``: stubs for celeriac's built-in tasks, so ``add.delay(2, 3)`` works from Python;
- ``python_tasks.fallbacks``: pure-Python versions of the same tasks on a separate app, for a stock
  ``celery worker`` (the benchmark's comparison, or a machine without celeriac);
- ``python_tasks.web``: the Flask demo of the whole stack (README: "Run the whole stack").
"""
