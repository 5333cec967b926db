"""The native.pg_* tasks (db/) against a private PostgreSQL, driven by the stock Celery client.

One celeriac (-c 2) serves the module, configured with the server's password URL and an allow-list; each
test creates the tables it uses and checks what landed with its own psycopg2 connection."""

import datetime
import decimal
import json
import uuid

import pytest

from util import TIMEOUT, exc_name_of, result_key, wait_until

pytestmark = pytest.mark.celeriac_only("the native.pg_* tasks exist on celeriac only")

TABLES = "items,public.events,typed,pairs,sales"


@pytest.fixture(scope="module")
def pg_worker(module_workers, postgres_server):
    return module_workers.celeriac("-c", "2", "-l", "debug", "--database-url", postgres_server.url(),
                                   "--pg-tables", TABLES)


@pytest.fixture
def run(app, pg_worker):
    """run(name, *args) -> the task's result."""
    def call(name, *args):
        return app.send_task(name, args=list(args)).get(timeout=TIMEOUT)
    return call


@pytest.fixture
def fails(app, pg_worker):
    """fails(name, *args) -> (exception class name, message) of the task's FAILURE."""
    def call(name, *args):
        cls, exc = exc_name_of(app.send_task(name, args=list(args)))
        return cls, str(exc)
    return call


def sql(pg, query, params=None):
    with pg.cursor() as cur:
        cur.execute(query, params)
        return cur.fetchall() if cur.description else None


@pytest.fixture
def items(pg):
    sql(pg, "DROP TABLE IF EXISTS items; CREATE TABLE items (id int PRIMARY KEY, name text, value float8)")
    return pg


def item_rows(n, start=0):
    # Values with every kind of float: fractions, negatives, big and tiny exponents.
    return [[i, f"name-{i}", (i * 0.37 - 1000) * (10.0 ** ((i % 7) - 3))] for i in range(start, start + n)]


# -- insert ---------------------------------------------------------------------------------------------

def test_insert_100000_rows_exactly(run, items):
    rows = item_rows(100_000)
    assert run("native.pg_bulk_insert", "items", ["id", "name", "value"], rows) == 100_000
    count, id_sum, name_len = sql(items, "SELECT count(*), sum(id), sum(length(name)) FROM items")[0]
    assert (count, id_sum, name_len) == (100_000, sum(r[0] for r in rows), sum(len(r[1]) for r in rows))
    # Every value exactly as sent (floats bit for bit).
    assert [list(r) for r in sql(items, "SELECT id, name, value FROM items ORDER BY id")] == rows


def test_insert_subset_of_columns_and_nulls(run, items):
    assert run("native.pg_bulk_insert", "items", ["value", "id"], [[1.5, 1], [None, 2]]) == 2
    assert sql(items, "SELECT id, name, value FROM items ORDER BY id") == [(1, None, 1.5), (2, None, None)]


def test_rows_by_keyword_and_rows_not_a_list(app, pg_worker, fails, items):
    """The rows are read from the message text whether they come by position or by keyword."""
    rows = [[1, "a\tb\u00e9\U0001F600", 1e-300], [2, None, -0.0]]
    r = app.send_task("native.pg_bulk_insert", args=["items"], kwargs={"columns": ["id", "name", "value"],
                                                                         "rows": rows})
    assert r.get(timeout=TIMEOUT) == 2
    assert [list(x) for x in sql(items, "SELECT id, name, value FROM items ORDER BY id")] == rows
    for bad, name in (("abc", "str"), ({"a": 1}, "dict"), (5, "int"), (None, "NoneType")):
        assert fails("native.pg_bulk_insert", "items", ["id"], bad) == \
            ("TypeError", f"pg_bulk_insert() rows must be a list, not {name}")


def test_empty_rows_insert_nothing(run, items):
    assert run("native.pg_bulk_insert", "items", ["id"], []) == 0


def test_schema_qualified_table(run, pg):
    sql(pg, "DROP TABLE IF EXISTS events; CREATE TABLE events (id bigint, kind text)")
    assert run("native.pg_bulk_insert", "public.events", ["id", "kind"], [[2 ** 62, "x"]]) == 1
    assert sql(pg, "SELECT id, kind FROM events") == [(2 ** 62, "x")]


# -- the type mapping -----------------------------------------------------------------------------------

