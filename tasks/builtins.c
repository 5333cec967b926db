/* builtins: the native tasks every celeriac worker offers. Names and meanings are fixed by the issue that
 * introduced them (clients and tests rely on them); the choices made where Python and JSON differ are listed in
 * task.h above the prototypes.
 *
 * Each runs in a pool child, called by task_invoke with its arguments already bound: args holds exactly one
 * value per declared parameter. */
#include "task.h"

#include <errno.h>
#include <hiredis/hiredis.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <signal.h>
#include <string.h>
#include <unistd.h>
#include <time.h>

#define FIB_MAX 92 /* fib(92) is the largest Fibonacci number that fits in int64 */

/* Stores a new JSON value as the result; a NULL from jansson can only mean it ran out of memory. */
static enum task_outcome succeed(struct task_ctx *ctx, json_t **result, json_t *value)
{
    if (!value)
        return task_fail(ctx, "MemoryError", "out of memory");
    *result = value;
    return TASK_SUCCESS;
}

/* Python's bool is an int subclass, so True and False take part in arithmetic as 1 and 0. */
static bool as_int(const json_t *v, long long *out)
{
    if (json_is_integer(v)) {
        *out = json_integer_value(v);
        return true;
    }
    if (json_is_boolean(v)) {
        *out = json_is_true(v) ? 1 : 0;
        return true;
    }
    return false;
}

static bool is_number(const json_t *v)
{
    return json_is_integer(v) || json_is_real(v) || json_is_boolean(v);
}

/* v must satisfy is_number. */
static double as_double(const json_t *v)
{
    long long i;
    if (as_int(v, &i))
        return (double)i;
    return json_real_value(v);
}

static enum task_outcome real_result(struct task_ctx *ctx, json_t **result, double value, const char *what)
{
    if (!isfinite(value))
        return task_fail(ctx, "OverflowError", "%s: float result out of range (JSON cannot carry inf)", what);
    return succeed(ctx, result, json_real(value));
}

enum task_outcome task_builtin_noop(struct task_ctx *ctx, json_t *args, json_t *kwargs, json_t **result)
{
    (void)ctx;
    (void)args;
    (void)kwargs;
    *result = NULL;
    return TASK_SUCCESS;
}

enum task_outcome task_builtin_add(struct task_ctx *ctx, json_t *args, json_t *kwargs, json_t **result)
{
    (void)kwargs;
    json_t *x = json_array_get(args, 0);
    json_t *y = json_array_get(args, 1);
    if (!is_number(x) || !is_number(y))
        return task_fail(ctx, "TypeError", "unsupported operand type(s) for +: '%s' and '%s'", task_pytype(x),
                         task_pytype(y));
    long long a, b, sum;
    if (as_int(x, &a) && as_int(y, &b)) {
        if (__builtin_add_overflow(a, b, &sum))
            return task_fail(ctx, "OverflowError", "add(): %lld + %lld does not fit in a 64-bit integer", a, b);
        return succeed(ctx, result, json_integer(sum));
    }
    return real_result(ctx, result, as_double(x) + as_double(y), "add()");
}

enum task_outcome task_builtin_echo(struct task_ctx *ctx, json_t *args, json_t *kwargs, json_t **result)
{
    json_t *obj = json_object();
    if (!obj)
        return task_fail(ctx, "MemoryError", "out of memory");
    /* json_object_set takes its own references, so the caller's containers are shared, not copied: the
     * values come back exactly as they arrived. */
    json_t *empty = NULL;
    int rc = json_object_set(obj, "args", args ? args : (empty = json_array()));
    json_decref(empty);
    empty = NULL;
    if (rc == 0)
        rc = json_object_set(obj, "kwargs", kwargs ? kwargs : (empty = json_object()));
    json_decref(empty);
    if (rc < 0) {
        json_decref(obj);
        return task_fail(ctx, "MemoryError", "out of memory");
    }
    return succeed(ctx, result, obj);
}

/* The classic CPU benchmark: deliberately exponential, do not memoize. */
static long long fib_naive(int n)
{
    return n < 2 ? n : fib_naive(n - 1) + fib_naive(n - 2);
}

/* The same, looking at the soft time limit above fib(24) only (~75,000 calls, ~0.1 ms, between looks), so
 * that the plain recursion below keeps its speed. -1 means "gave up". */
