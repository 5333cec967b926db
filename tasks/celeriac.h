/* celeriac.h: the contract between the celeriac worker and a native task. Everything a task module needs is
 * declared and explained here; a module includes this header (and jansson's, which it pulls in) and nothing
 * else of celeriac.
 *
 * A FIRST TASK (this is what `celeriac new-task score` writes, with more comments):
 *
 *     #include <celeriac.h>
 *
 *     static enum task_outcome score(struct task_ctx *ctx, json_t *args, json_t *kwargs, json_t **result)
 *     {
 *         (void)kwargs;
 *         long long n, factor;
 *         if (!task_arg_int(ctx, args, "n", &n) || !task_arg_int(ctx, args, "factor", &factor))
 *             return TASK_FAILURE;                 // a TypeError naming the parameter is set already
 *         if (n < 0)
 *             return task_fail(ctx, "ValueError", "score() n must be >= 0, got %lld", n);
 *         return task_return(ctx, result, json_integer(n * factor));
 *     }
 *
 *     static const struct task_def tasks[] = {
 *         {.name = "native.score", .fn = score, .params = "n, factor=2", .doc = "n times factor"},
 *     };
 *     CELERIAC_MODULE(tasks);
 *
 * and from Python: `app.send_task("native.score", args=[21])` or, with generated stubs
 * (`celeriac stubs --tasks DIR -o FILE`), `score.delay(21)`; `.get()` returns 42.
 *
 * BUILD AND LOAD. `celeriac build DIR` compiles every DIR/NAME.c into DIR/NAME.so with the system C compiler;
 * `celeriac worker --tasks DIR` loads them (a directory holding .c files is built first, into a private
 * directory); `--dev` also watches DIR and swaps a rebuilt module in without restarting (see DEV MODE).
 *
 * WHERE A TASK RUNS. In a pool process (prefork): one task at a time per process, so a task may block, use
 * static variables as per-process caches, and crash without taking the worker down (the client then gets
 * WorkerLostError). Static variables are not shared between processes, and a process may be replaced at any
 * time between tasks (--max-tasks-per-child, pool_restart, a reload in dev mode).
 *
 * REFERENCES follow jansson's conventions: `args` and `kwargs` are borrowed (do not decref them); `*result` is a
 * new reference that the worker takes over; NULL means None. Values returned by task_arg* are borrowed from
 * args. */
#ifndef CELERIAC_H
#define CELERIAC_H

#include <jansson.h>
#include <signal.h>
#include <stdbool.h>
#include <stddef.h>

/* Bumped whenever a struct below or a function's meaning changes: a module built against another version is
 * refused at load time with a message saying to rebuild it. */
#define CELERIAC_ABI_VERSION 1

struct redisContext;
struct pg_conn;   /* libpq's PGconn */
struct pg_result; /* libpq's PGresult */
struct task_def;

/* What a task function returns. */
enum task_outcome {
    TASK_SUCCESS = 0,
    TASK_FAILURE = 1, /* the context carries exc_type and exc_message (see task_fail) */
    TASK_RETRY = 2,   /* asked for a retry (see task_retry) */
    TASK_REPLACED = 3 /* handed its result over to a continuation (see task_continue_with) */
};

/* The task's view of its request and of the worker. Tasks read the request fields and call the functions
 * below; everything else is the worker's. */
struct task_ctx {
    /* About the request: borrowed, valid for the duration of the call. */
    const char *task_id;
    const char *task_name;
    const char *hostname; /* the worker's node name */
    long long retries;    /* how many times this task was retried so far (Celery's request.retries) */

    /* Set by task_fail; owned by the context, released by the worker. */
    char exc_type[64];
    char *exc_message;

    /* Services from the worker. redis() returns a connected blocking context on the broker's Redis database
     * (or NULL with an error set through task_fail already); the context stays owned by the worker. */
    struct redisContext *(*redis)(struct task_ctx *ctx);
    void *host; /* the worker's private data for the services */
    /* How long a task may keep retrying while that Redis is unreachable (seconds; 0: fail at once). */
    double redis_retry_s;

    /* Set (asynchronously, from a signal handler) once the task's soft time limit has passed; NULL when the
     * task has no soft limit. Read it through task_should_stop. */
    volatile sig_atomic_t *soft_limit_flag;
    /* Whether the task was revoked while running (revoke without terminate); NULL: never. Read it through
     * task_should_stop. */
    bool (*revoked)(const struct task_ctx *ctx);

    /* Stores a custom state while the task runs; see task_update_state. NULL when the worker has no result
     * backend. */
    int (*update_state)(struct task_ctx *ctx, const char *state, json_t *meta);

    /* Set by task_retry. */
    double retry_countdown;
    long long retry_max; /* -1: no limit */

    /* Set by task_subtask and task_continue_with; owned, released by the worker. subtasks is an array of
     * Celery signatures ({"task", "args", "kwargs", "options", "subtask_type", "immutable"}). */
    json_t *subtasks;
    json_t *continuation;

    /* The task being run (for the parameter names task_arg* look up). */
    const struct task_def *def;
    /* The raw_param's text, when handed over as text (task_arg_raw); NULL otherwise. */
    const char *raw_text;
    size_t raw_len;
};

