/* Runs in pool children only (see pool.h). */
#include "executor.h"

#include <hiredis/hiredis.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <errno.h>
#include <time.h>

#include "message.h"
#include "result.h"
#include "task.h"

/* Set by SIGALRM when the running task's soft time limit passes. A signal handler can only reach
 * process-wide state, and a child runs one task at a time, so one flag per process is exact. */
static volatile sig_atomic_t soft_limit_passed;

static void on_soft_limit(int sig)
{
    (void)sig;
    soft_limit_passed = 1;
}

struct executor {
    double soft_time_limit;
    const char *hostname;
    const struct broker_endpoint *redis; /* NULL: tasks get no Redis */
    redisContext *conn;                  /* opened on first use, reopened after an error */
    char last_id[256];                   /* the id of the message last run */
};

struct executor *executor_new(const char *hostname, const struct broker_endpoint *redis, double soft_time_limit)
{
    struct executor *ex = calloc(1, sizeof *ex);
    if (!ex)
        abort();
    ex->soft_time_limit = soft_time_limit;
    /* No SA_RESTART: a task blocked in a system call (sleep, read) must wake up to notice the limit. */
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_soft_limit;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGALRM, &sa, NULL);
    ex->hostname = hostname;
    ex->redis = redis;
    return ex;
}

void executor_free(struct executor *ex)
{
    if (!ex)
        return;
    if (ex->conn)
        redisFree(ex->conn);
    free(ex);
}

const char *executor_decode_exc_type(int msg_status)
{
    switch (msg_status) {
    case MSG_ERR_CONTENT_TYPE: return "ContentDisallowed";
    case MSG_ERR_BODY_ENCODING: return "DecodeError";
    default: return "InvalidTaskError";
    }
}

static double epoch_now(void)
{
    struct timeval tv;
    gettimeofday(&tv, NULL);
    return (double)tv.tv_sec + tv.tv_usec / 1e6;
}

