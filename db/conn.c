/* conn: the configuration, this process's PostgreSQL connection, and server errors as task failures.
 *
 * Which process runs what: db_configure runs in the main process before the pool forks (it only stores
 * strings); everything else runs in pool children, each of which opens its own connection on its first
 * database task. The main process never opens one. */
#include "db.h"

#include <libpq-fe.h>

#include "pq.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* The configuration. Process-wide statics because a task receives only its task context, which knows
 * nothing of db/: set once before the fork, read-only afterwards, inherited by every pool child. */
static char *cfg_dsn; /* owned; NULL: libpq's defaults */
static struct db_allow cfg_allow;

/* This process's connection, opened lazily by the first database task and reused by the next ones: pool
 * children are forked processes that run one task at a time, so one connection per process is one per
 * executing task, and it must be opened after the fork (a PGconn must never be shared across processes).
 * Thread-local so that this stays true should tasks ever run in threads. conn_pid is the process that opened
 * it: a child that inherited a parent's connection forgets it without closing it, since closing would send
 * the server a Terminate on the parent's session. */
static _Thread_local PGconn *conn;
static _Thread_local pid_t conn_pid;

int db_configure(const char *dsn, const char *tables, char *err, size_t errlen)
{
    struct db_allow allow;
    if (dsn && *dsn) {
        char *why = NULL;
        if (db_pq_load(err, errlen) < 0)
            return -1;
        PQconninfoOption *opts = PQconninfoParse(dsn, &why);
        if (!opts) {
            /* libpq's reason may quote the malformed part, which can be the password: not shown. */
            char *safe = db_dsn_redact(dsn);
            snprintf(err, errlen,
                     "invalid database URL '%s': expected postgresql://[user[:password]@]host[:port]/db"
                     " or keyword=value pairs (host=... dbname=...)",
                     safe);
            free(safe);
            PQfreemem(why);
            return -1;
        }
        PQconninfoFree(opts);
    }
    if (db_allow_parse(tables, &allow, err, errlen) < 0)
        return -1;
    db_shutdown();
    cfg_dsn = dsn && *dsn ? strdup(dsn) : NULL;
    if (dsn && *dsn && !cfg_dsn)
        abort();
    cfg_allow = allow;
    return 0;
}

static void drop_connection(void)
{
    if (conn && conn_pid == getpid())
        PQfinish(conn);
    conn = NULL;
}

void db_shutdown(void)
{
    drop_connection();
    free(cfg_dsn);
    cfg_dsn = NULL;
    db_allow_clear(&cfg_allow);
}

bool db_table_allowed(const struct db_table *t)
{
    return db_allow_has(&cfg_allow, t);
}

/* Ends the session cleanly when a child exits normally (the server then logs no "unexpected EOF"). */
static void close_at_exit(void)
{
    drop_connection();
}

/* libpq's messages end with a newline; task messages do not. */
static void fail_with_conn_error(struct task_ctx *ctx, PGconn *c, const char *what)
{
    const char *msg = c ? PQerrorMessage(c) : "out of memory";
    int n = (int)strlen(msg);
    while (n > 0 && (msg[n - 1] == '\n' || msg[n - 1] == ' '))
        n--;
    task_fail(ctx, "OperationalError", "%s: %.*s", what, n, msg);
}

/* The open connection of this process, opened now if needed. NULL after task_fail. */
static PGconn *connection(struct task_ctx *ctx)
{
    static bool exit_hook;
    if (conn && conn_pid != getpid())
        conn = NULL; /* inherited across fork: not ours to use or close */
    if (conn && PQstatus(conn) != CONNECTION_OK)
        drop_connection();
    if (conn)
        return conn;
    char why[256];
    if (db_pq_load(why, sizeof why) < 0) {
        task_fail(ctx, "OperationalError", "%s", why);
        return NULL;
    }
    /* Later entries override earlier ones, and "dbname" expands the whole URL in place: the URL's own
     * connect_timeout wins over ours, while client_encoding is forced to UTF8 (jansson strings are UTF-8). */
    const char *keys[] = {"connect_timeout", "dbname", "fallback_application_name", "client_encoding", NULL};
    const char *vals[] = {"10", cfg_dsn ? cfg_dsn : "", "celeriac", "UTF8", NULL};
    conn = PQconnectdbParams(keys, vals, 1);
    conn_pid = getpid();
    if (!conn || PQstatus(conn) != CONNECTION_OK) {
        fail_with_conn_error(ctx, conn, "could not connect to PostgreSQL");
        drop_connection();
        return NULL;
    }
    if (!exit_hook && atexit(close_at_exit) == 0)
        exit_hook = true;
    return conn;
}

