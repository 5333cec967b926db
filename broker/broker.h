/* broker: the message transport (task queues) and the result backend, behind one small interface.
 *
 * DESIGN. Everything here runs in the worker's main process, driven by its poll loop: the caller collects
 * file descriptors with *_pollfds, calls *_process when they are ready, and *_flush once per pass so that
 * every command issued during the pass goes out in one pipelined write. Nothing blocks except start-up and
 * the periodic visibility-timeout restore. Pool children never touch these connections.
 *
 * Redis transport (redis.c), interoperable with kombu's virtual transport (protocol doc section 3):
 *  - a server-side script pops up to N messages across the queue lists in kombu's order (priority 0 first,
 *    then the `SEP 3/6/9` sub-lists, queues round-robin) AND records each in `unacked`/`unacked_index` in
 *    kombu's format, atomically: there is no window in which a popped message exists only in our memory;
 *  - while the queues are empty, the worker waits for Redis's key-invalidation messages (CLIENT TRACKING
 *    in broadcast mode, on the queue names) instead of BRPOP, which would reopen that window; and, when it
 *    consumes a single queue, in a BLMOVE of that queue's list into its own inbox list on a third
 *    connection, which hands over the first message without the round trip of a fetch (the result latency
 *    of an idle worker). The message is delivered at once and settled when the pass of the main loop ends:
 *    acked by then (early ack: it went straight to a process), it only leaves the inbox (LTRIM); still held,
 *    it is recorded as unacked (the record script, or our own MULTI for a big one) before anything else is
 *    done with it; until then it is in the inbox, never only in our memory. The inbox
 *    is registered in `celeriac.inboxes` with its queue and a lease the worker renews: a worker puts its own
 *    inbox back on the queue when it connects, reconnects, cancels the wait or stops, and any worker puts
 *    back an inbox whose lease ran out (its owner was killed between the BLMOVE and the record). The BLMOVE
 *    may be lent (broker_handlers.lend_wait) to a pool process, which sends it on its own connection and runs
 *    what it takes at once; broker_wait_took / broker_wait_ended bring the outcome back, and the message is
 *    settled from the inbox exactly as the broker's own BLMOVE reply would be;
 *  - acks are coalesced into one ZREM and one HDEL per pass;
 *  - requeue (warm shutdown) and the visibility-timeout restore put messages back with `redelivered` set,
 *    only if their unacked record still exists, so a message is never restored twice.
 *  - defer (ETA tasks over the worker's cap) puts a message back unchanged at the far end of the priority list
 *    it came from, with the same guard.
 * Redis >= 6.2 is required (RPOP with a count, CLIENT TRACKING).
 *
 * AMQP transport (amqp.c, RabbitMQ), picked by an endpoint of kind BROKER_AMQP (transport.h has the ops table
 * both fill): messages are pushed by the broker within a basic.qos window that broker_fetch moves; ack is
 * basic.ack (coalesced per pass), requeue is basic.reject(requeue), defer publishes the message again to its
 * queue and acks the original; deliveries reach on_deliver as the same kombu envelope the Redis transport
 * hands over, so the worker decodes one format. There is no visibility timeout: the broker requeues what a
 * lost connection held. The result backend is Redis whatever the transport. */
#ifndef CELERIAC_BROKER_H
#define CELERIAC_BROKER_H

#include <poll.h>
#include <stdbool.h>
#include <stddef.h>

/* Which transport an endpoint names: broker_open and bus_open pick the implementation from it. */
enum broker_kind { BROKER_REDIS = 0, BROKER_AMQP };

