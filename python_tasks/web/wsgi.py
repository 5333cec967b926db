"""WSGI entry point: ``gunicorn python_tasks.web.wsgi:app``."""
from python_tasks.web import create_app

app = create_app()