/* A task function. `args` holds one value per declared parameter, in declaration order, whether the caller
 * passed it by position or by keyword, with defaults filled in: the worker has already checked the call
 * against the declared parameters and answered a wrong one with Python's TypeError ("score() missing 1
 * required positional argument: 'n'"), so a task never sees a wrong count. A task declared with
 * "*args, **kwargs" gets the caller's args array and kwargs object as they are. */
typedef enum task_outcome (*task_fn)(struct task_ctx *ctx, json_t *args, json_t *kwargs, json_t **result);

/* One row of a module's task table. Only name and fn are required. */
struct task_def {
    const char *name;   /* the Celery task name, e.g. "native.score" (native.* are routed to celeriac) */
    task_fn fn;
    /* Python-style parameter list: "n, factor=2", "*args, **kwargs", "" (none). Defaults are JSON literals
     * (1, 2.5, "s", null, true; None/True/False work too). Keyword-only parameters are not supported. */
    const char *params;
    const char *doc;    /* one line, shown by `celery inspect registered`-style tools and in the stubs */
    /* Defaults, as Celery's task options of the same names; a message's own settings win. */
    bool acks_late;         /* acknowledge after the task ran (default: before, or as --acks-late says) */
    const char *rate_limit; /* "10/s", "100/m", "1000/h"; NULL: none */
    double time_limit;      /* hard limit, seconds (the process is killed: TimeLimitExceeded); 0: none */
    double soft_time_limit; /* soft limit, seconds (see task_should_stop); 0: none */
    /* One parameter (a big list, typically) to receive as JSON text instead of parsed values: see
     * task_arg_raw. NULL: none. */
    const char *raw_param;
};

/* ---------------------------------------------------------------- arguments */

/* The value of the declared parameter `name` (borrowed; a JSON null for None), or NULL when the task declares
 * no such parameter. */
json_t *task_arg(const struct task_ctx *ctx, json_t *args, const char *name);
/* Typed reads of declared parameters. Each returns true with *out set, or false after task_fail(TypeError)
 * worded as Python words it ("score() argument 'n' must be int, not str"); the task then returns
 * TASK_FAILURE. int: a JSON integer or bool (Python's bool is an int), int64 range. number: int, float or
 * bool. str: borrowed, NUL-terminated UTF-8 (use json_string_length for embedded NULs). list/dict: borrowed. */
bool task_arg_int(struct task_ctx *ctx, json_t *args, const char *name, long long *out);
bool task_arg_number(struct task_ctx *ctx, json_t *args, const char *name, double *out);
bool task_arg_bool(struct task_ctx *ctx, json_t *args, const char *name, bool *out);
bool task_arg_str(struct task_ctx *ctx, json_t *args, const char *name, const char **out);
bool task_arg_list(struct task_ctx *ctx, json_t *args, const char *name, json_t **out);
bool task_arg_dict(struct task_ctx *ctx, json_t *args, const char *name, json_t **out);
/* The JSON text of the task's raw_param (task_def), unparsed: true with *text (borrowed, valid during the call,
 * not NUL-terminated at *len) when the worker could hand it over so; the parameter's value in args is then
 * None. false when it could not (a v1 message, say): the value is then in args as usual, parsed. Reading a
 * million-row list from its text as you go costs one pass; parsed, it costs millions of allocations first.
 * The text is not checked for you: it is what the client sent, read it with a strict JSON reader. */
bool task_arg_raw(const struct task_ctx *ctx, const char **text, size_t *len);
/* Python's type name for a JSON value ("NoneType", "bool", "int", "float", "str", "list", "dict"), for your
 * own TypeError messages. NULL is "NoneType". */
const char *task_pytype(const json_t *value);

/* ---------------------------------------------------------------- results and failures */

/* Succeeds with value (a new reference, stolen): `return task_return(ctx, result, json_integer(42));`.
 * A NULL value (jansson out of memory) fails the task with MemoryError instead. Returning None is
 * `*result = NULL; return TASK_SUCCESS;`. */
enum task_outcome task_return(struct task_ctx *ctx, json_t **result, json_t *value);
/* Fails the task: `return task_fail(ctx, "ValueError", "n must be >= 0, got %lld", n);`. exc_type is the
 * Python exception class name the client sees (AsyncResult.get() raises it when Celery knows the class:
 * builtins such as ValueError, TypeError, KeyError, RuntimeError, and Celery's own). printf-formatted. */
