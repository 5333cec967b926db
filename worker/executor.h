/* executor: runs one task message inside a pool child: message bytes -> result document.
 * Child-process side only; owns the child's lazily opened Redis connection for tasks that need one. */
#ifndef CELERIAC_EXECUTOR_H
#define CELERIAC_EXECUTOR_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "broker.h"
#include "buf.h"

struct executor;

struct executor_options {
    const char *hostname;                  /* the worker's node name */
    const struct broker_endpoint *redis;   /* the broker's Redis: for tasks and for the messages tasks send on
                                            * (chains, retries, subtasks); NULL: neither */
    const struct broker_endpoint *backend; /* the result backend: chord joins, progress states; NULL: none */
    long result_expires;                   /* seconds; 0: stored without expiry */
    double soft_time_limit;                /* seconds, for messages that set none (0: none) */
    const char *native_queue;              /* where the tasks it sends go (see canvas.h) */
    const char *default_queue;
    /* In memory shared with the main process: the seq of the task running now (0 between tasks) and the seq
     * of a running task revoked without terminate (task_should_stop); NULL: no revocation while running. */
    const uint64_t *running_seq;
    const uint64_t *revoke_seq;
};

/* Everything in opt borrowed; it must outlive the executor. Free with executor_free. */
struct executor *executor_new(const struct executor_options *opt);
void executor_free(struct executor *ex);

/* Decodes and runs raw[0..len), then sends on what the task's workflow asks for (canvas.h). Appends to doc
 * the result document to store (nothing when the request has ignore_result, or when the task handed its
 * result over to a continuation) and to summary a repr for the log line; sets *runtime (seconds). Returns
 * what became of the task. Never fails itself: a bad message becomes a FAILURE document when its id is
 * known. soft_time_limit: the task type's limit (time_limit control), used when the message sets none; 0: the
 * default from executor_options. */
enum executor_status {
    EXECUTOR_SUCCEEDED = 0, /* also a task that handed its result over to a continuation */
    EXECUTOR_FAILED = 1,
    EXECUTOR_RETRIED = 2,   /* sent again with an eta; state RETRY stored */
};
enum executor_status executor_run(struct executor *ex, const char *raw, size_t len, double soft_time_limit,
                                  struct buf *doc, struct buf *summary, double *runtime);

/* The task id of the message executor_run last ran ("" if it had none). Borrowed until the next run. */
const char *executor_last_task_id(const struct executor *ex);
/* A process that ran a big message keeps its decoding buffer for the next one (message.h). executor_idle_ms:
 * how long the caller may wait for work before calling executor_idle, which frees it; -1: no limit. */
int executor_idle_ms(const struct executor *ex);
void executor_idle(struct executor *ex);

/* The exception type a client sees for a message that msg_decode refused with msg_status:
 * ContentDisallowed, DecodeError or InvalidTaskError. */
const char *executor_decode_exc_type(int msg_status);

#endif
