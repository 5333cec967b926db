/* task: the contract between the worker and a native task, and the registry of built-in tasks.
 *
 * A task is a function that receives its arguments already bound and checked against its declared
 * parameters (so wrong counts never reach it), and either succeeds with a JSON result or fails with a Python
 * exception type name and message. It runs in a pool child process; it may block, and it may use the
 * services the context offers (a Redis connection). It never sees the broker or the result backend.
 *
 * Arguments follow jansson's conventions: `args` and `kwargs` are borrowed; `*result` is a new reference the
 * worker takes over (NULL means None). */
#ifndef CELERIAC_TASK_H
#define CELERIAC_TASK_H

#include <jansson.h>
#include <signal.h>
#include <stdbool.h>

struct redisContext;

enum task_outcome {
    TASK_SUCCESS = 0,
    TASK_FAILURE = 1, /* the context carries exc_type and exc_message (see task_fail) */
    TASK_RETRY = 2,   /* asked for a retry (see task_retry) */
    TASK_REPLACED = 3 /* handed its result over to a continuation (see task_continue_with) */
};

struct task_ctx {
    /* About the request: borrowed, valid for the duration of the call. */
    const char *task_id;
    const char *task_name;
    const char *hostname; /* the worker's node name */
    long long retries;

    /* Set by task_fail; owned by the context, released by task_ctx_reset. */
    char exc_type[64];
    char *exc_message;

    /* Services from the worker. redis() returns a connected blocking context on the broker's Redis database
     * (or NULL with an error set through task_fail already); the context stays owned by the worker. */
    struct redisContext *(*redis)(struct task_ctx *ctx);
    void *host; /* the worker's private data for the services above */
    /* How long a task may keep retrying while that Redis is unreachable (seconds; 0: fail at once). */
    double redis_retry_s;

    /* Set (asynchronously, from a signal handler) once the task's soft time limit has passed. A long task
     * polls it with task_soft_time_limit_exceeded and gives up with
     * `return task_fail(ctx, "SoftTimeLimitExceeded", ...)`; the worker fails it that way anyway if it
     * returns after the limit without noticing. NULL when the task has no soft limit. */
    volatile sig_atomic_t *soft_limit_flag;

    /* Stores a custom state such as "PROGRESS" with meta while the task runs (Celery's update_state); see
     * task_update_state. NULL when the worker has no result backend. */
    int (*update_state)(struct task_ctx *ctx, const char *state, json_t *meta);

    /* Set by task_retry. */
    double retry_countdown;
    long long retry_max; /* -1: no limit */

    /* Set by task_subtask and task_continue_with; owned, released by task_ctx_reset. subtasks is an array of
     * Celery signatures ({"task", "args", "kwargs", "options", "subtask_type", "immutable"}). */
    json_t *subtasks;
    json_t *continuation;
};

/* The bound-argument calling convention: `args` is an array holding one value per declared positional
 * parameter, in order (defaults already filled in); for a task declared with "*args, **kwargs" it is the
 * caller's args array and `kwargs` the caller's kwargs object, untouched. */
typedef enum task_outcome (*task_fn)(struct task_ctx *ctx, json_t *args, json_t *kwargs, json_t **result);

struct task_def {
    const char *name;   /* the Celery task name, e.g. "native.add" */
    task_fn fn;
    const char *params; /* Python-style parameter list used for binding: "x, y", "n", "*args, **kwargs", "" */
    const char *doc;    /* one line */
};

/* Records a failure on ctx and returns TASK_FAILURE, so a task can `return task_fail(ctx, "ValueError", ...)`.
 * exc_type is the Python exception class name a client will see (e.g. "TypeError"); the message is
 * printf-formatted. */