TYPED = """DROP TABLE IF EXISTS typed; CREATE TABLE typed (
    b boolean, i2 smallint, i4 integer, i8 bigint, f4 real, f8 double precision, t text, v varchar(8),
    j json, jb jsonb{extra})"""
TEXT_ONLY = ", n numeric(12,2), ts timestamp, tz timestamptz, d date, u uuid"


def test_types_binary_copy(run, pg):
    """Every column has a binary encoder: the COPY is binary."""
    sql(pg, TYPED.format(extra=""))
    cols = ["b", "i2", "i4", "i8", "f4", "f8", "t", "v", "j", "jb"]
    nested = {"a": [1, 2.5, None, True], "s": "x\ty\n\"q\"\\", "u": "é€😀"}
    rows = [
        [True, -32768, 2 ** 31 - 1, -(2 ** 63), 0.5, 0.1, "tab\there\nnewline\\back\rcr", "short", nested, nested],
        [False, 32767, -(2 ** 31), 2 ** 63 - 1, 3, -1e300, "", "ünïcode", [1, "two"], 0.1],
        [None] * 10,
    ]
    assert run("native.pg_bulk_insert", "typed", cols, rows) == 3
    got = sql(pg, "SELECT b, i2, i4, i8, f4, f8, t, v, j, jb, jb::text FROM typed ORDER BY i2 NULLS LAST")
    assert [list(r[:10]) for r in got] == [
        [True, -32768, 2 ** 31 - 1, -(2 ** 63), 0.5, 0.1, "tab\there\nnewline\\back\rcr", "short", nested, nested],
        [False, 32767, -(2 ** 31), 2 ** 63 - 1, 3.0, -1e300, "", "ünïcode", [1, "two"], 0.1],
        [None] * 10,
    ]
    assert got[1][10] == "0.1"  # the shortest form, as Python writes it, not 0.10000000000000001


def test_types_text_copy(run, pg):
    """numeric, timestamps, dates and uuids go through text COPY, strings in PostgreSQL's input syntax."""
    sql(pg, TYPED.format(extra=TEXT_ONLY))
    cols = ["i4", "f8", "t", "jb", "n", "ts", "tz", "d", "u"]
    u = str(uuid.uuid4())
    rows = [
        [1, 0.1, "a\tb\\c\nd", {"k": [1]}, 19.99, "2024-02-29T13:45:01.250", "2024-02-29T13:45:01+02:00",
         "2024-02-29", u],
        [2, 7, "", None, "12345.675", None, None, None, None],
        [3, -2.5e-7, "x", "str", 3, "2024-01-01 00:00", "2024-01-01T00:00:00Z", "2024-12-31", u.upper()],
    ]
    assert run("native.pg_bulk_insert", "typed", cols, rows) == 3
    got = sql(pg, "SET TIME ZONE 'UTC'; SELECT i4, f8, t, jb, n, ts, tz, d, u FROM typed ORDER BY i4")
    utc = datetime.timezone.utc
    assert [list(r) for r in got] == [
        [1, 0.1, "a\tb\\c\nd", {"k": [1]}, decimal.Decimal("19.99"), datetime.datetime(2024, 2, 29, 13, 45, 1, 250000),
         datetime.datetime(2024, 2, 29, 11, 45, 1, tzinfo=utc), datetime.date(2024, 2, 29), u],
        [2, 7.0, "", None, decimal.Decimal("12345.68"), None, None, None, None],
        [3, -2.5e-7, "x", "str", decimal.Decimal("3.00"), datetime.datetime(2024, 1, 1),
         datetime.datetime(2024, 1, 1, tzinfo=utc), datetime.date(2024, 12, 31), u],
    ]


@pytest.mark.parametrize("col,value,expected", [
    ("i4", "1", "int"), ("i4", 1.0, "int"), ("i4", True, "int"), ("i2", 40000, "int in -32768..32767"),
    ("i4", 2 ** 31, "int in -2147483648..2147483647"), ("f8", "1.5", "int or float"), ("b", 1, "bool"),
    ("t", 5, "str"), ("t", ["a"], "str"), ("t", "nul\x00byte", "str without NUL"), ("ts", 1700000000, "str"),
    ("n", [1], "int, float or str"),
])
def test_value_of_the_wrong_type(fails, pg, col, value, expected):
    sql(pg, TYPED.format(extra=TEXT_ONLY))
    cols = ["i8", col] if col != "i8" else ["i8"]
    rows = [[1, None], [2, None], [3, value]]
    cls, msg = fails("native.pg_bulk_insert", "typed", cols, rows)
    assert cls == "ValueError"
    assert f'rows[2][1] (column "{col}", ' in msg and f"expected {expected}" in msg, msg
    assert sql(pg, "SELECT count(*) FROM typed") == [(0,)]