static long long fib_watched(int n, const struct task_ctx *ctx)
{
    if (n < 24)
        return fib_naive(n);
    if (task_soft_time_limit_exceeded(ctx))
        return -1;
    long long a = fib_watched(n - 1, ctx);
    if (a < 0)
        return -1;
    long long b = fib_watched(n - 2, ctx);
    return b < 0 ? -1 : a + b;
}

static enum task_outcome soft_limit_failure(struct task_ctx *ctx)
{
    return task_fail(ctx, "SoftTimeLimitExceeded", "soft time limit exceeded");
}

enum task_outcome task_builtin_fib(struct task_ctx *ctx, json_t *args, json_t *kwargs, json_t **result)
{
    (void)kwargs;
    json_t *v = json_array_get(args, 0);
    long long n;
    if (!as_int(v, &n))
        return task_fail(ctx, "TypeError", "'%s' object cannot be interpreted as an integer", task_pytype(v));
    if (n < 0 || n > FIB_MAX)
        return task_fail(ctx, "ValueError", "fib() argument must be between 0 and %d, got %lld", FIB_MAX, n);
    long long f = fib_watched((int)n, ctx);
    if (f < 0)
        return soft_limit_failure(ctx);
    return succeed(ctx, result, json_integer(f));
}

enum task_outcome task_builtin_sleep_ms(struct task_ctx *ctx, json_t *args, json_t *kwargs, json_t **result)
{
    (void)kwargs;
    json_t *v = json_array_get(args, 0);
    if (!is_number(v))
        return task_fail(ctx, "TypeError", "'%s' object cannot be interpreted as an integer", task_pytype(v));
    double ms = as_double(v);
    /* Python's time.sleep wording for the same mistake. */
    if (ms < 0)
        return task_fail(ctx, "ValueError", "sleep length must be non-negative");
    double secs = floor(ms / 1000.0);
    if (secs > (double)INT32_MAX)
        return task_fail(ctx, "OverflowError", "sleep length is too large");
    struct timespec req = {.tv_sec = (time_t)secs, .tv_nsec = (long)((ms - secs * 1000.0) * 1e6)};
    /* ms - secs * 1000 can land a hair outside [0, 1000) through rounding; nanosleep would refuse it. */
    if (req.tv_nsec < 0)
        req.tv_nsec = 0;
    if (req.tv_nsec > 999999999)
        req.tv_nsec = 999999999;
    struct timespec rem;
    /* A signal must not shorten the sleep the caller asked for, unless it is the soft time limit. */
    while (nanosleep(&req, &rem) < 0 && errno == EINTR) {
        if (task_soft_time_limit_exceeded(ctx))
            return soft_limit_failure(ctx);
        req = rem;
    }
    return succeed(ctx, result, json_incref(v));
}

enum task_outcome task_builtin_fail(struct task_ctx *ctx, json_t *args, json_t *kwargs, json_t **result)
{
    (void)kwargs;
    (void)result;
    json_t *v = json_array_get(args, 0);
    if (json_is_string(v))
        return task_fail(ctx, "ValueError", "%s", json_string_value(v));
    /* Python keeps a non-string argument as is and str()s it for the message; the scalars are written as
     * str() would, containers and floats as compact JSON (close, though not Python's spacing). */
    if (!v || json_is_null(v))
        return task_fail(ctx, "ValueError", "None");
    if (json_is_boolean(v))
        return task_fail(ctx, "ValueError", "%s", json_is_true(v) ? "True" : "False");
    if (json_is_integer(v))
        return task_fail(ctx, "ValueError", "%lld", (long long)json_integer_value(v));
    char *text = json_dumps(v, JSON_ENCODE_ANY | JSON_COMPACT);
    if (!text)
        return task_fail(ctx, "MemoryError", "out of memory");
    enum task_outcome out = task_fail(ctx, "ValueError", "%s", text);
    free(text);
    return out;
}