/* Where a broker (Redis or RabbitMQ) is. All strings borrowed; they must outlive the object opened with it. */
struct broker_endpoint {
    const char *host;     /* NULL when socket is set */
    int port;
    const char *socket;   /* unix socket path, or NULL (Redis only) */
    const char *username; /* ACL user, or NULL */
    const char *password; /* or NULL */
    int db;
    const char *display;  /* the URL with the password redacted, for log lines */
    /* AMQP only (kind BROKER_AMQP; see amqp_broker.h for the URL that fills them). */
    enum broker_kind kind;
    const char *vhost;            /* "/" by default */
    bool tls;                     /* amqps:// */
    const char *ssl_ca_certs;     /* named after Celery's broker_use_ssl keys; NULL: none */
    const char *ssl_certfile;
    const char *ssl_keyfile;
    bool ssl_verify;              /* ssl_cert_reqs=CERT_REQUIRED (the default when ssl_ca_certs is set) */
    int heartbeat;                /* seconds; 0: none */
    int queue_max_priority;       /* x-max-priority for the queues the worker creates; 0: none */
};

/* Where the broker's log lines go: level as in worker/config.h (10 debug .. 50 critical); line borrowed. */
typedef void (*broker_log_fn)(int level, const char *line);
enum { BROKER_LOG_DEBUG = 10, BROKER_LOG_INFO = 20, BROKER_LOG_WARNING = 30, BROKER_LOG_ERROR = 40 };

/* A blocking connection with AUTH and SELECT done, for code that talks to Redis synchronously (a pool child
 * running native.incr). Returns the context (caller frees with redisFree) or NULL with err filled. */
struct redisContext;
struct redisContext *broker_connect_blocking(const struct broker_endpoint *ep, int timeout_ms, char *err,
                                            size_t errlen);

/* ---------------------------------------------------------------- transport */

struct broker;

/* One message taken from a queue and recorded as unacked. */
struct broker_delivery {
    char *tag;    /* owned: the key of its unacked record */
    char *raw;    /* owned: the message exactly as it was in the list */
    size_t len;
    bool raw_shared; /* raw is the MAP_SHARED mapping (len + 2 bytes) of the memfd raw_fd, also owned: a big
                      * message read straight into it, which the pool hands to its process as it is */
    int raw_fd;
    int queue;    /* index into the queue names given to broker_open */
    int priority; /* the priority step (0, 3, 6 or 9) of the list it was taken from; AMQP: the property */
    char *msg_id; /* owned or NULL: what identifies the message when it comes round again after broker_defer,
                   * where the tag does not (AMQP: a new delivery tag each time; this is the correlation id) */
};
void broker_delivery_free(struct broker_delivery *d); /* frees d and what it owns */
/* The message's identity across broker_defer: msg_id when set, else the tag. Borrowed from d. */
const char *broker_delivery_identity(const struct broker_delivery *d);
/* Whether the broker has taken d back by itself: AMQP requeues what a lost connection held, so a delivery of
 * an earlier connection will come again (and can no longer be acked). Never on Redis, where an unacked record
 * outlives connections. d borrowed. */
bool broker_delivery_lost(const struct broker *b, const struct broker_delivery *d);

struct broker_handlers {
    /* Takes ownership of d. Called from broker_process, in pop order. */
    void (*on_deliver)(void *arg, struct broker_delivery *d);
    /* Optional (Redis's idle wait): called instead of sending the BLMOVE `key` -> `inbox` (both borrowed for
     * the call), to let someone else send it on its own connection and read the reply (a pool process:
     * worker/lentwait.h). true: taken; then broker_wait_took or broker_wait_ended must follow. */
    bool (*lend_wait)(void *arg, const char *key, const char *inbox);
    /* Optional: the lent wait is needed back (the wait is cancelled: pause, a queue change, a lost
     * connection); end it soon. */
    void (*recall_wait)(void *arg);
};

struct broker_options {
    const char *const *queues; /* borrowed, nqueues names */
    size_t nqueues;
    double visibility_timeout; /* seconds: records older than this are restored by anyone (kombu's rule) */
    broker_log_fn log;
};

/* Connects (blocking, with a timeout), loads the scripts, sets up the wake-up channel and runs one
 * visibility restore. Returns the broker (free with broker_close) or NULL with err filled. */