def test_row_of_the_wrong_width(fails, items):
    rows = item_rows(5000) + [[5000, "short"]] + item_rows(10, 5001)
    cls, msg = fails("native.pg_bulk_insert", "items", ["id", "name", "value"], rows)
    assert cls == "ValueError"
    assert "rows[5000]: expected 3 values (one per column), got 2" in msg
    cls, msg = fails("native.pg_bulk_insert", "items", ["id", "name", "value"], [[1, "a", 1.0], {"id": 2}])
    assert (cls, "rows[1]: expected a list of 3 values, got dict" in msg) == ("ValueError", True), msg
    assert sql(items, "SELECT count(*) FROM items") == [(0,)]


def test_long_list_with_a_bad_row_writes_nothing(fails, run, items):
    """A list of more than 1 MiB of JSON is counted on a second thread while the COPY already runs: a bad row
    first or last still aborts the COPY with nothing written, and the next task is served as usual."""
    for at in (0, 49_999):
        rows = item_rows(50_000)
        rows[at] = [rows[at][0], 12, rows[at][2]]
        cls, msg = fails("native.pg_bulk_insert", "items", ["id", "name", "value"], rows)
        assert cls == "ValueError" and f'rows[{at}][1] (column "name", text): expected str, got int' in msg, msg
        assert sql(items, "SELECT count(*) FROM items") == [(0,)]
    assert run("native.pg_bulk_insert", "items", ["id", "name", "value"], item_rows(50_000)) == 50_000


def test_server_side_data_errors(fails, pg):
    sql(pg, TYPED.format(extra=TEXT_ONLY))
    cls, msg = fails("native.pg_bulk_insert", "typed", ["v"], [["12345678"], ["123456789"]])
    assert cls == "DataError" and "SQLSTATE 22001" in msg and "character varying(8)" in msg, msg
    cls, msg = fails("native.pg_bulk_insert", "typed", ["ts"], [["2024-01-01"], ["yesterday-ish"]])
    assert cls == "DataError" and "SQLSTATE 22007" in msg and "line 2" in msg, msg
    assert sql(pg, "SELECT count(*) FROM typed") == [(0,)]


# -- errors and safety ----------------------------------------------------------------------------------

def test_unique_violation_rolls_everything_back(fails, run, items):
    run("native.pg_bulk_insert", "items", ["id", "name", "value"], [[7, "kept", 1.0]])
    rows = item_rows(20_000, 100) + [[7, "duplicate", 2.0]]
    cls, msg = fails("native.pg_bulk_insert", "items", ["id", "name", "value"], rows)
    assert cls == "IntegrityError"
    assert "duplicate key value violates unique constraint" in msg and "SQLSTATE 23505" in msg
    assert "Key (id)=(7) already exists" in msg
    assert sql(items, "SELECT id, name FROM items") == [(7, "kept")]


def test_not_null_violation_is_an_integrity_error(fails, pg):
    sql(pg, "DROP TABLE IF EXISTS items; CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL, value float8)")
    cls, msg = fails("native.pg_bulk_insert", "items", ["id", "name"], [[1, "a"], [2, None]])
    assert cls == "IntegrityError" and "SQLSTATE 23502" in msg, msg
    assert sql(pg, "SELECT count(*) FROM items") == [(0,)]


@pytest.mark.parametrize("table", ["secrets", "public.items", "Items", "pg_catalog.pg_authid", "events", ""])
def test_table_outside_the_allow_list(fails, pg, table):
    """Only the spellings on the list: "items" is allowed, "public.items" is not; "public.events" is,
    "events" is not."""
    sql(pg, "DROP TABLE IF EXISTS secrets; CREATE TABLE secrets (id int)")
    for task, args in [("native.pg_bulk_insert", [["id"], [[1]]]), ("native.pg_bulk_upsert", [["id"], [[1]], ["id"]]),
                       ("native.pg_bulk_delete", [["id"], [1]]), ("native.pg_aggregate", [None, "id"])]:
        cls, msg = fails(task, table, *args)
        assert cls == "PermissionError" and "allow-list" in msg, (task, msg)
    assert sql(pg, "SELECT count(*) FROM secrets") == [(0,)]