enum task_outcome task_builtin_xsum(struct task_ctx *ctx, json_t *args, json_t *kwargs, json_t **result)
{
    (void)kwargs;
    json_t *values = json_array_get(args, 0);
    if (!json_is_array(values)) {
        if (json_is_string(values) || json_is_object(values))
            return task_fail(ctx, "TypeError", "xsum() argument must be a list of numbers, not '%s'",
                             task_pytype(values));
        return task_fail(ctx, "TypeError", "'%s' object is not iterable", task_pytype(values));
    }
    /* Like CPython's sum(): exact integer accumulation until the first float, then float addition from left
     * to right. 128 bits cannot overflow on a list of int64 values, so only the final total is range-checked,
     * as Python (with big ints) would only see the end result. */
    __int128 itotal = 0;
    double ftotal = 0;
    bool is_float = false;
    size_t i;
    json_t *v;
    json_array_foreach(values, i, v) {
        long long n;
        if (!is_number(v))
            return task_fail(ctx, "TypeError", "unsupported operand type(s) for +: '%s' and '%s'",
                             is_float ? "float" : "int", task_pytype(v));
        if (!is_float && as_int(v, &n)) {
            itotal += n;
        } else if (!is_float) {
            is_float = true;
            ftotal = (double)itotal + json_real_value(v);
        } else {
            ftotal += as_double(v);
        }
    }
    if (is_float)
        return real_result(ctx, result, ftotal, "xsum()");
    if (itotal > INT64_MAX || itotal < INT64_MIN)
        return task_fail(ctx, "OverflowError", "xsum(): the total does not fit in a 64-bit integer");
    return succeed(ctx, result, json_integer((json_int_t)itotal));
}

/* Names the failure after the exception redis-py raises for the same error reply, and words it the same
 * (redis-py drops the error code for the codes it knows). */
static enum task_outcome fail_redis_error(struct task_ctx *ctx, const char *text)
{
    static const struct {
        const char *code;
        const char *exc_type;
    } codes[] = {
        {"ERR", "ResponseError"},          {"EXECABORT", "ExecAbortError"},   {"LOADING", "BusyLoadingError"},
        {"NOSCRIPT", "NoScriptError"},     {"READONLY", "ReadOnlyError"},     {"NOAUTH", "AuthenticationError"},
        {"NOPERM", "NoPermissionError"},
    };
    size_t len = strcspn(text, " ");
    for (size_t i = 0; i < sizeof codes / sizeof codes[0]; i++)
        if (strlen(codes[i].code) == len && strncmp(codes[i].code, text, len) == 0)
            return task_fail(ctx, codes[i].exc_type, "%s", text[len] ? text + len + 1 : "");
    return task_fail(ctx, "ResponseError", "%s", text);
}

enum task_outcome task_builtin_incr(struct task_ctx *ctx, json_t *args, json_t *kwargs, json_t **result)
{
    (void)kwargs;
    json_t *key = json_array_get(args, 0);
    char numkey[32];
    const char *k;
    size_t klen;
    /* redis-py's encoder accepts str and int keys and rejects the rest with this DataError. */
    if (json_is_string(key)) {
        k = json_string_value(key);
        klen = json_string_length(key);
    } else if (json_is_integer(key)) {
        klen = (size_t)snprintf(numkey, sizeof numkey, "%lld", (long long)json_integer_value(key));
        k = numkey;
    } else {
        return task_fail(ctx, "DataError",
                         "Invalid input of type: '%s'. Convert to a bytes, string, int or float first.",
                         task_pytype(key));
    }
    /* While Redis is briefly away (a restart, a dropped connection) the task waits and tries again, for up
     * to ctx->redis_retry_s or its soft time limit, rather than fail: what a redis-py client with retries does.
     * An INCR that ran but whose reply was lost may so count twice; it is never lost. */
    redisReply *reply = NULL;
    double waited = 0, pause = 0.05;
    for (;;) {
        struct redisContext *c = ctx->redis ? ctx->redis(ctx) : NULL;
        if (c) {
            reply = redisCommand(c, "INCR %b", k, klen);
            /* A Redis that restarted and is still loading its data is not ready rather than failed. */
            bool loading = reply && reply->type == REDIS_REPLY_ERROR && strncmp(reply->str, "LOADING", 7) == 0;
            if (reply && !(loading && waited < ctx->redis_retry_s))
                break;
            /* redis-py's wording. After an I/O error the context stays in its error state, so redis()
             * reconnects next time. */
            if (loading) {
                freeReplyObject(reply);
                reply = NULL;
                task_fail(ctx, "BusyLoadingError", "Redis is loading the dataset in memory");
            } else if (c->err == REDIS_ERR_EOF)
                task_fail(ctx, "ConnectionError", "Connection closed by server.");
            else
                task_fail(ctx, "ConnectionError", "Error while reading from socket: %s",
                          c->errstr[0] ? c->errstr : "connection lost");
        } else if (ctx->exc_type[0] == '\0') {
            task_fail(ctx, "ConnectionError", "no Redis connection is available to this task");
        }
        if (!ctx->redis || waited >= ctx->redis_retry_s || task_soft_time_limit_exceeded(ctx))
            return TASK_FAILURE;
        struct timespec ts = {(time_t)pause, (long)((pause - (double)(time_t)pause) * 1e9)};
        nanosleep(&ts, NULL);
        waited += pause;
        pause = pause * 2 > 1.0 ? 1.0 : pause * 2;
        task_ctx_reset(ctx);
        ctx->exc_type[0] = '\0';
    }
    enum task_outcome out;
    if (reply->type == REDIS_REPLY_ERROR)
        out = fail_redis_error(ctx, reply->str);
    else if (reply->type == REDIS_REPLY_INTEGER)
        out = succeed(ctx, result, json_integer(reply->integer));
    else
        out = task_fail(ctx, "ResponseError", "unexpected reply type %d to INCR", reply->type);
    freeReplyObject(reply);
    return out;
}

