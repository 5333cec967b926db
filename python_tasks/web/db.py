"""The demo's database access: SQLAlchemy, one engine per process, one session per request.

The engine is created on first use in each process (after gunicorn forks its workers, so no connection
crosses a fork); the scoped session is removed at request teardown, which returns its connection to the pool.
DATABASE_URL is a libpq URI (postgresql://user:password@host:port/db) or keyword string (host=... dbname=...),
the same forms celeriac takes: psycopg2 parses it, SQLAlchemy only pools the connections.
"""
import os
import threading

import sqlalchemy as sa
from sqlalchemy.orm import scoped_session, sessionmaker

TABLE = "demo_rows"

metadata = sa.MetaData()
demo_rows = sa.Table(
    TABLE, metadata,
    sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),  # bigserial: COPY leaves it out
    sa.Column("batch", sa.Text, nullable=False),                           # one value per import
    sa.Column("n", sa.Integer, nullable=False),
    sa.Column("name", sa.Text),
    sa.Column("value", sa.Float),
)

_lock = threading.Lock()
_engine = None
_engine_pid = None
_schema_ready = False
Session = scoped_session(sessionmaker())


def engine():
    """This process's engine (a new one after a fork)."""
    global _engine, _engine_pid, _schema_ready
    with _lock:
        if _engine is None or _engine_pid != os.getpid():
            import psycopg2

            dsn = os.environ.get("DATABASE_URL") or ""
            _engine = sa.create_engine("postgresql+psycopg2://", creator=lambda: psycopg2.connect(dsn),
                                       pool_pre_ping=True, pool_size=2, max_overflow=2)
            _engine_pid = os.getpid()
            _schema_ready = False
            Session.configure(bind=_engine)
        return _engine


def ensure_schema():
    """CREATE TABLE demo_rows if needed, once per process; an advisory lock keeps two processes from
    racing on the catalog."""
    global _schema_ready
    eng = engine()
    if _schema_ready:
        return
    with eng.begin() as conn:
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(727172)"))
        metadata.create_all(conn, checkfirst=True)
    _schema_ready = True


def count_rows(batch=None):
    ensure_schema()
    s = Session()
    total = s.execute(sa.select(sa.func.count()).select_from(demo_rows)).scalar_one()
    out = {"table": TABLE, "total": total}
    if batch:
        out["batch"] = batch
        out["batch_rows"] = s.execute(
            sa.select(sa.func.count()).select_from(demo_rows).where(demo_rows.c.batch == batch)).scalar_one()
    return out


def init_app(app):
    @app.teardown_appcontext
    def _remove_session(exc=None):
        Session.remove()
