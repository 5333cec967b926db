/* tasks: native.pg_bulk_insert, pg_bulk_upsert, pg_bulk_delete and pg_aggregate. Runs in pool children.
 *
 * Every task: check the arguments (table on the allow-list, identifiers valid, shapes right) before touching
 * the database; BEGIN; read the columns' types from the catalog (so that values are checked against them
 * and encoded for COPY); do the work; COMMIT. Any failure rolls the whole transaction back. SQL text is only
 * ever built from checked, quoted identifiers; values travel as COPY data.
 *
 * Threads: everything runs on the task's thread, except the count of a long raw list of rows, which a second
 * thread makes (struct counter) while the COPY is already under way: the count is only needed for PROGRESS's
 * total, and waiting for it delayed the first row by ~11 ms per million. That thread reads the list's text
 * and writes its own struct counter, nothing else; the task's thread joins it before the task returns. */
#include "db.h"

#include <libpq-fe.h>

#include "pq.h"
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define COPY_FLUSH_BYTES (256 * 1024) /* COPY data handed to libpq at a time */
#define POLL_ROWS 1024                /* rows between checks of the soft time limit */
#define PROGRESS_MIN_ROWS 10000       /* smaller operations report no PROGRESS */
#define COUNT_APART_BYTES (1u << 20)  /* raw lists this long are counted on a second thread (~0.25 ms a MiB) */

/* ---- arguments ---- */

/* The table argument: a str on the allow-list. Any other name, valid or not, is refused the same way, and
 * before anything else: the allow-list holds only valid names. */
static int arg_table(struct task_ctx *ctx, const char *fn, const json_t *v, struct db_table *out)
{
    if (!json_is_string(v)) {
        task_fail(ctx, "TypeError", "%s() table must be str, not %s", fn, task_pytype(v));
        return -1;
    }
    const char *s = json_string_value(v);
    size_t len = json_string_length(v);
    if (db_table_parse(s, len, out) < 0 || !db_table_allowed(out)) {
        task_fail(ctx, "PermissionError",
                  "%s(): table '%.*s' is not in this worker's allow-list (--pg-tables / CELERIAC_PG_TABLES)", fn,
                  len > 128 ? 128 : (int)len, s);
        return -1;
    }
    return 0;
}

/* A list of distinct column names (what: "columns", "key_columns"). *names points into v (borrowed: valid
 * while the task's arguments are); caller frees the array with free(). min: the fewest accepted. */
static int arg_columns(struct task_ctx *ctx, const char *fn, const char *what, const json_t *v, size_t min,
                       const char ***names, size_t *n)
{
    *names = NULL;
    *n = 0;
    if (!json_is_array(v)) {
        task_fail(ctx, "TypeError", "%s() %s must be a list of column names, not %s", fn, what, task_pytype(v));
        return -1;
    }
    if (json_array_size(v) < min) {
        task_fail(ctx, "ValueError", "%s() %s must name at least %zu column%s", fn, what, min, min == 1 ? "" : "s");
        return -1;
    }
    const char **out = calloc(json_array_size(v) + 1, sizeof *out);
    if (!out)
        abort();
    for (size_t i = 0; i < json_array_size(v); i++) {
        const json_t *item = json_array_get(v, i);
        if (!json_is_string(item)) {
            task_fail(ctx, "TypeError", "%s() %s[%zu] must be str, not %s", fn, what, i, task_pytype(item));
            goto fail;
        }
        const char *s = json_string_value(item);
        size_t len = json_string_length(item);
        if (!db_ident_valid(s, len)) {
            task_fail(ctx, "ValueError",
                      "%s() %s[%zu]: '%.*s' is not a valid column name (1 to %d letters, digits, _ or $, "
                      "not starting with a digit)",
                      fn, what, i, len > 128 ? 128 : (int)len, s, DB_IDENT_MAX);
            goto fail;
        }
        for (size_t j = 0; j < i; j++)
            if (strcmp(out[j], s) == 0) {
                task_fail(ctx, "ValueError", "%s() %s: column '%s' is named twice", fn, what, s);
                goto fail;
            }
        out[i] = s;
    }
    *names = out;
    *n = json_array_size(v);
    return 0;
fail:
    free(out);
    return -1;
}