/* Runs a command that returns no rows; returns 0, or -1 with *res holding the failed result (caller clears). */
static int exec_command(PGconn *c, const char *sql, PGresult **res)
{
    *res = PQexec(c, sql);
    if (PQresultStatus(*res) == PGRES_COMMAND_OK) {
        PQclear(*res);
        *res = NULL;
        return 0;
    }
    return -1;
}

struct pg_conn *task_db_begin(struct task_ctx *ctx, bool read_only)
{
    const char *begin = read_only ? "BEGIN READ ONLY" : "BEGIN";
    PGresult *res = NULL;
    for (int attempt = 0; attempt < 2; attempt++) {
        PGconn *c = connection(ctx);
        if (!c)
            return NULL;
        if (PQtransactionStatus(c) != PQTRANS_IDLE) /* a task left a transaction open: never expected */
            PQclear(PQexec(c, "ROLLBACK"));
        if (exec_command(c, begin, &res) == 0)
            return c;
        if (PQstatus(c) == CONNECTION_OK || attempt == 1) {
            task_db_fail(ctx, c, res);
            PQclear(res);
            if (PQstatus(c) != CONNECTION_OK)
                drop_connection();
            return NULL;
        }
        /* The connection broke since the last task (e.g. PostgreSQL restarted): nothing of this task was
         * sent, so it is safe to try once more on a new connection. */
        PQclear(res);
        drop_connection();
    }
    return NULL;
}

int task_db_commit(struct task_ctx *ctx, struct pg_conn *c)
{
    PGresult *res = NULL;
    if (exec_command(c, "COMMIT", &res) == 0)
        return 0;
    task_db_fail(ctx, c, res);
    PQclear(res);
    return -1;
}

void task_db_rollback(struct pg_conn *c)
{
    if (PQstatus(c) == CONNECTION_OK)
        PQclear(PQexec(c, "ROLLBACK"));
}

/* psycopg2's classes (psycopg/error_type.c, base_exception_from_sqlstate), by SQLSTATE class. */
const char *db_exc_type_for_sqlstate(const char *s)
{
    if (!s || strlen(s) != 5)
        return "DatabaseError";
    if (strcmp(s, "57014") == 0)
        return "QueryCanceledError";
    static const struct {
        char cls[3];
        const char *exc;
    } classes[] = {
        {"0A", "NotSupportedError"}, {"20", "ProgrammingError"},
        {"21", "ProgrammingError"},  {"22", "DataError"},
        {"23", "IntegrityError"},    {"24", "InternalError"},
        {"25", "InternalError"},     {"26", "OperationalError"},
        {"27", "OperationalError"},  {"28", "OperationalError"},
        {"2B", "InternalError"},     {"2D", "InternalError"},
        {"2F", "InternalError"},     {"34", "OperationalError"},
        {"38", "InternalError"},     {"39", "InternalError"},
        {"3B", "InternalError"},     {"3D", "ProgrammingError"},
        {"3F", "ProgrammingError"},  {"40", "TransactionRollbackError"},
        {"42", "ProgrammingError"},  {"44", "ProgrammingError"},
        {"53", "OperationalError"},  {"54", "OperationalError"},
        {"55", "OperationalError"},  {"57", "OperationalError"},
        {"58", "OperationalError"},  {"F0", "InternalError"},
        {"HV", "OperationalError"},  {"P0", "InternalError"},
        {"XX", "InternalError"},     {"08", "OperationalError"},
    };
    for (size_t i = 0; i < sizeof classes / sizeof classes[0]; i++)
        if (s[0] == classes[i].cls[0] && s[1] == classes[i].cls[1])
            return classes[i].exc;
    return "DatabaseError";
}

enum task_outcome task_db_fail(struct task_ctx *ctx, struct pg_conn *c, const struct pg_result *res)
{
    const char *state = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
    const char *primary = res ? PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY) : NULL;
    if (!primary) { /* no server error: the connection failed (libpq sets no SQLSTATE) */
        fail_with_conn_error(ctx, c, "lost the connection to PostgreSQL");
        return TASK_FAILURE;
    }
    const char *detail = PQresultErrorField(res, PG_DIAG_MESSAGE_DETAIL);
    const char *hint = PQresultErrorField(res, PG_DIAG_MESSAGE_HINT);
    const char *where = PQresultErrorField(res, PG_DIAG_CONTEXT);
    return task_fail(ctx, db_exc_type_for_sqlstate(state), "%s (SQLSTATE %s)%s%s%s%s%s%s", primary,
                     state ? state : "?????", detail ? "\nDETAIL: " : "", detail ? detail : "", hint ? "\nHINT: " : "",
                     hint ? hint : "", where ? "\nCONTEXT: " : "", where ? where : "");
}