enum task_outcome task_builtin_crash(struct task_ctx *ctx, json_t *args, json_t *kwargs, json_t **result)
{
    (void)kwargs;
    (void)result;
    const char *how = json_string_value(json_array_get(args, 0));
    if (!how)
        return task_fail(ctx, "TypeError", "crash() argument must be a str");
    if (strcmp(how, "segfault") == 0) {
        /* The default action, so that a sanitizer's own SIGSEGV handler cannot turn it into an exit code. */
        signal(SIGSEGV, SIG_DFL);
        raise(SIGSEGV);
    } else if (strcmp(how, "abort") == 0) {
        signal(SIGABRT, SIG_DFL);
        abort();
    } else if (strcmp(how, "exit") == 0) {
        _exit(3);
    }
    return task_fail(ctx, "ValueError", "crash() argument must be 'segfault', 'abort' or 'exit', not '%s'", how);
}

enum task_outcome task_builtin_retry_n(struct task_ctx *ctx, json_t *args, json_t *kwargs, json_t **result)
{
    (void)kwargs;
    long long n, max_retries = -1; /* None: no limit, as in Celery */
    json_t *max = json_array_get(args, 1);
    if (!as_int(json_array_get(args, 0), &n) || (!json_is_null(max) && !as_int(max, &max_retries)))
        return task_fail(ctx, "TypeError", "retry_n() arguments must be integers");
    if (ctx->retries < n)
        return task_retry(ctx, 0.1, max_retries, NULL, NULL);
    return succeed(ctx, result, json_integer(n));
}

/* fib(n) as a tree of tasks: each node above the cutoff hands its two halves to subtasks and its sum to a
 * continuation, so it never waits (see "DEPENDENCIES WITHOUT WAITING" in task.h). */
enum task_outcome task_builtin_fib_tree(struct task_ctx *ctx, json_t *args, json_t *kwargs, json_t **result)
{
    (void)kwargs;
    long long n, cutoff;
    if (!as_int(json_array_get(args, 0), &n) || !as_int(json_array_get(args, 1), &cutoff))
        return task_fail(ctx, "TypeError", "fib_tree() arguments must be integers");
    if (n < 0 || n > FIB_MAX)
        return task_fail(ctx, "ValueError", "fib_tree() argument must be between 0 and %d, got %lld", FIB_MAX, n);
    if (n <= cutoff || n < 2) {
        long long f = fib_watched((int)n, ctx);
        if (f < 0)
            return soft_limit_failure(ctx);
        return succeed(ctx, result, json_integer(f));
    }
    task_subtask(ctx, "native.fib_tree", json_pack("[I, I]", n - 1, cutoff), NULL);
    task_subtask(ctx, "native.fib_tree", json_pack("[I, I]", n - 2, cutoff), NULL);
    return task_continue_with(ctx, "native.xsum", NULL);
}