/* The count of a raw list, made on a second thread (see the top of the file). */
struct counter {
    pthread_t thread;
    const char *text; /* borrowed: the task's raw argument, which outlives the task's call */
    size_t len;
    size_t count;     /* the answer, written by the thread before it sets done */
    int rc;           /* likewise: db_raw_rows_count's */
    atomic_bool done; /* set (release) by the thread once count and rc are written; read (acquire) by the task */
};

static void *counter_main(void *arg)
{
    struct counter *c = arg;
    c->rc = db_raw_rows_count(c->text, c->len, &c->count);
    atomic_store_explicit(&c->done, true, memory_order_release);
    return NULL;
}

/* Starts counting text[0..len) on a new thread; c must stay where it is until joined. Returns 0, or -1 when
 * no thread could be made (the caller then counts itself). */
static int counter_start(struct counter *c, const char *text, size_t len)
{
    c->text = text;
    c->len = len;
    c->count = 0;
    c->rc = 0;
    atomic_init(&c->done, false);
    /* The thread blocks every signal, so that they all still reach the task's thread: SIGALRM of the soft time
     * limit, and whatever the pool sends, interrupt the calls that thread is blocked in, as before. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int rc = pthread_create(&c->thread, NULL, counter_main, c);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return rc == 0 ? 0 : -1;
}

/* The rows of a bulk task: a parsed list, or the list's JSON text read as the COPY goes (task_arg_raw: what
 * the worker hands over for a task's raw_param, sparing a million-row list its million jansson arrays). */
struct rows {
    const json_t *list; /* parsed, borrowed; NULL when raw */
    struct db_raw_rows raw;
    bool is_raw;
    bool known;         /* total is known; false while the counter runs, or when the count failed */
    bool counting;      /* counter was started and is not joined yet */
    int count_rc;       /* the counter's answer once joined */
    size_t total;
    struct counter counter;
};

/* Whether the total is known, taking the counter's answer when it is ready (wait: waiting for it; it takes
 * ~11 ms per million rows at most, so error paths wait too rather than cancel). */
static bool rows_known(struct rows *r, bool wait)
{
    if (r->counting && (wait || atomic_load_explicit(&r->counter.done, memory_order_acquire))) {
        pthread_join(r->counter.thread, NULL);
        r->counting = false;
        r->count_rc = r->counter.rc;
        r->total = r->counter.count;
        r->known = r->count_rc == 0;
    }
    return r->known;
}

/* Python's type name for the JSON value the text starts with (it is checked later, or was). */
static const char *text_pytype(const char *p, const char *end)
{
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
        p++;
    switch (p < end ? *p : 'n') {
    case '"': return "str";
    case '{': return "dict";
    case '[': return "list";
    case 't':
    case 'f': return "bool";
    case 'n': return "NoneType";
    default: return memchr(p, '.', (size_t)(end - p) < 32 ? (size_t)(end - p) : 32) ? "float" : "int";
    }
}

/* A malformed or out-of-range list text fails as the worker fails such a body (DecodeError, OverflowError). */
static void fail_raw(struct task_ctx *ctx, const char *fn, const char *what, int rc)
{
    if (rc == DB_RAW_OVERFLOW)
        task_fail(ctx, "OverflowError", "%s() %s: a number out of the 64-bit integer or float range", fn, what);
    else
        task_fail(ctx, "DecodeError", "%s() %s: not valid JSON", fn, what);
}

static int arg_rows(struct task_ctx *ctx, const char *fn, const char *what, const json_t *v, struct rows *out)
{
    const char *text;
    size_t len;
    memset(out, 0, sizeof *out);
    if (task_arg_raw(ctx, &text, &len)) {
        int rc;
        out->is_raw = true;
        if (len >= COUNT_APART_BYTES && (rc = db_raw_rows_start(&out->raw, text, len)) == 0) {
            if (counter_start(&out->counter, text, len) == 0) {
                out->counting = true;
                return 0;
            }
            rc = db_raw_rows_count(text, len, &out->raw.count);
        } else {
            rc = db_raw_rows_open(&out->raw, text, len);
        }
        if (rc == DB_RAW_NOT_A_LIST) {
            task_fail(ctx, "TypeError", "%s() %s must be a list, not %s", fn, what, text_pytype(text, text + len));
            return -1;
        }
        if (rc < 0) {
            fail_raw(ctx, fn, what, rc);
            return -1;
        }
        out->total = out->raw.count;
        out->known = true;
        return 0;
    }
    if (!json_is_array(v)) {
        task_fail(ctx, "TypeError", "%s() %s must be a list, not %s", fn, what, task_pytype(v));
        return -1;
    }
    out->list = v;
    out->total = json_array_size(v);
    out->known = true;
    return 0;
}

/* Encodes the next row (index i) into enc. Returns 1, 0 when there is none left (a raw list is read to its
 * end, so that the whole text is known valid), or -1 after task_fail (why: the encoder's message). */
static int next_row(struct task_ctx *ctx, const char *fn, struct rows *r, size_t i, struct db_copy *enc,
                    struct db_value *vals, const char *what, char *why, size_t whylen)
{
    int rc;
    if (!r->is_raw) {
        if (i == r->total)
            return 0;
        rc = db_copy_row(enc, json_array_get(r->list, i), i, what, why, whylen);
    } else {
        size_t n;
        bool is_list;
        rc = db_raw_rows_next(&r->raw, vals, enc->ncols, &n, &is_list);
        if (rc == 0)
            return 0;
        if (rc < 0) {
            fail_raw(ctx, fn, what, rc);
            return -1;
        }
        rc = db_copy_values(enc, vals, n, is_list, i, what, why, whylen);
    }
    if (rc < 0) {
        task_fail(ctx, "ValueError", "%s; nothing was written", why);
        return -1;
    }
    return 1;
}

/* After the last row of a raw list (read to its end, so valid): its count must agree. It can only disagree
 * if the structural count and the strict reading part ways, which valid JSON does not allow; checked all the
 * same, since PROGRESS reported that total. Returns 0, or -1 after task_fail. */
static int rows_end(struct task_ctx *ctx, const char *fn, struct rows *r, const char *what, size_t read)
{
    if (rows_known(r, true) && r->total == read)
        return 0;
    fail_raw(ctx, fn, what, r->known ? DB_RAW_MALFORMED : r->count_rc);
    return -1;
}

static void append_column_list(struct db_buf *b, const char *prefix, const char *const *names, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (i)
            db_buf_puts(b, ", ");
        db_buf_puts(b, prefix);
        db_quote_ident(b, names[i]);
    }
}