struct broker *broker_open(const struct broker_endpoint *ep, const struct broker_options *opt,
                           const struct broker_handlers *h, void *arg, char *err, size_t errlen);
void broker_close(struct broker *b);

/* Fills up to max pollfds; returns how many. */
int broker_pollfds(struct broker *b, struct pollfd *fds, int max);
/* Handles the events on the pollfds broker_pollfds returned. A broken connection is logged and reopened
 * by broker_tick with backoff; meanwhile nothing is fetched and acks wait. Returns 0. */
int broker_process(struct broker *b, const struct pollfd *fds, int n);
/* Sends everything issued since the last flush. Returns 0. */
int broker_flush(struct broker *b);
bool broker_connected(const struct broker *b);
/* Timers: reconnection, polling fallback and the periodic visibility restore. now: epoch seconds. */
void broker_tick(struct broker *b, double now);
/* Milliseconds until broker_tick has something to do (for the poll timeout). */
int broker_next_tick_ms(const struct broker *b, double now);

/* Whether a fetch should be issued now: none is in flight and the queues may hold messages. */
bool broker_should_fetch(const struct broker *b);
/* Issues one fetch of up to max messages; deliveries arrive through on_deliver. On AMQP this moves the
 * basic.qos window by max, which may be negative (the window shrinks back when held ETA tasks leave); Redis
 * ignores max <= 0. */
void broker_fetch(struct broker *b, int max);
/* Stops taking messages (a warm shutdown begins): on AMQP the consumers are cancelled, so the broker stops
 * pushing; on Redis a waiting BLMOVE is cancelled (other fetches are pulled). */
void broker_pause(struct broker *b);
/* Number of messages the fetch in flight may still deliver (counts against prefetch). */
int broker_fetch_in_flight(const struct broker *b);
/* The part of it that is a wait for the next message (Redis's idle BLMOVE), answered only when one comes: not a
 * stalled broker. */
int broker_fetch_blocked(const struct broker *b);
/* The lent wait (broker_handlers.lend_wait) took raw[0..len) from the queue into the inbox: delivered now
 * through on_deliver, as the broker's own BLMOVE reply would be. raw_fd -1: raw borrowed (copied); else raw is
 * the MAP_SHARED mapping (len + 2 bytes) of the memfd raw_fd, both taken over (the delivery's raw_shared).
 * lend_over: the borrower does not wait again (else it does, and the wait stays lent). raw NULL: the borrower
 * cannot say what it took (it died): read from the inbox first (blocking, one round trip). */
void broker_wait_took(struct broker *b, const char *raw, size_t len, int raw_fd, bool lend_over);
/* The lent wait is over with nothing taken by its borrower: what it may have moved into the inbox is delivered
 * from there (or put back on the queue, when the wait was recalled). */
void broker_wait_ended(struct broker *b);
/* Commands issued (acks, requeues, ...) whose replies have not come yet, or that are not even sent yet. A warm
 * shutdown waits for this to reach 0 so that it does not close the connection with requeues still unwritten. */
size_t broker_pending(const struct broker *b);

/* Acknowledges (removes the unacked record of) a delivery: coalesced until the next flush. tag borrowed. */
void broker_ack(struct broker *b, const char *tag);
/* Refuses a delivery for good, as stock Celery does with a message it cannot use (unknown task, invalid
 * headers): AMQP basic.reject without requeue, so that a queue's dead-letter exchange gets it; on Redis, as in
 * kombu, the same as an ack. tag borrowed. */
void broker_reject(struct broker *b, const char *tag);
/* Puts a delivery back on its queue with redelivered=true, where it is consumed next, and removes its
 * unacked record, atomically, unless someone restored it already. d borrowed. */
