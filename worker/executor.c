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

#include "amqp_broker.h"
#include "canvas.h"
#include "log.h"
#include "message.h"
#include "outgoing.h"
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
    struct executor_options opt;
    redisContext *conn;         /* the broker's Redis: opened on first use, reopened after an error */
    redisContext *backend_conn; /* the result backend: the same */
    struct amqp_producer *producer; /* an AMQP broker's (opt.redis of kind BROKER_AMQP): the same */
    int backend_unread;         /* replies owed on backend_conn (see canvas_env) */
    struct canvas_env canvas;
    char last_id[256];          /* the id of the message last run */
    const struct msg_request *current; /* the request being run (for update_state), else NULL */
};

/* A blocking connection kept in *slot, reopened when the last one broke. */
static redisContext *connection(redisContext **slot, const struct broker_endpoint *ep, char *err, size_t errlen)
{
    if (*slot && (*slot)->err) {
        redisFree(*slot);
        *slot = NULL;
    }
    if (!*slot && ep)
        *slot = broker_connect_blocking(ep, 5000, err, errlen);
    else if (!ep)
        snprintf(err, errlen, "no Redis configured for this");
    return *slot;
}

static redisContext *canvas_broker(void *arg, char *err, size_t errlen)
{
    struct executor *ex = arg;
    return connection(&ex->conn, ex->opt.redis, err, errlen);
}

static redisContext *canvas_backend(void *arg, char *err, size_t errlen)
{
    struct executor *ex = arg;
    if (!ex->opt.backend) {
        snprintf(err, errlen, "no result backend is configured");
        return NULL;
    }
    redisContext *c = connection(&ex->backend_conn, ex->opt.backend, err, errlen);
    for (; c && ex->backend_unread > 0; ex->backend_unread--) {
        void *r = NULL;
        if (redisGetReply(c, &r) != REDIS_OK)
            break; /* the connection is reopened on its next use */
        freeReplyObject(r);
    }
    if (!c || c->err)
        ex->backend_unread = 0;
    return c && !c->err ? c : connection(&ex->backend_conn, ex->opt.backend, err, errlen);
}

/* canvas_env.publish on an AMQP broker: one retry on a fresh connection (a broker restart between tasks), so a
 * message may go out twice, never not at all, as with the Redis outbox. */
static int canvas_publish(void *arg, const char *msg, size_t len, char *err, size_t errlen)
{
    struct executor *ex = arg;
    for (int attempt = 0; attempt < 2; attempt++) {
        if (!ex->producer)
            ex->producer = amqp_producer_open(ex->opt.redis, err, errlen);
        if (!ex->producer)
            continue;
        if (amqp_producer_publish(ex->producer, msg, len, err, errlen) == 0)
            return 0;
        amqp_producer_close(ex->producer);
        ex->producer = NULL;
    }
    return -1;
}

static bool broker_is_amqp(const struct executor_options *opt)
{
    return opt->redis && opt->redis->kind == BROKER_AMQP;
}

struct executor *executor_new(const struct executor_options *opt)
{
    struct executor *ex = calloc(1, sizeof *ex);
    if (!ex)
        abort();
    ex->opt = *opt;
    msg_spare_keep(); /* executors run in pool processes, which release it when idle (executor_idle) */
    ex->canvas = (struct canvas_env){canvas_broker,     canvas_backend,     ex, opt->hostname, opt->native_queue,
                                     opt->default_queue, opt->result_expires, &ex->backend_unread,
                                     broker_is_amqp(opt) ? canvas_publish : NULL};
    /* No SA_RESTART: a task blocked in a system call (sleep, read) must wake up to notice the limit. */
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_soft_limit;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGALRM, &sa, NULL);
    return ex;
}