/* ---- the catalog ---- */

/* The kind of each named column of table, read in the open transaction (domains count as their base type).
 * kinds: n entries, filled. Returns 0, or -1 after task_fail (ProgrammingError for an unknown table or
 * column, as the server words them). */
static int column_kinds(struct task_ctx *ctx, PGconn *c, const struct db_table *t, const char *const *names, size_t n,
                        enum db_kind *kinds)
{
    static const char sql[] = "SELECT a.attname, CASE WHEN ty.typtype = 'd' THEN ty.typbasetype ELSE a.atttypid END "
                              "FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_type ty ON ty.oid = a.atttypid "
                              "WHERE a.attrelid = $1::pg_catalog.regclass AND a.attnum > 0 AND NOT a.attisdropped";
    struct db_buf table = {0};
    int rc = -1;
    db_quote_table(&table, t);
    const char *params[] = {table.data};
    PGresult *res = PQexecParams(c, sql, 1, NULL, params, NULL, NULL, 0);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        task_db_fail(ctx, c, res);
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        int row = 0;
        while (row < PQntuples(res) && strcmp(PQgetvalue(res, row, 0), names[i]) != 0)
            row++;
        if (row == PQntuples(res)) {
            task_fail(ctx, "ProgrammingError", "column \"%s\" of relation \"%s\" does not exist (SQLSTATE 42703)",
                      names[i], t->name);
            goto out;
        }
        kinds[i] = db_kind_of_oid((unsigned)strtoul(PQgetvalue(res, row, 1), NULL, 10));
    }
    rc = 0;
