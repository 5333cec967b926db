/* canvas: what a finished task sends on, done in the pool child that ran it, the way a stock Celery 5 worker
 * does it (protocol doc 5.6-5.8, 6): the next link of a chain, link and link_error callbacks, its part of a
 * chord (the Redis result backend's join; the part that completes the header sends the body), a retry of
 * itself, and the chord a task hands its continuation to (task_continue_with in tasks/task.h).
 *
 * Child side only; talks to Redis synchronously on connections the executor owns. Routing of what it sends:
 * the signature's own queue / routing_key when it has one; else tasks registered in this worker go to
 * native_queue (the first queue it consumes) and others to default_queue, Celery's task_default_queue
 * ("celery"), where a stock Python worker normally listens. (A Python worker would apply its task_routes
 * here, which a C worker does not have.) */
#ifndef CELERIAC_CANVAS_H
#define CELERIAC_CANVAS_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>

#include "buf.h"
#include "message.h"

struct redisContext;

struct canvas_env {
    /* Blocking connections to the broker's and the result backend's databases; borrowed (owned by the
     * executor). NULL, with err filled, when unavailable (backend: also when none is configured). */
    struct redisContext *(*broker)(void *arg, char *err, size_t errlen);
    struct redisContext *(*backend)(void *arg, char *err, size_t errlen);
    void *arg;
    const char *origin;        /* the node name put in messages' origin header */
    const char *native_queue;  /* see above */
    const char *default_queue; /* see above */
    long result_expires;       /* seconds for the chord keys and stored documents; 0: no expiry */
    /* Replies still owed on the backend connection for commands sent without waiting (the clean-up after a
     * chord fired); the backend getter reads them before handing the connection out again. */
    int *backend_unread;
    /* Set when the broker is not Redis (AMQP): sends one message (a kombu envelope, borrowed) instead of the
     * LPUSH on broker(); returns 0 or -1 with err filled. NULL: Redis. */
    int (*publish)(void *arg, const char *msg, size_t len, char *err, size_t errlen);
};

/* Stores doc as the task's result (SETEX or SET, then PUBLISH, as every state is stored), synchronously.
 * Returns 0 or -1 with err filled. doc borrowed. */
int canvas_store(const struct canvas_env *env, const char *task_id, const struct buf *doc, char *err,
                 size_t errlen);

/* On success: sends the callbacks (args [retval] + their args) and the next chain link. Appends the ids of
 * the tasks sent to children (a JSON array, borrowed). embed and retval borrowed. Returns 0, or -1 with err
 * filled when something could not be sent. */
int canvas_on_success(const struct canvas_env *env, const struct msg_request *req, const json_t *embed,
                      const json_t *retval, json_t *children, char *err, size_t errlen);

/* On failure: stores the same FAILURE (exc_type, message, traceback) under the id of every remaining chain
 * element, and sends the errbacks with args [task id]. Returns 0 or -1 with err filled. */
int canvas_on_failure(const struct canvas_env *env, const struct msg_request *req, const json_t *embed,
                      const char *exc_type, const char *message, const char *traceback, char *err, size_t errlen);

/* When the request is a chord header part (a group and embed.chord): records its outcome in the join
 * (state "SUCCESS" with value = the return value, or "FAILURE" with value = the exception dict) and, when it
 * completes the header, sends the body with the results in header order, or stores ChordError for the body
 * when a part failed. No-op for other requests. Returns 0 or -1 with err filled. */
int canvas_chord_part(const struct canvas_env *env, const struct msg_request *req, const json_t *embed,
                      const char *state, const json_t *value, char *err, size_t errlen);

/* Sends the request again as its retry: same id, args, kwargs and embed, retries + 1, eta countdown seconds
 * ahead, to the queue it came from. Returns 0 or -1 with err filled. */
int canvas_retry(const struct canvas_env *env, const struct msg_request *req, const json_t *args,
                 const json_t *kwargs, const json_t *embed, double countdown, char *err, size_t errlen);

/* Replaces the request by a chord: the subtasks (array of signatures) as header, the continuation signature
 * as body running under the request's id and inheriting its group, chord, chain and callbacks. Returns 0 or
 * -1 with err filled. */
int canvas_replace(const struct canvas_env *env, const struct msg_request *req, const json_t *embed,
                   const json_t *subtasks, const json_t *continuation, char *err, size_t errlen);

#endif