enum task_outcome task_fail(struct task_ctx *ctx, const char *exc_type, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Asks to run again later, as Celery's Task.retry: returns TASK_RETRY, which the task returns. The worker sends
 * the same message again under the same id with retries + 1 and an eta `countdown` seconds ahead, and stores
 * state RETRY. When ctx->retries has reached max_retries (-1: no limit) there is no retry: the task fails with
 * exc_type(message) if one is given, else with MaxRetriesExceededError, as Celery does. exc_type may be NULL
 * (no exception: a plain retry); the message is printf-formatted (fmt may be NULL). */
enum task_outcome task_retry(struct task_ctx *ctx, double countdown, long long max_retries, const char *exc_type,
                             const char *fmt, ...) __attribute__((format(printf, 5, 6)));

/* DEPENDENCIES WITHOUT WAITING. A task that needs the results of other tasks never waits for them: it
 * declares them with task_subtask, then ends with `return task_continue_with(ctx, "native.xsum", extra)`.
 * The worker sends the subtasks as the header of a chord whose body is the continuation, running under THIS
 * task's id (and inheriting its group, chord, chain and callbacks, as Celery's Task.replace does); the body
 * receives [[r0, r1, ...], *extra] once every subtask has finished, and its result is the one a client
 * waiting on this task gets. No pool slot is held while the subtasks run, so with any number of processes
 * (even -c 1) every task that starts runs to its end without waiting for another: the tree of tasks is
 * finished by whichever process is free, and cannot deadlock, unlike a task blocking on .get().
 * Subtasks may be native or Python tasks (by name); so may the continuation. */

/* Declares a subtask: name (copied), args (array) and kwargs (object) stolen, NULL for empty.
 * Returns 0, or -1 on a bad argument (the references are released anyway). */
int task_subtask(struct task_ctx *ctx, const char *name, json_t *args, json_t *kwargs);
/* Ends the task with a continuation (see above): name copied, extra_args (array or NULL) stolen.
 * Returns TASK_REPLACED, which the task returns. */
enum task_outcome task_continue_with(struct task_ctx *ctx, const char *name, json_t *extra_args);

/* Whether the soft time limit has passed: cheap enough to call in an inner loop. */
static inline bool task_soft_time_limit_exceeded(const struct task_ctx *ctx)
{
    return ctx->soft_limit_flag && *ctx->soft_limit_flag;
}

/* Stores state (e.g. "PROGRESS") with meta (any JSON, borrowed; NULL is null) as the task's current result,
 * as Celery's Task.update_state does: a client sees it in AsyncResult.state / .info until the task ends.
 * Returns 0 once stored, -1 when it could not be (no result backend, Redis unreachable): progress is
 * best-effort, so a task normally goes on either way. */
int task_update_state(struct task_ctx *ctx, const char *state, json_t *meta);

/* Releases what task_fail, task_subtask and task_continue_with stored, leaving the request fields alone. */
void task_ctx_reset(struct task_ctx *ctx);

/* The registry: built-in tasks. Returns NULL for an unknown name. */
const struct task_def *task_registry_find(const char *name);
/* Calls fn(task, arg) for every registered task, in name order. */
void task_registry_each(void (*fn)(const struct task_def *task, void *arg), void *arg);

/* Binds the caller's args (array, borrowed) and kwargs (object, borrowed) to task->params and calls it.
 * A mismatch fails the task with TypeError worded as Python words it, e.g.
 * "add() missing 1 required positional argument: 'y'", "add() takes 2 positional arguments but 3 were given",
 * "add() got an unexpected keyword argument 'z'", "add() got multiple values for argument 'x'". */
enum task_outcome task_invoke(const struct task_def *task, struct task_ctx *ctx, json_t *args, json_t *kwargs,
                              json_t **result);

/* Binding details (tasks/task.c), fixed so that clients can rely on them:
 * - params grammar: comma-separated `name`, `name=default`, then optionally `*name`, then optionally `**name`.
 *   A default is a JSON literal (1, 2.5, "s", null, true, false; None/True/False are accepted too). Keyword-only
 *   parameters (after *args) are not supported. A malformed params string fails every call with SystemError.
 * - checks run in CPython 3.11's order: keywords first (unexpected / multiple values, in the kwargs' order),
 *   then too many positionals, then missing ones; the messages are CPython's, naming the part of the task
 *   name after the last '.'.
 * - args that is not an array, or kwargs not an object, is a TypeError ("add() argument after ** must be a
 *   mapping, not list"); NULL stands for an empty array / object.
 * - the task receives kwargs == NULL unless it declares **kwargs; then it gets the keywords that matched no
 *   named parameter (the caller's object itself when the task has no named parameters).
 * - when the task fails, *result is NULL; when a task returns TASK_FAILURE without calling task_fail, the
 *   failure is reported as SystemError so that a result is always well formed. */

/* Python's type name for a JSON value ("NoneType", "bool", "int", "float", "str", "list", "dict"), as used in
 * TypeError messages. value is borrowed; NULL is "NoneType". */
const char *task_pytype(const json_t *value);

/* The built-in tasks (tasks/builtins.c), listed in the registry table in tasks/registry.c. They expect the
 * bound-argument convention above and are exposed so that tests can call them directly. Numbers follow Python:
 * bool counts as an int (True + 1 == 2); ints are int64 and leaving that range is an OverflowError instead of
 * Python's big ints; a float result that is not finite (1e308 + 1e308) is an OverflowError too, because JSON
 * (and jansson) cannot carry inf. */
enum task_outcome task_builtin_noop(struct task_ctx *ctx, json_t *args, json_t *kwargs, json_t **result);
enum task_outcome task_builtin_add(struct task_ctx *ctx, json_t *args, json_t *kwargs, json_t **result);
enum task_outcome task_builtin_echo(struct task_ctx *ctx, json_t *args, json_t *kwargs, json_t **result);
enum task_outcome task_builtin_fib(struct task_ctx *ctx, json_t *args, json_t *kwargs, json_t **result);
enum task_outcome task_builtin_sleep_ms(struct task_ctx *ctx, json_t *args, json_t *kwargs, json_t **result);
enum task_outcome task_builtin_fail(struct task_ctx *ctx, json_t *args, json_t *kwargs, json_t **result);
enum task_outcome task_builtin_xsum(struct task_ctx *ctx, json_t *args, json_t *kwargs, json_t **result);
enum task_outcome task_builtin_incr(struct task_ctx *ctx, json_t *args, json_t *kwargs, json_t **result);
enum task_outcome task_builtin_retry_n(struct task_ctx *ctx, json_t *args, json_t *kwargs, json_t **result);
enum task_outcome task_builtin_fib_tree(struct task_ctx *ctx, json_t *args, json_t *kwargs, json_t **result);
enum task_outcome task_builtin_crash(struct task_ctx *ctx, json_t *args, json_t *kwargs, json_t **result);

/* Registers native.crash (off by default: `celeriac worker --enable-test-tasks`). Call before forking. */
void task_registry_enable_test_tasks(bool enabled);

#endif