out:
    PQclear(res);
    db_buf_free(&table);
    return rc;
}

/* Runs a statement; returns its result when it succeeded with status want, else NULL after task_fail.
 * Caller clears the result with PQclear. */
static PGresult *run(struct task_ctx *ctx, PGconn *c, const char *sql, ExecStatusType want)
{
    PGresult *res = PQexec(c, sql);
    if (PQresultStatus(res) == want)
        return res;
    task_db_fail(ctx, c, res);
    PQclear(res);
    return NULL;
}

/* ---- progress ---- */

struct progress {
    struct task_ctx *ctx;
    bool started;    /* progress_start was called (once the total is known) */
    size_t total;    /* rows in the operation */
    size_t step;     /* rows between reports; 0: the operation is too small to report */
    size_t next;     /* rows done at the next report */
    size_t reported; /* done in the last report */
};

static void progress_report(struct progress *p, size_t done)
{
    json_t *meta = json_pack("{s:I,s:I}", "done", (json_int_t)done, "total", (json_int_t)p->total);
    /* Best effort, as Celery's update_state from a task: a client without it still gets the result. */
    (void)task_update_state(p->ctx, "PROGRESS", meta);
    json_decref(meta);
    p->reported = done;
}

/* Starts the reports once the total is known, with one for the rows done so far: 0 when the total was known
 * from the start, a few percent in when a second thread counted while the first rows were sent. */
static void progress_start(struct progress *p, struct task_ctx *ctx, size_t total, size_t done)
{
    *p = (struct progress){.ctx = ctx, .started = true, .total = total};
    if (total < PROGRESS_MIN_ROWS)
        return;
    p->step = total / 10 > PROGRESS_MIN_ROWS ? total / 10 : PROGRESS_MIN_ROWS;
    p->next = (done / p->step + 1) * p->step;
    progress_report(p, done);
}

static void progress_rows(struct progress *p, size_t done)
{
    if (p->step && done >= p->next && done < p->total) {
        progress_report(p, done);
        p->next += p->step;
    }
}

static void progress_end(struct progress *p)
{
    if (p->step && p->reported != p->total)
        progress_report(p, p->total);
}

/* ---- COPY ---- */

/* Reads the results of a finished or aborted COPY; returns the final one (caller clears). */
static PGresult *copy_result(PGconn *c)
{
    PGresult *last = NULL, *res;
    while ((res = PQgetResult(c))) {
        PQclear(last);
        last = res;
    }
    return last;
}

/* Aborts the COPY in progress (the server then fails the statement) and discards its results. */
static void copy_abort(PGconn *c, const char *why)
{
    if (PQputCopyEnd(c, why) == 1)
        PQclear(copy_result(c));
}

static int copy_send(struct task_ctx *ctx, PGconn *c, struct db_buf *b)
{
    if (b->len && PQputCopyData(c, b->data, (int)b->len) != 1) {
        task_db_fail(ctx, c, NULL);
        return -1;
    }
    b->len = 0;
    return 0;
}

/* COPY rows (a list, borrowed) into target_sql (a quoted table name) (names), checking each value against
 * kinds. Binary format when every kind has a binary encoder, else text. *copied gets the server's row count.
 * what names the argument in messages ("rows", "keys"). Returns 0, or -1 after task_fail (the transaction
 * must then be rolled back). */