enum task_outcome task_fail(struct task_ctx *ctx, const char *exc_type, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Asks to run again later, as Celery's Task.retry: returns TASK_RETRY, which the task returns. The worker sends
 * the same message again under the same id with retries + 1 and an eta `countdown` seconds ahead, and stores
 * state RETRY. When ctx->retries has reached max_retries (-1: no limit) there is no retry: the task fails with
 * exc_type(message) if one is given, else with MaxRetriesExceededError, as Celery does. exc_type may be NULL
 * (a plain retry); the message is printf-formatted (fmt may be NULL). */
enum task_outcome task_retry(struct task_ctx *ctx, double countdown, long long max_retries, const char *exc_type,
                             const char *fmt, ...) __attribute__((format(printf, 5, 6)));

/* ---------------------------------------------------------------- progress */

/* Stores state (e.g. "PROGRESS") with meta (any JSON, borrowed; NULL is null) as the task's current result,
 * as Celery's Task.update_state does: a client sees it in AsyncResult.state / .info until the task ends
 * (`task_update_state(ctx, "PROGRESS", meta)` with meta {"done": n, "total": m} feeds a progress bar).
 * Returns 0 once stored, -1 when it could not be (no result backend, Redis unreachable): progress is
 * best-effort, so a task normally goes on either way. Costs a round trip to Redis: call it every few
 * hundred milliseconds, not per item. */
int task_update_state(struct task_ctx *ctx, const char *state, json_t *meta);

/* ---------------------------------------------------------------- stopping early */

/* Whether the task should give up now: its soft time limit has passed, or it was revoked while running.
 * Cheap (two memory reads): call it in inner loops, then `return task_stop(ctx);`. A task that never looks
 * still fails with SoftTimeLimitExceeded if it returns after its soft limit, and is killed at its hard limit. */
bool task_should_stop(const struct task_ctx *ctx);
/* Ends the task the way task_should_stop asked for: SoftTimeLimitExceeded, or state REVOKED
 * (TaskRevokedError('revoked')). Returns TASK_FAILURE. */
enum task_outcome task_stop(struct task_ctx *ctx);
/* The soft time limit alone. */
static inline bool task_soft_time_limit_exceeded(const struct task_ctx *ctx)
{
    return ctx->soft_limit_flag && *ctx->soft_limit_flag;
}

/* ---------------------------------------------------------------- dependent tasks, without waiting */

/* A task that needs the results of other tasks never waits for them: it declares them with task_subtask, then
 * ends with `return task_continue_with(ctx, "native.xsum", extra)`. The worker sends the subtasks as the
 * header of a chord whose body is the continuation, running under THIS task's id (and inheriting its group,
 * chord, chain and callbacks, as Celery's Task.replace does); the body receives [[r0, r1, ...], *extra] once
 * every subtask has finished, and its result is the one a client waiting on this task gets. No pool slot is
 * held while the subtasks run, so with any number of processes (even -c 1) every task that starts runs to its
 * end without waiting for another: the tree of tasks cannot deadlock, unlike a task blocking on .get().
 * Subtasks may be native or Python tasks (by name); so may the continuation. */

/* Declares a subtask: name (copied), args (array) and kwargs (object) stolen, NULL for empty.
 * Returns 0, or -1 on a bad argument (the references are released anyway). */
int task_subtask(struct task_ctx *ctx, const char *name, json_t *args, json_t *kwargs);
/* Ends the task with a continuation (see above): name copied, extra_args (array or NULL) stolen.
 * Returns TASK_REPLACED, which the task returns. */
enum task_outcome task_continue_with(struct task_ctx *ctx, const char *name, json_t *extra_args);

/* ---------------------------------------------------------------- PostgreSQL */

/* The pool process's own connection (libpq's PGconn; include <libpq-fe.h> to use it: `celeriac build` adds
 * its include path), configured by the worker's --database-url / DATABASE_URL, opened on first use, reused
 * by the next tasks, reopened when broken. task_db_begin starts a transaction (BEGIN, or BEGIN READ ONLY)
 * and returns the connection, or NULL after task_fail (OperationalError...). End it with task_db_commit
 * (0, or -1 after task_fail) or task_db_rollback. task_db_fail turns a server error (res borrowed; NULL:
 * the connection's last error) into a failure whose type a psycopg2 user knows (IntegrityError, DataError,
 * ...), with the server's message and SQLSTATE. The connection stays the worker's: never PQfinish it.
 * Send values as parameters (PQexecParams) or COPY data, never spliced into SQL. */
struct pg_conn *task_db_begin(struct task_ctx *ctx, bool read_only);
int task_db_commit(struct task_ctx *ctx, struct pg_conn *conn);
void task_db_rollback(struct pg_conn *conn);
enum task_outcome task_db_fail(struct task_ctx *ctx, struct pg_conn *conn, const struct pg_result *res);

/* ---------------------------------------------------------------- the module */

/* What a module exports: its task table, and the header version it was built against. */
struct celeriac_module {
    int abi_version;
    const struct task_def *tasks;
    size_t ntasks;
};

/* Declares the module's task table (a static array of struct task_def): one line at the end of the file. */
#define CELERIAC_MODULE(table)                                                                                 \
    const struct celeriac_module celeriac_module = {CELERIAC_ABI_VERSION, (table), sizeof(table) / sizeof((table)[0])}

/* DEV MODE. `celeriac worker --tasks DIR --dev` rebuilds DIR when a .c or .h file in it changes and swaps the
 * new modules in: tasks already running (or already handed to a pool process) finish on the old code, the
 * next ones run the new code, and no message is dropped. If the build or the load fails, the error is logged
 * and the previous modules keep serving. */

#endif
