/* consumer_int: the main loop's state, shared by consumer.c (the loop: fetching, dispatching, results, events,
 * health) and remote.c (the remote-control commands, which read and steer that state). Private to those two
 * files; everything else goes through consumer.h. Main process only. */
#ifndef CELERIAC_CONSUMER_INT_H
#define CELERIAC_CONSUMER_INT_H

#include <jansson.h>
#include <signal.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "amqp_broker.h"
#include "broker.h"
#include "config.h"
#include "message.h"
#include "pubsub.h"
#include "task.h"

#define REVOKED_KEY "celeriac.revoked" /* the revoked set in Redis, shared by every celeriac */

/* One message from the moment it is fetched until it is settled (result stored and acked, or requeued). */
struct job {
    struct broker_delivery *delivery; /* owned */
    struct msg_request req;           /* decoded in the main process; owned */
    uint64_t seq;
    double cost;                      /* expected runtime when dispatched (seconds) */
    double hard_limit;                /* seconds, 0: none (the message's timelimit, else --time-limit) */
    double eta;                       /* epoch seconds before which it must not run; 0: at once */
    double expires;                   /* epoch seconds after which it is revoked, not run; INFINITY: never */
    double received;                  /* epoch seconds it reached the worker (queue latency starts here) */
    bool acked;
    bool requeued;
    bool started_sent;                /* task-started was sent (or events were off when it started) */
    bool rate_ok;                     /* took its rate-limit token already (waited in `throttled`) */
    bool reject;                      /* refused for good once settled, not acked (see broker_reject) */
    struct job *next;                 /* in the ready list or in its child's list */
};

struct job_list {
    struct job *head, *tail;
    int len;
};

/* ETA jobs waiting for their time, as a binary min-heap on eta (v[0] is due first). Owns the jobs. */
struct eta_heap {
    struct job **v;
    size_t n, cap;
};

struct child_state {
    struct job_list jobs; /* sent to the child, in the order it runs them */
    uint64_t killed_seq;  /* the task the child was killed for exceeding its hard time limit, else 0 */
    uint64_t revoked_seq; /* the task the child was signalled for by revoke(terminate=True), else 0 */
    int revoke_signal;    /* the signal sent for it */
    double backlog;       /* sum of the expected runtimes of those jobs */
    unsigned long writes; /* tasks sent to the process at this index (stats: pool.writes) */
};

/* Expected runtime per task name (an moving average), so that short tasks are queued to children ahead of
 * time (keeping the pool busy while the main loop talks to Redis) while long ones are handed out one at a
 * time to whichever child is free, as Celery's fair scheduling does. */
#define POOL_MAX 256 /* processes, whatever pool_grow asks: the poll set is sized for it */
#define COST_SLOTS 256
#define COST_UNKNOWN 0.002 /* a task never seen is assumed long: handed only to an idle child */
#define DISPATCH_HORIZON 0.002 /* queue to a busy child only while its backlog is shorter than this */
/* A child with work queued takes more, ahead of an idle one, while its backlog stays under this: for work this
 * short, waking a second process (and its own round trip to the result backend) costs more than running in
 * parallel saves. Deliveries that trickle in a few at a time (AMQP's window) then make one batch for one child,
 * not one task for each (RabbitMQ drain bench: +4% and +11% median tasks/s in two A/B runs). */
#define PACK_BACKLOG 0.0001
#define CHILD_QUEUE_MAX 256

/* Per-task-name settings changed by remote control: rate_limit (a token bucket of capacity 1, as Celery's
 * TokenBucket: a burst is spread out at the rate) and time_limit (the hard limit of messages that set none). */
#define TASK_LIMITS_MAX 64

struct task_limits {
    char *name;        /* owned */
    double rate;       /* tasks per second; 0: unlimited */
    double tokens;     /* 0..1 */
    double last;       /* epoch seconds of the last refill */
    double hard_limit; /* seconds; 0: none set here */
    double soft_limit; /* seconds; 0: none set here (travels with each task to the pool process) */
};

struct cost_slot {
    char *name; /* owned */
    double avg;
};

/* ETA tasks over --max-eta-reserved go back to their queue. Fetching goes on meanwhile (the tasks queued
 * behind them must still run), so the worker scans through the queue, returning each over-cap ETA task once;
 * a scan is over when the first message it returned comes back (or, should another worker have taken that
 * one, after ETA_SCAN_MAX messages). Then fetching pauses, so that a queue of nothing but future tasks is not
 * cycled in a hot loop: for at least ETA_PAUSE_MIN, and for ETA_PAUSE_RATIO times as long as the scan took,
 * so that rescanning a huge backlog costs at most a fifth of the time. A held ETA job leaving (due) ends the
 * ETA_PAUSE_MIN part early, since there is room again. Trade-off: a task published during a pause waits up to
 * about a second longer while the ETA backlog exceeds the cap. */
#define ETA_SCAN_MAX 10000
#define ETA_PAUSE_MIN 1.0
#define ETA_PAUSE_RATIO 4.0

struct consumer {
    const struct config *cfg;
    struct broker_endpoint broker_ep, backend_ep;
    struct redis_url broker_url, backend_url;
    struct amqp_url broker_amqp; /* an amqp:// broker's URL (broker_ep points into it); else empty */
    char *broker_display, *backend_display;
    struct broker *broker;
    struct backend *backend; /* NULL: results are not stored (no result backend configured) */
    struct pool *pool;
    struct child_state *children; /* one per pool index (pool_capacity) */
    int nchildren;
    struct taskdir *taskdir;      /* --tasks modules, NULL without */