static int copy_rows(struct task_ctx *ctx, const char *fn, PGconn *c, const char *target_sql,
                     const char *const *names, size_t n, const enum db_kind *kinds, struct rows *rows,
                     const char *what, bool bare_scalars, struct progress *prog, long long *copied)
{
    struct db_value *vals = calloc(n, sizeof *vals);
    if (!vals)
        abort();
    struct db_copy enc = {.ncols = n, .kinds = kinds, .names = names, .binary = true, .bare_scalars = bare_scalars};
    struct db_buf sql = {0};
    PGresult *res = NULL;
    char why[512];
    int rc = -1;
    for (size_t i = 0; i < n; i++)
        enc.binary &= db_kind_binary(kinds[i]);
    db_buf_puts(&sql, "COPY ");
    db_buf_puts(&sql, target_sql);
    db_buf_puts(&sql, " (");
    append_column_list(&sql, "", names, n);
    db_buf_puts(&sql, enc.binary ? ") FROM STDIN (FORMAT binary)" : ") FROM STDIN");
    res = run(ctx, c, sql.data, PGRES_COPY_IN);
    if (!res)
        goto out;
    PQclear(res);
    res = NULL;

    db_copy_begin(&enc);
    size_t i = 0;
    for (;; i++) {
        int got = next_row(ctx, fn, rows, i, &enc, vals, what, why, sizeof why);
        if (got == 0)
            break;
        if (got < 0) {
            copy_abort(c, "celeriac: invalid row");
            goto out;
        }
        if (enc.out.len >= COPY_FLUSH_BYTES && copy_send(ctx, c, &enc.out) < 0)
            goto out;
        if ((i + 1) % POLL_ROWS == 0) {
            if (task_soft_time_limit_exceeded(ctx)) {
                copy_abort(c, "celeriac: soft time limit exceeded");
                if (rows_known(rows, true))
                    task_fail(ctx, "SoftTimeLimitExceeded",
                              "soft time limit exceeded after %zu of %zu rows; none written", i + 1, rows->total);
                else
                    task_fail(ctx, "SoftTimeLimitExceeded", "soft time limit exceeded after %zu rows; none written",
                              i + 1);
                goto out;
            }
            if (!prog->started && rows_known(rows, false))
                progress_start(prog, ctx, rows->total, i + 1);
            progress_rows(prog, i + 1);
        }
    }
    if (rows->is_raw && rows_end(ctx, fn, rows, what, i) < 0) {
        copy_abort(c, "celeriac: invalid rows");
        goto out;
    }
    if (!prog->started) /* the count came after the last check: the reports start (and end) here */
        progress_start(prog, ctx, rows->total, i);
    db_copy_end(&enc);
    if (copy_send(ctx, c, &enc.out) < 0)
        goto out;
    if (PQputCopyEnd(c, NULL) != 1) {
        task_db_fail(ctx, c, NULL);
        goto out;
    }
    res = copy_result(c);
    if (PQresultStatus(res) != PGRES_COMMAND_OK) {
        task_db_fail(ctx, c, res);
        goto out;
    }
    *copied = strtoll(PQcmdTuples(res), NULL, 10);
    rc = 0;
out:
    PQclear(res);
    db_buf_free(&sql);
    db_buf_free(&enc.out);
    free(vals);
    return rc;
}

/* A temporary table with the given columns of table (same types, no constraints), dropped at commit. */
static int create_temp(struct task_ctx *ctx, PGconn *c, const char *temp_name, const char *table_sql,
                       const char *const *names, size_t n)
{
    struct db_buf sql = {0};
    db_buf_puts(&sql, "CREATE TEMPORARY TABLE ");
    db_buf_puts(&sql, temp_name);
    db_buf_puts(&sql, " ON COMMIT DROP AS SELECT ");
    append_column_list(&sql, "", names, n);
    db_buf_puts(&sql, " FROM ");
    db_buf_puts(&sql, table_sql);
    db_buf_puts(&sql, " WITH NO DATA");
    PGresult *res = run(ctx, c, sql.data, PGRES_COMMAND_OK);
    db_buf_free(&sql);
    PQclear(res);
    return res ? 0 : -1;
}

/* ---- the tasks ---- */

/* What the three write tasks share: the table and the columns whose values travel, checked; a transaction in
 * which those columns' types are read and the rows copied (into the table itself, or into a temporary table
 * a statement then merges); and the end, commit or rollback. */