def test_unknown_table_and_column(fails, pg):
    sql(pg, "DROP TABLE IF EXISTS sales")
    cls, msg = fails("native.pg_bulk_insert", "sales", ["id"], [[1]])
    assert cls == "ProgrammingError" and "SQLSTATE 42P01" in msg, msg
    sql(pg, "CREATE TABLE sales (id int)")
    cls, msg = fails("native.pg_bulk_insert", "sales", ["id", "nope"], [[1, 2]])
    assert cls == "ProgrammingError" and 'column "nope"' in msg, msg


def test_injection_attempts_are_harmless(fails, run, items):
    run("native.pg_bulk_insert", "items", ["id", "name", "value"], [[1, "one", 1.0]])
    for table in ["items; DROP TABLE items", 'items"; DROP TABLE items; --', "items --", "items,events"]:
        cls, _ = fails("native.pg_bulk_insert", table, ["id"], [[2]])
        assert cls == "PermissionError"
    for column in ['name"; DROP TABLE items; --', "name) FROM STDIN; DROP TABLE items; --", "1id", "a b", ""]:
        cls, msg = fails("native.pg_bulk_insert", "items", ["id", column], [[2, "x"]])
        assert cls == "ValueError" and "is not a valid column name" in msg, msg
        cls, msg = fails("native.pg_aggregate", "items", column, "value")
        assert cls == "ValueError", msg
    evil = ["'); DROP TABLE items; --", "\\.\n3\tx\t1\n\\.", "\\N", "$$; DROP TABLE items; $$", "\"", "%s %n"]
    rows = [[10 + i, v, None] for i, v in enumerate(evil)]
    assert run("native.pg_bulk_insert", "items", ["id", "name", "value"], rows) == len(evil)
    assert run("native.pg_bulk_upsert", "items", ["id", "name"], [[1, evil[0]]], ["id"]) == {"inserted": 0,
                                                                                             "updated": 1}
    assert run("native.pg_bulk_delete", "items", ["name"], [evil[1], "nothing"]) == 1
    got = dict(sql(items, "SELECT id, name FROM items"))
    assert got == {1: evil[0], **{10 + i: v for i, v in enumerate(evil) if i != 1}}


# -- upsert, delete, aggregate ----------------------------------------------------------------------------

def test_upsert_counts_and_values(run, items):
    run("native.pg_bulk_insert", "items", ["id", "name", "value"], item_rows(1000))
    rows = [[i, f"new-{i}", float(i)] for i in range(500, 1500)]
    assert run("native.pg_bulk_upsert", "items", ["id", "name", "value"], rows, ["id"]) == {"inserted": 500,
                                                                                          "updated": 500}
    got = sql(items, "SELECT id, name, value FROM items ORDER BY id")
    assert [list(r) for r in got] == item_rows(500) + rows
    # Only the given columns are updated; the others keep their values.
    assert run("native.pg_bulk_upsert", "items", ["id", "name"], [[0, "renamed"], [5000, "fresh"]], ["id"]) == {
        "inserted": 1, "updated": 1}
    assert sql(items, "SELECT id, name, value FROM items WHERE id IN (0, 5000) ORDER BY id") == [
        (0, "renamed", item_rows(1)[0][2]), (5000, "fresh", None)]