    struct job_list ready; /* decoded, waiting for a child */
    struct job_list throttled; /* waiting for a rate-limit token, in arrival order (counted in held) */
    struct task_limits limits[TASK_LIMITS_MAX];
    size_t nlimits;
    struct eta_heap eta;   /* ETA jobs not yet due (unacked, but not counted in `held`: stock Celery raises its
                            * prefetch count by one for each, so they do not hold up the queue) */
    char *scan_mark;       /* owned: identity of the first over-cap ETA message returned in this scan, or NULL */
    long scan_returned;    /* messages returned to the queue in this scan */
    double scan_started;   /* epoch seconds of the first of them */
    double fetch_paused_until; /* epoch seconds: no fetch before this (a scan just went round) */
    double fetch_resume_min;   /* the part of that pause a due ETA job does not cut short */
    bool cap_warned;       /* the "cap reached" warning has been logged */
    struct cost_slot costs[COST_SLOTS];
    int held;              /* fetched and not yet acked or requeued: what prefetch bounds */
    int prefetch;
    int stores_in_flight;
    uint64_t next_seq;
    /* The broker's idle wait lent to a pool process (lentwait.h): which one (-1: none); took_child and took_seq,
     * during on_deliver only: the delivery is the one that child took and is running already, as took_seq. */
    int lent_child, took_child;
    uint64_t took_seq;
    /* The child that was last given a big message (a memfd hand-over), -1: none. It keeps its decoding buffer
     * for the next one (message.h), whose pages are already there: a 1,000,000-row message decodes in 18-27 ms
     * into them, 77-148 ms into fresh ones. So the next big message goes to it when it is free, and while it
     * is busy the wait is not lent to another (the main process waits, then hands the message to whichever
     * child is free when it comes, preferring this one). Forgotten WARM_S after that message was given. */
    int warm_child;
    double warm_at; /* epoch seconds when it was given one */
    double lend_after;     /* epoch seconds: no lending before (after a child could not wait) */
    unsigned long processed;
    bool stopping;         /* warm shutdown under way */

    /* Remote control and events (protocol doc 8, 9). */
    struct bus *bus;           /* the pidbox subscription and event publishing */
    char *pidbox_channel;      /* owned: "/<db>.celery.pidbox" */
    char *pidbox_member;       /* owned: our record in _kombu.binding.celery.pidbox */
    char *event_prefix;        /* owned: "/<db>.celeryev/" */
    long long clock;           /* Lamport clock: +1 per event sent, raised by every control request */
    int utcoffset;             /* Python's time.timezone // 3600, computed once */
    double started_at;         /* epoch seconds, for stats' uptime */
    bool task_events;          /* -E, or enable_events */
    double next_heartbeat;     /* epoch seconds */
    json_t *task_batch;        /* task events of this pass, sent as one task.multi message; NULL: none */
    struct revoked *revoked;   /* revoked task ids (also kept in Redis, REVOKED_KEY) */
    json_t *totals;            /* stats' "total": tasks accepted per name */

    /* Health and metrics (--http-port). */
    struct http_server *http;  /* NULL: no --http-port */
    struct metrics *metrics;
    double broker_progress;    /* epoch seconds the broker last answered a fetch (or none was waiting) */
    bool broker_was_up;
    unsigned long broker_reconnects;

    /* --autoscale (0 max: a fixed pool). */
    int autoscale_max, autoscale_min;
    double autoscale_keepalive; /* seconds after a scale-up before scaling down (Celery's AUTOSCALE_KEEPALIVE) */
    double last_scale_up;       /* monotonic seconds; 0: never scaled up yet */
    bool cold;             /* cold shutdown requested */
};


/* ---- consumer.c, for remote.c ---- */

/* Epoch seconds, as events and inspect show them. */
double epoch_now(void);
/* The limits entry of a task name (borrowed from c), created when asked; NULL when none (or the table is
 * full). */
struct task_limits *task_limits(struct consumer *c, const char *name, bool create);
/* Celery's rate strings ("10/s", "100/m", "5/h", a bare number per second) -> tasks per second; 0 for no
 * limit, -1 when unreadable. */
double parse_rate(const char *text);
/* The job child is running now, or NULL; *started gets its start time (pool_clock). */
struct job *running_job(const struct consumer *c, int child, double *started);
/* Takes the i-th job out of the ETA heap and returns it (the caller owns it). */
struct job *eta_remove(struct eta_heap *h, size_t i);
/* Stores REVOKED for j, sends task-revoked and acks/frees j (it is the caller's no more). */
void settle_revoked(struct consumer *c, struct job *j, const char *reason, int signum);
/* worker-online / -heartbeat / -offline. */
void worker_event(struct consumer *c, const char *type);
/* task-started for j, once. */
void event_started(struct consumer *c, struct job *j);
/* Per-child state follows the pool's capacity, which a grow may raise. */
void children_fit(struct consumer *c);
/* After task modules were (re)loaded: their declared defaults; with restart_pool, new processes for them. */
void tasks_loaded(struct consumer *c, bool restart_pool);
/* Tasks reserved: taken from the broker and not finished, ETA tasks still waiting excepted (Celery's
 * reserved_requests, which its autoscaler follows). */
int reserved_count(const struct consumer *c);
/* Keeps a revoked id where every restart (and every celeriac) finds it: the broker's Redis, or with an AMQP
 * broker the result backend's. */
void revoked_store_add(struct consumer *c, const char *id, double now);
/* The remote `shutdown` command: a warm shutdown, as on SIGTERM. */
void consumer_request_stop(void);

/* ---- remote.c ---- */

/* Handles one pidbox message (bus handler; arg is the consumer): runs the command if it is for this node and
 * sends the reply. */
void remote_on_control(void *arg, const char *channel, const char *data, size_t len);

#endif