struct bulk {
    struct task_ctx *ctx;
    const char *fn;      /* the task's short name, for messages */
    struct db_table t;
    struct db_buf table; /* the target, quoted */
    const char **cols;   /* owned array; the strings are borrowed from the arguments */
    size_t ncols;
    enum db_kind *kinds; /* owned */
    struct progress prog;
    PGconn *c;           /* inside a transaction while not NULL */
    struct db_buf sql;   /* the statement run after the copy, if any */
    PGresult *res;       /* its result */
    long long copied;
    struct rows rows;    /* args[2] */
};

/* Checks args[0] (the table), args[1] (the columns, named cols_what) and args[2] (the rows, named rows_what).
 * Returns 0, or -1 after task_fail. */
static int bulk_args(struct bulk *b, struct task_ctx *ctx, const char *fn, json_t *args, const char *cols_what,
                     const char *rows_what)
{
    *b = (struct bulk){.ctx = ctx, .fn = fn};
    if (arg_table(ctx, fn, json_array_get(args, 0), &b->t) < 0 ||
        arg_columns(ctx, fn, cols_what, json_array_get(args, 1), 1, &b->cols, &b->ncols) < 0 ||
        arg_rows(ctx, fn, rows_what, json_array_get(args, 2), &b->rows) < 0)
        return -1;
    db_quote_table(&b->table, &b->t);
    return 0;
}

/* Opens the transaction and copies rows into the table, or into temporary table `temp` (NULL: the table).
 * Returns 0, or -1 after task_fail. */
static int bulk_copy(struct bulk *b, const char *temp, const char *rows_what, bool bare_scalars)
{
    b->kinds = calloc(b->ncols, sizeof *b->kinds);
    if (!b->kinds)
        abort();
    if (!(b->c = task_db_begin(b->ctx, false)))
        return -1;
    if (rows_known(&b->rows, false))
        progress_start(&b->prog, b->ctx, b->rows.total, 0);
    struct db_buf target = {0};
    if (temp) {
        db_buf_puts(&target, "pg_temp.");
        db_buf_puts(&target, temp);
    }
    int rc = column_kinds(b->ctx, b->c, &b->t, b->cols, b->ncols, b->kinds) < 0 ||
                     (temp && create_temp(b->ctx, b->c, temp, b->table.data, b->cols, b->ncols) < 0) ||
                     copy_rows(b->ctx, b->fn, b->c, temp ? target.data : b->table.data, b->cols, b->ncols,
                               b->kinds, &b->rows, rows_what, bare_scalars, &b->prog, &b->copied) < 0
                 ? -1
                 : 0;
    db_buf_free(&target);
    return rc;
}

/* Runs b->sql, which must end as `want`. Returns 0, or -1 after task_fail. */
static int bulk_run(struct bulk *b, ExecStatusType want)
{
    return (b->res = run(b->ctx, b->c, b->sql.data, want)) ? 0 : -1;
}

/* Ends the task: with value (stolen) the transaction is committed and value becomes the result; with NULL
 * (a step failed, after task_fail) it is rolled back. Frees what b holds. */
static enum task_outcome bulk_finish(struct bulk *b, json_t *value, json_t **result)
{
    *result = NULL;
    if (value && b->c) {
        progress_end(&b->prog);
        if (task_db_commit(b->ctx, b->c) == 0) {
            b->c = NULL;
            *result = value;
            value = NULL;
        }
    }
    json_decref(value);
    if (b->c)
        task_db_rollback(b->c);
    PQclear(b->res);
    (void)rows_known(&b->rows, true); /* joins the counter, if one still runs */
    if (b->rows.is_raw)
        db_raw_rows_close(&b->rows.raw);
    free(b->cols);
    free(b->kinds);
    db_buf_free(&b->table);
    db_buf_free(&b->sql);
    return *result ? TASK_SUCCESS : TASK_FAILURE;
}

enum task_outcome db_task_bulk_insert(struct task_ctx *ctx, json_t *args, json_t *kwargs, json_t **result)
{
    struct bulk b;
    (void)kwargs;
    if (bulk_args(&b, ctx, "pg_bulk_insert", args, "columns", "rows") < 0 ||
        bulk_copy(&b, NULL, "rows", false) < 0)
        return bulk_finish(&b, NULL, result);
    return bulk_finish(&b, json_integer(b.copied), result);
}