def test_upsert_composite_key_and_errors(run, fails, pg):
    sql(pg, "DROP TABLE IF EXISTS pairs; CREATE TABLE pairs (a int, b text, n int, PRIMARY KEY (a, b))")
    assert run("native.pg_bulk_upsert", "pairs", ["a", "b", "n"], [[1, "x", 1], [1, "y", 2]], ["a", "b"]) == {
        "inserted": 2, "updated": 0}
    assert run("native.pg_bulk_upsert", "pairs", ["a", "b", "n"], [[1, "x", 10], [2, "x", 3]], ["a", "b"]) == {
        "inserted": 1, "updated": 1}
    # Every column a key: existing rows count as updated.
    assert run("native.pg_bulk_upsert", "pairs", ["a", "b"], [[1, "x"], [3, "z"]], ["a", "b"]) == {
        "inserted": 1, "updated": 1}
    assert sql(pg, "SELECT a, b, n FROM pairs ORDER BY a, b") == [(1, "x", 10), (1, "y", 2), (2, "x", 3),
                                                                 (3, "z", None)]
    # The same key twice in one call: PostgreSQL refuses, nothing changes.
    cls, msg = fails("native.pg_bulk_upsert", "pairs", ["a", "b", "n"], [[9, "q", 1], [9, "q", 2]], ["a", "b"])
    assert cls == "ProgrammingError" and "SQLSTATE 21000" in msg, msg
    cls, msg = fails("native.pg_bulk_upsert", "pairs", ["a", "b", "n"], [[1, "x", 1]], ["n"])
    assert cls == "ProgrammingError" and "SQLSTATE 42P10" in msg, msg  # no unique constraint on (n)
    cls, msg = fails("native.pg_bulk_upsert", "pairs", ["a", "n"], [[1, 1]], ["b"])
    assert cls == "ValueError" and "'b' is not one of columns" in msg, msg
    assert sql(pg, "SELECT count(*), sum(n) FROM pairs") == [(4, 15)]


def test_delete(run, fails, items, pg):
    run("native.pg_bulk_insert", "items", ["id", "name", "value"], item_rows(30_000))
    keys = list(range(0, 30_000, 3)) + [10 ** 6, None]  # one missing key, one NULL key (matches nothing)
    assert run("native.pg_bulk_delete", "items", ["id"], keys) == 10_000
    assert sql(items, "SELECT count(*), sum(id % 3) FROM items") == [(20_000, 30_000)]
    assert run("native.pg_bulk_delete", "items", ["id", "name"], [[1, "name-1"], [2, "wrong"], [4, "name-4"]]) == 2
    assert run("native.pg_bulk_delete", "items", ["id"], []) == 0
    cls, msg = fails("native.pg_bulk_delete", "items", ["id"], [5, "seven"])
    assert cls == "ValueError" and 'keys[1][0] (column "id", integer): expected int, got str' in msg, msg
    assert sql(items, "SELECT count(*) FROM items") == [(19_998,)]


def test_aggregate_matches_sql(run, pg):
    sql(pg, "DROP TABLE IF EXISTS sales; CREATE TABLE sales (region text, shop int, amount numeric(10,2), "
            "qty int, price float8)")
    rows = [[["north", "south", "east", None][i % 4], i % 5, f"{(i * 7) % 1000 / 4:.2f}",
             None if i % 11 == 0 else i % 13, i / 8] for i in range(2000)]
    run("native.pg_bulk_insert", "sales", ["region", "shop", "amount", "qty", "price"], rows)

    def expected(group, column):
        q = (f"SELECT {group}, count(*), sum({column}), min({column}), max({column}) FROM sales "
             f"GROUP BY {group} ORDER BY {group}")
        return [[json_like(v) for v in r] for r in sql(pg, q)]

    assert run("native.pg_aggregate", "sales", "region", "qty") == expected("region", "qty")
    assert run("native.pg_aggregate", "sales", "shop", "price") == expected("shop", "price")
    assert run("native.pg_aggregate", "sales", "region", "amount") == expected("region", "amount")
    by_two = run("native.pg_aggregate", "sales", ["region", "shop"], "qty")
    assert by_two == [[[r[0], r[1]]] + r[2:] for r in expected("region, shop", "qty")]
    assert run("native.pg_aggregate", "sales", None, "qty") == [
        [None] + [json_like(v) for v in sql(pg, "SELECT count(*), sum(qty), min(qty), max(qty) FROM sales")[0]]]


def json_like(v):
    """A psycopg2 value as the task returns it: numerics that are whole become ints, others floats."""
    if isinstance(v, decimal.Decimal):
        return int(v) if v == v.to_integral_value() else float(v)
    return v


def test_aggregate_errors(fails, pg):
    sql(pg, "DROP TABLE IF EXISTS sales; CREATE TABLE sales (region text, qty int)")
    cls, msg = fails("native.pg_aggregate", "sales", "region", "missing")
    assert cls == "ProgrammingError" and "SQLSTATE 42703" in msg, msg
    cls, msg = fails("native.pg_aggregate", "sales", "qty", "region")  # sum(text)
    assert cls == "ProgrammingError" and "SQLSTATE 42883" in msg, msg
    cls, msg = fails("native.pg_aggregate", "sales", 5, "qty")
    assert cls == "TypeError", msg