static double monotonic(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static redisContext *task_redis(struct task_ctx *ctx)
{
    struct executor *ex = ctx->host;
    if (!ex->redis) {
        task_fail(ctx, "ConnectionError", "this worker has no Redis for tasks (the broker is not Redis)");
        return NULL;
    }
    if (ex->conn && ex->conn->err) {
        redisFree(ex->conn);
        ex->conn = NULL;
    }
    if (ex->conn)
        return ex->conn;
    char err[256];
    ex->conn = broker_connect_blocking(ex->redis, 5000, err, sizeof err);
    if (!ex->conn)
        task_fail(ctx, "ConnectionError", "%s", err);
    return ex->conn;
}

static void fail_doc(struct buf *doc, struct buf *summary, const struct msg_request *req, const char *exc_type,
                     const char *message)
{
    /* Stored even with ignore_result, as stock Celery does: that flag only skips SUCCESS (mark_as_failure
     * does not look at it), so a client waiting on the task still learns that it failed. */
    if (req->id.s) {
        struct buf tb = {0};
        result_traceback(&tb, req->task.s ? req->task.s : "?", exc_type, message);
        struct result_meta meta = {req->id.s, req->group.s, req->parent_id.s};
        result_doc_exception(doc, &meta, "FAILURE", exc_type, message, tb.data, epoch_now());
        buf_free(&tb);
    }
    result_exc_repr(summary, exc_type, message);
}

/* The positional and keyword arguments of a v2 body [args, kwargs, embed], a hybrid v2 body or a v1 body
 * ({"args": ..., "kwargs": ...}). Borrowed from body. Returns 0 or -1 with err filled. */
static int body_arguments(json_t *body, json_t **args, json_t **kwargs, char *err, size_t errlen)
{
    if (json_is_array(body)) {
        *args = json_array_get(body, 0);
        *kwargs = json_array_get(body, 1);
    } else if (json_is_object(body)) {
        *args = json_object_get(body, "args");
        *kwargs = json_object_get(body, "kwargs");
    } else {
        snprintf(err, errlen, "task body must be a list [args, kwargs, embed] or an object");
        return -1;
    }
    if (*args && !json_is_array(*args) && !json_is_null(*args)) {
        snprintf(err, errlen, "task args must be a list");
        return -1;
    }
    if (*kwargs && !json_is_object(*kwargs) && !json_is_null(*kwargs)) {
        snprintf(err, errlen, "task kwargs must be a dict");
        return -1;
    }
    return 0;
}

const char *executor_last_task_id(const struct executor *ex)
{
    return ex->last_id;
}

bool executor_run(struct executor *ex, const char *raw, size_t len, struct buf *doc, struct buf *summary,
                  double *runtime)
{
    struct msg_request req = {0};
    char err[256] = "";
    bool failed = true;
    json_t *body = NULL, *empty_args = NULL, *empty_kwargs = NULL, *result = NULL;
    double t0 = monotonic();
    *runtime = 0;

    int rc = msg_decode(raw, len, 0, &req, err, sizeof err);
    snprintf(ex->last_id, sizeof ex->last_id, "%s", req.id.s && req.id.len < sizeof ex->last_id ? req.id.s : "");
    if (rc != MSG_OK) {
        fail_doc(doc, summary, &req, executor_decode_exc_type(rc), err);
        goto out;
    }
    json_error_t jerr;
    body = json_loadb(req.body, req.body_len, JSON_ALLOW_NUL, &jerr);
    if (!body) {
        if (json_error_code(&jerr) == json_error_numeric_overflow) {
            /* Python ints are unbounded; native tasks take int64, so say what Python would for a C long. */
            snprintf(err, sizeof err, "task argument out of the 64-bit integer range: %s", jerr.text);
            fail_doc(doc, summary, &req, "OverflowError", err);
            goto out;
        }
        snprintf(err, sizeof err, "task body is not valid JSON: %s (line %d, column %d)", jerr.text, jerr.line,
                 jerr.column);
        fail_doc(doc, summary, &req, "DecodeError", err);
        goto out;
    }
    json_t *args = NULL, *kwargs = NULL;
    if (body_arguments(body, &args, &kwargs, err, sizeof err) < 0) {
        fail_doc(doc, summary, &req, "InvalidTaskError", err);
        goto out;
    }
    if (!json_is_array(args))
        args = empty_args = json_array();
    if (!json_is_object(kwargs))
        kwargs = empty_kwargs = json_object();

    const struct task_def *task = task_registry_find(req.task.s);
    if (!task) {
        fail_doc(doc, summary, &req, "NotRegistered", req.task.s);
        goto out;
    }
    struct task_ctx ctx = {
        .task_id = req.id.s,
        .task_name = req.task.s,
        .hostname = ex->hostname,
        .retries = req.retries,
        .redis = task_redis,
        .host = ex,
        .redis_retry_s = ex->redis ? 30.0 : 0, /* rides out a Redis restart rather than failing the task */
    };
    double soft = req.has_soft_time_limit ? req.soft_time_limit : ex->soft_time_limit;
    if (soft > 0) {
        soft_limit_passed = 0;
        ctx.soft_limit_flag = &soft_limit_passed;
        struct itimerval it = {{0, 0}, {(time_t)soft, (suseconds_t)((soft - (double)(time_t)soft) * 1e6)}};
        if (!it.it_value.tv_sec && !it.it_value.tv_usec)
            it.it_value.tv_usec = 1;
        setitimer(ITIMER_REAL, &it, NULL);
    }
    enum task_outcome outcome = task_invoke(task, &ctx, args, kwargs, &result);
    *runtime = monotonic() - t0;
    if (soft > 0) {
        struct itimerval off = {{0, 0}, {0, 0}};
        setitimer(ITIMER_REAL, &off, NULL);
        if (soft_limit_passed && outcome == TASK_SUCCESS) {
            /* In Python the exception is raised inside the task at the limit; a native task that ran past it
             * without looking fails the same way, so the outcome does not depend on how it is written. */
            json_decref(result);
            result = NULL;
            outcome = task_fail(&ctx, "SoftTimeLimitExceeded", "soft time limit exceeded");
        }
    }
    if (outcome == TASK_SUCCESS) {
        failed = false;
        if (!req.ignore_result) {
            struct result_meta meta = {req.id.s, req.group.s, req.parent_id.s};
            result_doc_success(doc, &meta, result, epoch_now());
        }
        result_pyrepr(summary, result, 1024);
    } else {
        fail_doc(doc, summary, &req, ctx.exc_type[0] ? ctx.exc_type : "RuntimeError",
                 ctx.exc_message ? ctx.exc_message : "");
    }
    task_ctx_reset(&ctx);
out:
    if (*runtime == 0)
        *runtime = monotonic() - t0;
    json_decref(result);
    json_decref(body);
    json_decref(empty_args);
    json_decref(empty_kwargs);
    msg_request_clear(&req);
    return failed;
}