enum task_outcome db_task_bulk_upsert(struct task_ctx *ctx, json_t *args, json_t *kwargs, json_t **result)
{
    struct bulk b;
    const char **keys = NULL;
    size_t nkeys = 0;
    json_t *value = NULL;
    (void)kwargs;
    if (bulk_args(&b, ctx, "pg_bulk_upsert", args, "columns", "rows") < 0 ||
        arg_columns(ctx, b.fn, "key_columns", json_array_get(args, 3), 1, &keys, &nkeys) < 0)
        goto out;
    const char **cols = b.cols;
    size_t ncols = b.ncols;
    for (size_t i = 0; i < nkeys; i++) {
        size_t j = 0;
        while (j < ncols && strcmp(cols[j], keys[i]) != 0)
            j++;
        if (j == ncols) {
            task_fail(ctx, "ValueError", "%s() key_columns: '%s' is not one of columns", b.fn, keys[i]);
            goto out;
        }
    }
    if (bulk_copy(&b, "celeriac_upsert", "rows", false) < 0)
        goto out;

    /* One statement merges the lot. xmax = 0 tells a freshly inserted row from an updated one (an updated
     * row version carries the updating transaction's id in xmax while it is locked). When every column is a
     * key there is nothing to update: the key is set to itself, so that existing rows still count as
     * updated rather than vanishing from both counts. */
    struct db_buf *sql = &b.sql;
    db_buf_puts(sql, "WITH r AS (INSERT INTO ");
    db_buf_puts(sql, b.table.data);
    db_buf_puts(sql, " AS t (");
    append_column_list(sql, "", cols, ncols);
    db_buf_puts(sql, ") SELECT ");
    append_column_list(sql, "", cols, ncols);
    db_buf_puts(sql, " FROM pg_temp.celeriac_upsert ON CONFLICT (");
    append_column_list(sql, "", keys, nkeys);
    db_buf_puts(sql, ") DO UPDATE SET ");
    bool any = false;
    for (size_t i = 0; i < ncols; i++) {
        bool key = false;
        for (size_t j = 0; j < nkeys; j++)
            key |= strcmp(cols[i], keys[j]) == 0;
        if (key && !(i == ncols - 1 && !any))
            continue;
        if (any)
            db_buf_puts(sql, ", ");
        any = true;
        db_quote_ident(sql, cols[i]);
        db_buf_puts(sql, " = EXCLUDED.");
        db_quote_ident(sql, cols[i]);
    }
    db_buf_puts(sql, " RETURNING (t.xmax = 0) AS inserted) "
                     "SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted) FROM r");
    if (bulk_run(&b, PGRES_TUPLES_OK) < 0)
        goto out;
    value = json_pack("{s:I,s:I}", "inserted", (json_int_t)strtoll(PQgetvalue(b.res, 0, 0), NULL, 10), "updated",
                      (json_int_t)strtoll(PQgetvalue(b.res, 0, 1), NULL, 10));
out:
    free(keys);
    return bulk_finish(&b, value, result);
}

enum task_outcome db_task_bulk_delete(struct task_ctx *ctx, json_t *args, json_t *kwargs, json_t **result)
{
    struct bulk b;
    (void)kwargs;
    if (bulk_args(&b, ctx, "pg_bulk_delete", args, "key_columns", "keys") < 0 ||
        bulk_copy(&b, "celeriac_keys", "keys", true) < 0)
        return bulk_finish(&b, NULL, result);
    /* A key holding a NULL matches nothing, as in SQL; a key given twice deletes its rows once. */
    db_buf_puts(&b.sql, "DELETE FROM ");
    db_buf_puts(&b.sql, b.table.data);
    db_buf_puts(&b.sql, " AS t USING pg_temp.celeriac_keys AS k WHERE ");
    for (size_t i = 0; i < b.ncols; i++) {
        db_buf_puts(&b.sql, i ? " AND t." : "t.");
        db_quote_ident(&b.sql, b.cols[i]);
        db_buf_puts(&b.sql, " = k.");
        db_quote_ident(&b.sql, b.cols[i]);
    }
    if (bulk_run(&b, PGRES_COMMAND_OK) < 0)
        return bulk_finish(&b, NULL, result);
    return bulk_finish(&b, json_integer(strtoll(PQcmdTuples(b.res), NULL, 10)), result);
}