void executor_free(struct executor *ex)
{
    if (!ex)
        return;
    if (ex->conn)
        redisFree(ex->conn);
    if (ex->backend_conn)
        redisFree(ex->backend_conn);
    amqp_producer_close(ex->producer);
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

/* The Redis a task talks to (native.incr): the broker's, or the result backend's when the broker is not Redis,
 * as the built-in's contract says. */
static redisContext *task_redis(struct task_ctx *ctx)
{
    struct executor *ex = ctx->host;
    char err[256];
    if (broker_is_amqp(&ex->opt)) {
        redisContext *c = canvas_backend(ex, err, sizeof err);
        if (!c)
            task_fail(ctx, "ConnectionError", "%s", err);
        return c;
    }
    if (!ex->opt.redis) {
        task_fail(ctx, "ConnectionError", "this worker has no Redis for tasks");
        return NULL;
    }
    redisContext *c = connection(&ex->conn, ex->opt.redis, err, sizeof err);
    if (!c)
        task_fail(ctx, "ConnectionError", "%s", err);
    return c;
}

/* Feeds jansson a body with one argument's text replaced by null (see task_raw_arg_locate). */
struct body_parts {
    const char *part[3];
    size_t len[3];
    int at;
};

static size_t next_part(void *buffer, size_t buflen, void *data)
{
    struct body_parts *b = data;
    while (b->at < 3 && b->len[b->at] == 0)
        b->at++;
    if (b->at == 3)
        return 0;
    size_t n = b->len[b->at] < buflen ? b->len[b->at] : buflen;
    memcpy(buffer, b->part[b->at], n);
    b->part[b->at] += n;
    b->len[b->at] -= n;
    return n;
}

static json_t *load_without(const char *body, size_t len, size_t start, size_t end, json_error_t *err)
{
    struct body_parts b = {{body, "null", body + end}, {start, 4, len - end}, 0};
    return json_load_callback(next_part, &b, JSON_ALLOW_NUL, err);
}

/* The main process stamps the seq of a running task it was asked to revoke (without terminate) in memory
 * shared with this process; the task is the one revoked when that matches the seq running now. */
static bool task_revoked_impl(const struct task_ctx *ctx)
{
    const struct executor *ex = ctx->host;
    uint64_t running = __atomic_load_n(ex->opt.running_seq, __ATOMIC_ACQUIRE);
    return running && __atomic_load_n(ex->opt.revoke_seq, __ATOMIC_ACQUIRE) == running;
}

static int task_update_state_impl(struct task_ctx *ctx, const char *state, json_t *meta)
{
    struct executor *ex = ctx->host;
    const struct msg_request *req = ex->current;
    if (!state || !req->id.s)
        return -1;
    struct buf doc = {0};
    struct result_meta m = {.task_id = req->id.s, .group_id = req->group.s, .parent_id = req->parent_id.s};
    result_doc_state(&doc, &m, state, meta);
    char err[256];
    int rc = canvas_store(&ex->canvas, req->id.s, &doc, err, sizeof err);
    buf_free(&doc);
    return rc;
}

static void fail_doc(struct buf *doc, struct buf *summary, const struct msg_request *req, const char *exc_type,
                     const char *message)
{
    /* Stored even with ignore_result, as stock Celery does: that flag only skips SUCCESS (mark_as_failure
     * does not look at it), so a client waiting on the task still learns that it failed. */
    if (req->id.s) {
        struct buf tb = {0};
        result_traceback(&tb, req->task.s ? req->task.s : "?", exc_type, message);
        struct result_meta meta = {.task_id = req->id.s, .group_id = req->group.s, .parent_id = req->parent_id.s};
        /* A task that noticed its revocation (task_stop) ends as a revoked task does, in state REVOKED. */
        const char *state = strcmp(exc_type, "TaskRevokedError") == 0 ? "REVOKED" : "FAILURE";
        result_doc_exception(doc, &meta, state, exc_type, message, tb.data, epoch_now());
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

static void log_canvas_error(const struct msg_request *req, const char *err)
{
    char label[256];
    msg_label(req, label, sizeof label);
    log_error("Task %s: could not send on its workflow: %s", label, err);
}

/* A failed task: its FAILURE document, then what its workflow does on failure (the rest of a chain fails,
 * errbacks run, a chord learns of it). */
static void finish_failure(struct executor *ex, struct buf *doc, struct buf *summary, const struct msg_request *req,
                           const json_t *embed, const char *exc_type, const char *message)
{
    fail_doc(doc, summary, req, exc_type, message);
    if (!json_is_object(embed))
        return;
    char err[256];
    struct buf tb = {0};
    result_traceback(&tb, req->task.s ? req->task.s : "?", exc_type, message);
    if (canvas_on_failure(&ex->canvas, req, embed, exc_type, message, tb.data, err, sizeof err) < 0)
        log_canvas_error(req, err);
    buf_free(&tb);
    json_t *exc = json_pack("{s:s, s:[s], s:s}", "exc_type", exc_type, "exc_message", message ? message : "",
                            "exc_module", result_exc_module(exc_type));
    if (canvas_chord_part(&ex->canvas, req, embed, "FAILURE", exc, err, sizeof err) < 0)
        log_canvas_error(req, err);
    json_decref(exc);
}

/* A task that succeeded: callbacks and the next chain link go out before its result is stored (so that the
 * document lists them as children, as stock Celery's does); its chord part after. Returns false when the
 * workflow could not be sent on, which fails the task (a chain must not stop silently). */
static bool finish_success(struct executor *ex, struct buf *doc, struct buf *summary, const struct msg_request *req,
                           const json_t *embed, const json_t *result)
{
    char err[256];
    json_t *children = json_array();
    if (json_is_object(embed) && canvas_on_success(&ex->canvas, req, embed, result, children, err, sizeof err) < 0) {
        log_canvas_error(req, err);
        json_decref(children);
        finish_failure(ex, doc, summary, req, embed, "ConnectionError", err);
        return false;
    }
    size_t n = json_array_size(children);
    const char **ids = n ? calloc(n, sizeof *ids) : NULL;
    for (size_t i = 0; i < n; i++)
        ids[i] = json_string_value(json_array_get(children, i));
    if (!req->ignore_result) {
        struct result_meta meta = {.task_id = req->id.s, .group_id = req->group.s, .parent_id = req->parent_id.s, .children = ids, .nchildren = n};
        result_doc_success(doc, &meta, result, epoch_now());
    }
    free(ids);
    json_decref(children);
    result_pyrepr(summary, result, 1024);
    if (json_is_object(embed) && canvas_chord_part(&ex->canvas, req, embed, "SUCCESS", result, err, sizeof err) < 0)
        log_canvas_error(req, err);
    return true;
}

/* A task that asked for a retry: the same message again with an eta, and state RETRY; or, past max_retries,
 * the failure Celery reports then. Returns false when the task ends failed. */
static bool finish_retry(struct executor *ex, struct buf *doc, struct buf *summary, const struct msg_request *req,
                         const json_t *args, const json_t *kwargs, const json_t *embed, const struct task_ctx *ctx)
{
    const char *exc_type = ctx->exc_type[0] ? ctx->exc_type : NULL;
    if (ctx->retry_max >= 0 && req->retries >= ctx->retry_max) {
        if (exc_type) {
            finish_failure(ex, doc, summary, req, embed, exc_type, ctx->exc_message);
        } else {
            struct buf msg = {0}, a = {0}, k = {0};
            outgoing_argsrepr(&a, args);
            result_pyrepr(&k, kwargs, 1024);
            buf_printf(&msg, "Can't retry %s[%s] args:%s kwargs:%s", req->task.s, req->id.s ? req->id.s : "?",
                       a.data, k.data);
            finish_failure(ex, doc, summary, req, embed, "MaxRetriesExceededError", msg.data);
            buf_free(&msg);
            buf_free(&a);
            buf_free(&k);
        }
        return false;
    }
    char err[256];
    if (!req->id.s || canvas_retry(&ex->canvas, req, args, kwargs, embed, ctx->retry_countdown, err, sizeof err) < 0) {
        if (!req->id.s)
            snprintf(err, sizeof err, "a message without an id cannot be retried");
        finish_failure(ex, doc, summary, req, embed, "ConnectionError", err);
        return false;
    }
    /* celery.exceptions.Retry's text: "Retry in 0.1s" or "Retry in 0.1s: KeyError('again')". */
    struct buf why = {0}, tb = {0};
    buf_printf(&why, "Retry in %gs", ctx->retry_countdown);
    if (exc_type) {
        buf_append_str(&why, ": ");
        result_exc_repr(&why, exc_type, ctx->exc_message);
    }
    result_traceback(&tb, req->task.s, "celery.exceptions.Retry", why.data);
    struct result_meta meta = {.task_id = req->id.s, .group_id = req->group.s, .parent_id = req->parent_id.s};
    result_doc_exception(doc, &meta, "RETRY", exc_type, ctx->exc_message, tb.data, epoch_now());
    buf_append_str(summary, why.data);
    buf_free(&why);
    buf_free(&tb);
    return true;
}

const char *executor_last_task_id(const struct executor *ex)
{
    return ex->last_id;
}

/* Covers the gap between the tasks of an import sent as a stream of big messages: the client's own .delay() of a
 * 1,000,000-row list takes 1.5-2 s, so 2 s let the buffer go between two such tasks at times. */
#define SPARE_IDLE_MS 10000

int executor_idle_ms(const struct executor *ex)
{
    (void)ex;
    return msg_spare_held() ? SPARE_IDLE_MS : -1;
}

void executor_idle(struct executor *ex)
{
    (void)ex;
    msg_spare_release();
}

enum executor_status executor_run(struct executor *ex, const char *raw, size_t len, double soft_time_limit,
                                  struct buf *doc, struct buf *summary, double *runtime)
{
    struct msg_request req = {0};
    char err[256] = "";
    bool failed = true, retried = false;
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
    const struct task_def *task = task_registry_find(req.task.s);
    size_t raw_start = 0, raw_end = 0;
    bool raw_arg = task && task_raw_arg_locate(task, req.body, req.body_len, &raw_start, &raw_end);
    body = raw_arg ? load_without(req.body, req.body_len, raw_start, raw_end, &jerr)
               : json_loadb(req.body, req.body_len, JSON_ALLOW_NUL, &jerr);
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

    if (!task) {
        fail_doc(doc, summary, &req, "NotRegistered", req.task.s);
        goto out;
    }
    struct task_ctx ctx = {
        .task_id = req.id.s,
        .task_name = req.task.s,
        .hostname = ex->opt.hostname,
        .retries = req.retries,
        .redis = task_redis,
        .host = ex,
        .redis_retry_s = ex->opt.redis ? 30.0 : 0, /* rides out a Redis restart rather than failing the task */
        .update_state = ex->opt.backend ? task_update_state_impl : NULL,
        .revoked = ex->opt.revoke_seq ? task_revoked_impl : NULL,
        .raw_text = raw_arg ? req.body + raw_start : NULL,
        .raw_len = raw_end - raw_start,
    };
    ex->current = &req;
    /* Celery's precedence: the message's own limit, then the task type's (time_limit control), then the
     * worker's default. */
    double soft = req.has_soft_time_limit ? req.soft_time_limit
                  : soft_time_limit > 0   ? soft_time_limit
                                          : ex->opt.soft_time_limit;
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
    ex->current = NULL;
    const json_t *embed = json_is_array(body) ? json_array_get(body, 2) : body; /* v1 keeps them in the body */
    switch (outcome) {
    case TASK_SUCCESS:
        failed = !finish_success(ex, doc, summary, &req, embed, result);
        break;
    case TASK_RETRY:
        failed = !finish_retry(ex, doc, summary, &req, args, kwargs, embed, &ctx);
        retried = !failed;
        break;
    case TASK_REPLACED: {
        char why[256];
        if (canvas_replace(&ex->canvas, &req, embed, ctx.subtasks, ctx.continuation, why, sizeof why) < 0) {
            finish_failure(ex, doc, summary, &req, embed, "ConnectionError", why);
            failed = true;
        } else {
            failed = false;
            buf_printf(summary, "continued by %s with %zu subtask(s)",
                       json_string_value(json_object_get(ctx.continuation, "task")), json_array_size(ctx.subtasks));
        }
        break;
    }
    default:
        finish_failure(ex, doc, summary, &req, embed, ctx.exc_type[0] ? ctx.exc_type : "RuntimeError",
                       ctx.exc_message ? ctx.exc_message : "");
        break;
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
    return failed ? EXECUTOR_FAILED : retried ? EXECUTOR_RETRIED : EXECUTOR_SUCCEEDED;
}