# -- connection ----------------------------------------------------------------------------------------

def test_postgres_restarted_between_tasks(run, items, postgres_server, pg_worker):
    assert run("native.pg_bulk_insert", "items", ["id", "name", "value"], item_rows(10)) == 10
    # Both pool children now hold a connection; the restart breaks both.
    assert [run("native.pg_aggregate", "items", None, "id")[0][1] for _ in range(4)] == [10] * 4
    postgres_server.restart()
    # Each child notices on its next task, reconnects and carries on: no task fails.
    for i in range(6):
        assert run("native.pg_bulk_insert", "items", ["id"], [[100 + i]]) == 1
    import psycopg2

    with psycopg2.connect(postgres_server.socket_dsn()) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM items")
        assert cur.fetchone() == (16,)
    conn.close()
    assert "pg-secret" not in pg_worker.log()


def test_password_never_logged_and_connection_errors(workers, app, postgres_server, items):
    """A wrong password: the task fails with OperationalError, and neither the password nor the URL's
    appears in the log (at debug level) or in the error."""
    bad = postgres_server.url().replace(postgres_server.password, "Wr0ngPassw0rd")
    w = workers.celeriac("-Q", "pg-bad", "-c", "1", "-l", "debug", "--database-url", bad, "--pg-tables", "items")
    cls, exc = exc_name_of(app.send_task("native.pg_bulk_insert", args=["items", ["id"], [[1]]], queue="pg-bad"))
    assert cls == "OperationalError" and "password authentication failed" in str(exc), exc
    assert "Wr0ngPassw0rd" not in str(exc)
    assert "Wr0ngPassw0rd" not in w.log() and "postgresql://celeriac:**@127.0.0.1" in w.log()


def test_bad_database_url_exits_2_without_the_password():
    from servers import Celeriac

    r = Celeriac.run(["worker", "--database-url", "host=h password=s3cr3t-value dbname", "--pg-tables", "t"])
    assert r.returncode == 2 and "invalid database URL" in r.stderr and "s3cr3t" not in r.stderr, r.stderr
    r = Celeriac.run(["worker", "--pg-tables", "good, bad name"], env={"DATABASE_URL": "postgresql://u:p@h/db"})
    assert r.returncode == 2 and "invalid table name 'bad name'" in r.stderr, r.stderr


# -- progress -----------------------------------------------------------------------------------------

def test_progress_states_are_published(app, pg_worker, items, redis_server):
    """A 200,000-row insert stores PROGRESS {"done", "total"} as it goes, as Task.update_state does: a
    subscriber to the result channel (what AsyncResult waits on) sees them before SUCCESS."""
    task_id = str(uuid.uuid4())
    sub = redis_server.client(1).pubsub()
    sub.subscribe(result_key(task_id))
    wait_until(lambda: sub.get_message(timeout=0.1), what="subscription")
    rows = item_rows(200_000)
    r = app.send_task("native.pg_bulk_insert", args=["items", ["id", "name", "value"], rows], task_id=task_id)
    states = []
    while not states or states[-1]["status"] not in ("SUCCESS", "FAILURE"):
        m = sub.get_message(timeout=TIMEOUT)
        assert m is not None, f"no result after {TIMEOUT}s; states so far {states}"
        if m["type"] == "message":
            states.append(json.loads(m["data"]))
    sub.close()
    assert states[-1]["status"] == "SUCCESS" and states[-1]["result"] == 200_000
    progress = [s["result"] for s in states if s["status"] == "PROGRESS"]
    assert progress and all(p["total"] == 200_000 for p in progress), states[:3]
    done = [p["done"] for p in progress]
    # The first report comes once the total is known: at 0, or, for a list this long (9 MB of JSON, counted on
    # a second thread while the first rows are sent), some way in: usually a few percent, half-way once on a
    # loaded CI machine (the thread's start is up to the scheduler). Then every 10% and at the end.
    assert done == sorted(done) and done[0] < 200_000 and done[-1] == 200_000 and len(done) >= 2, done
    assert len(set(done)) == len(done), done
    assert r.get(timeout=TIMEOUT) == 200_000