enum task_outcome db_task_aggregate(struct task_ctx *ctx, json_t *args, json_t *kwargs, json_t **result)
{
    static const char fn[] = "pg_aggregate";
    json_t *group_arg = json_array_get(args, 1), *column_arg = json_array_get(args, 2), *groups = NULL;
    const char **group = NULL, *column = NULL;
    size_t ngroup = 0;
    struct db_table t;
    struct db_buf sql = {0};
    PGconn *c = NULL;
    PGresult *res = NULL;
    (void)kwargs;
    *result = NULL;
    if (arg_table(ctx, fn, json_array_get(args, 0), &t) < 0)
        goto out;
    /* group_by: one column name, a list of them (the group is then a list), or None (one group, null). */
    if (json_is_string(group_arg)) {
        json_t *one = json_pack("[O]", group_arg);
        int rc = arg_columns(ctx, fn, "group_by", one, 1, &group, &ngroup);
        json_decref(one); /* group[0] points into group_arg's string, which args keeps alive */
        if (rc < 0)
            goto out;
    } else if (!json_is_null(group_arg) && arg_columns(ctx, fn, "group_by", group_arg, 1, &group, &ngroup) < 0) {
        goto out;
    }
    if (!json_is_string(column_arg)) {
        task_fail(ctx, "TypeError", "%s() column must be str, not %s", fn, task_pytype(column_arg));
        goto out;
    }
    column = json_string_value(column_arg);
    if (!db_ident_valid(column, json_string_length(column_arg))) {
        task_fail(ctx, "ValueError", "%s() column: '%.128s' is not a valid column name", fn, column);
        goto out;
    }

    db_buf_puts(&sql, "SELECT ");
    append_column_list(&sql, "", group, ngroup);
    db_buf_puts(&sql, ngroup ? ", count(*), sum(" : "count(*), sum(");
    db_quote_ident(&sql, column);
    db_buf_puts(&sql, "), min(");
    db_quote_ident(&sql, column);
    db_buf_puts(&sql, "), max(");
    db_quote_ident(&sql, column);
    db_buf_puts(&sql, ") FROM ");
    db_quote_table(&sql, &t);
    if (ngroup) {
        db_buf_puts(&sql, " GROUP BY ");
        append_column_list(&sql, "", group, ngroup);
        db_buf_puts(&sql, " ORDER BY ");
        append_column_list(&sql, "", group, ngroup);
    }
    if (!(c = task_db_begin(ctx, true)) || !(res = run(ctx, c, sql.data, PGRES_TUPLES_OK)))
        goto out;
    groups = json_array();
    for (int r = 0; r < PQntuples(res); r++) {
        json_t *row = json_array(), *key = NULL;
        if (json_is_array(group_arg))
            key = json_array();
        for (int f = 0; f < PQnfields(res); f++) {
            json_t *v = PQgetisnull(res, r, f) ? json_null()
                                               : db_value_from_text(PQgetvalue(res, r, f),
                                                                    (size_t)PQgetlength(res, r, f), PQftype(res, f));
            if ((size_t)f < ngroup && key)
                json_array_append_new(key, v);
            else
                json_array_append_new(row, v);
        }
        if (key)
            json_array_insert_new(row, 0, key);
        else if (!ngroup)
            json_array_insert_new(row, 0, json_null());
        json_array_append_new(groups, row);
    }
    if (task_db_commit(ctx, c) < 0)
        goto out;
    c = NULL;
    *result = groups;
    groups = NULL;
out:
    if (c)
        task_db_rollback(c);
    json_decref(groups);
    PQclear(res);
    free(group);
    db_buf_free(&sql);
    return *result ? TASK_SUCCESS : TASK_FAILURE;
}