void broker_requeue(struct broker *b, const struct broker_delivery *d);
/* Puts a delivery back on the list it was taken from, unchanged, at the far end (as if just published: the
 * messages queued behind it come first), and removes its unacked record, atomically, unless someone restored
 * it already. For messages taken but not wanted now (ETA tasks over --max-eta-reserved). expires: epoch seconds
 * at which the task expires (its expires header), 0 for never: on AMQP, where the message is published again, a
 * message that had a time to live (its expiration property, which Celery sets from expires) gets what is left of
 * it, not a fresh one. d borrowed. */
void broker_defer(struct broker *b, const struct broker_delivery *d, double expires);
/* Restores every unacked record older than the visibility timeout (kombu's mutex protocol), except the
 * ones this broker holds. Blocking; returns how many were restored, or -1. */
int broker_restore_visible(struct broker *b, double now);

const char *broker_errstr(const struct broker *b);

/* Remote control's add_consumer / cancel_consumer: start (or resume) and stop consuming from a queue. A
 * cancelled queue keeps its index (deliveries taken from it are still acked and requeued there). Both redo the
 * wake-up tracking, blocking for a round trip or two. add returns 0, or -1 past 63 queues (broker_errstr);
 * cancel returns 0, or -1 when the queue is not consumed. queue borrowed (copied). */
int broker_add_queue(struct broker *b, const char *queue);
int broker_cancel_queue(struct broker *b, const char *queue);
/* Every queue the broker knows, in order (index < broker_queue_count): its name (borrowed from b) and
 * whether it is consumed now. */
size_t broker_queue_count(const struct broker *b);
const char *broker_queue_name(const struct broker *b, size_t i, bool *consumed);

/* The Redis list that holds messages of `priority` for `queue`, as kombu names it: priorities are clamped to
 * 0..9 and rounded down to the steps 0, 3, 6, 9; step 0 is the queue name itself, the others append
 * "\x06\x16" and the step digit ("celery\x06\x163"). Writes at most dstlen bytes including the NUL;
 * returns the key length. */
size_t broker_priority_key(char *dst, size_t dstlen, const char *queue, int priority);

/* ---------------------------------------------------------------- result backend */

struct backend;

/* expires: seconds for SETEX; 0 stores with SET (no expiry). Returns NULL with err filled on failure. */
struct backend *backend_open(const struct broker_endpoint *ep, long expires, broker_log_fn log, char *err,
                             size_t errlen);
void backend_close(struct backend *be);
int backend_pollfds(struct backend *be, struct pollfd *fds, int max);
int backend_process(struct backend *be, const struct pollfd *fds, int n);
int backend_flush(struct backend *be);
const char *backend_errstr(const struct backend *be);
/* Reconnection after a lost connection, with backoff. now: epoch seconds. */
void backend_tick(struct backend *be, double now);
int backend_next_tick_ms(const struct backend *be, double now);
bool backend_connected(const struct backend *be);
/* Results handed to backend_store and not yet confirmed by Redis. */
size_t backend_pending(const struct backend *be);

/* Stores doc as celery-task-meta-<task_id> and PUBLISHes it (the PUBLISH wakes AsyncResult.get()).
 * task_id and doc are copied. done (may be NULL) is called once the server confirmed both (ok) or answered
 * with an error (not ok); a lost connection is not an answer: the result is sent again after reconnecting. */
typedef void (*backend_done_fn)(void *arg, bool ok);
void backend_store(struct backend *be, const char *task_id, const char *doc, size_t len, backend_done_fn done,
                   void *arg);

/* The revoked set in the result backend's Redis, for a broker that is not Redis (AMQP): the same sorted set as
 * bus_revoked_add / bus_revoked_load keep on a Redis broker (see rconn_revoked_add). */
void backend_revoked_add(struct backend *be, const char *key, const char *id, double now, double ttl, long max);
long backend_revoked_load(struct backend *be, const char *key, double now, double ttl,
                          void (*fn)(void *arg, const char *id, double when), void *arg);

#endif
