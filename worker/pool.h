/* pool: the prefork pool. N child processes, each running tasks one after another; the main process hands
 * them batches of raw messages over a socketpair (a message of 1 MiB or more in a memfd passed along, which
 * the child maps) and reads back one result frame per task.
 *
 * DESIGN. Processes, not threads: a task that crashes, aborts or has to be killed for a time limit costs its
 * child, never the worker. Frames are length-prefixed on a stream socket; the main side never blocks (it
 * buffers and writes when poll says so), a child blocks freely. A child writes its results back as soon as
 * its input runs dry or a task took long, so short tasks are batched and long ones are not delayed.
 * Children are forked before any connection is opened by the main process and open their own lazily (Redis
 * for native.incr, and the result backend, where they store results themselves when they can), so no
 * connection ever crosses a fork. An idle child may also be lent the broker's idle wait (lentwait.h). */
#ifndef CELERIAC_POOL_H
#define CELERIAC_POOL_H

#include <poll.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "broker.h"

struct pool;

struct pool_result {
    uint64_t seq;
    bool failed;         /* the task raised (FAILURE); false for SUCCESS */
    bool stored;         /* the child stored doc itself (SETEX + PUBLISH confirmed); nothing left to write */
    bool retried;        /* the task asked for a retry: sent again, doc is its RETRY state */
    double runtime;      /* seconds, measured in the child */
    const char *doc;     /* the result document to store; empty when ignore_result */
    size_t doc_len;
    const char *summary; /* repr of the return value, or "ExcType('message')" */
};

enum pool_wait_end {
    POOL_WAIT_OVER = 0,
    POOL_WAIT_REFUSED = 1,     /* the server refused the BLMOVE (an ACL): lending is pointless */
    POOL_WAIT_UNREACHABLE = 2, /* the child could not connect or send it */
};

struct pool_handlers {
    /* r and its strings are borrowed for the duration of the call. */
    void (*on_result)(void *arg, int child, const struct pool_result *r);
    /* A child died; every task still queued to it is the caller's to settle. status as from waitpid. */
    void (*on_child_exit)(void *arg, int child, int status);
    /* The wait lent to child (pool_lend_wait) took raw[0..len), which the child runs (or ran) as seq: its
     * result comes like a submitted task's, before those submitted to the child since the lend (only after a
     * recall) and after the previous one it took. raw_fd -1: raw is borrowed for the call; else (a message of
     * 1 MiB or more) raw is the MAP_SHARED mapping (len + 2 bytes) of the memfd raw_fd, both the handler's.
     * lend_over: the child does not wait again (a long task; no on_wait_end follows). raw NULL: the child died
     * running it before it could say what it took, or its memfd could not be mapped; it is then read from the
     * inbox (lend_over; on a death, on_child_exit follows at once). */
    void (*on_wait_took)(void *arg, int child, uint64_t seq, const char *raw, size_t len, int raw_fd,
                         bool lend_over);
    /* The wait lent to child is over without a task run (recalled, a message the child left to the main
     * process, a lost connection, the child gone); why: enum pool_wait_end. */
    void (*on_wait_end)(void *arg, int child, int why);
};

struct pool_options {
    int concurrency;
    double soft_time_limit;              /* default soft limit for tasks whose message sets none; 0: none */
    int max_tasks_per_child;             /* a child exits (and is replaced) after this many tasks; 0: never */
    int max_memory_per_child;            /* ... or once a task leaves it above this many KiB resident; 0: never */
    const char *hostname;                /* borrowed: the node name tasks see */
    const struct broker_endpoint *redis; /* borrowed: what native.incr talks to; NULL: no Redis for tasks */
    /* Where a child stores results itself (one hop less between a task's end and its client), falling back
     * to the main process when that fails; NULL: children hand every result to the main process. */
    const struct broker_endpoint *results;
    long result_expires;                 /* as for backend_open */
    /* For what tasks send on (canvas.h): the result backend (chord joins, progress), even when children do
     * not store results themselves; NULL: none. And the queues of what they send. */
    const struct broker_endpoint *backend;
    const char *native_queue;
    const char *default_queue;
};

/* Forks opt->concurrency children. Returns NULL with err filled on failure. */
struct pool *pool_start(const struct pool_options *opt, const struct pool_handlers *h, void *arg, char *err,
                        size_t errlen);

/* CHILD INDEXES. A child is known by an index in 0..pool_capacity()-1, stable while it lives; an index may be
 * empty (shrunk away), and a grow may raise the capacity, so callers that keep per-child state resize it to
 * pool_capacity() after pool_grow. */
int pool_capacity(const struct pool *p);
/* Processes wanted: the concurrency now (those leaving after a shrink are not counted). */
int pool_size(const struct pool *p);
/* Whether the child at this index lives and takes new work (not empty, not leaving). */
bool pool_accepts(const struct pool *p, int child);
bool pool_child_alive(const struct pool *p, int child);
/* Whether frames wait to be written to it (the socket was full): Celery's "active" inqueue writes. */
bool pool_child_writing(const struct pool *p, int child);
/* Its pid (meaningful while pool_child_alive, and in on_child_exit). */
pid_t pool_child_pid(const struct pool *p, int child);
/* Whether it was told to leave (shrink or restart): its exit is a planned one. */
bool pool_child_leaving(const struct pool *p, int child);

/* Celery's pool_grow / pool_shrink. grow forks n more (0, or -1 with errno); shrink picks n children, idle ones
 * first, which take no new work and exit once what they were given is done (returns how many it picked). */
int pool_grow(struct pool *p, int n);
int pool_shrink(struct pool *p, int n);
/* Replaces every child, each once it has finished what it was given: those forked afterwards run the code the
 * main process has loaded since (task modules reloaded). Running tasks finish on the code they started on. */
void pool_restart(struct pool *p);

/* Queues one raw message (copied) for a child that accepts work; sent at the next pool_flush. soft_time_limit:
 * seconds, for a message that sets none (0: the pool's default). raw_fd: a memfd whose start holds raw (the
 * transport read it there), handed over instead of a copy when raw is big; -1 when none. Borrowed. */
void pool_submit(struct pool *p, int child, uint64_t seq, double soft_time_limit, const char *raw, size_t len,
                 int raw_fd);
/* THE LENT WAIT (lentwait.h). Lends the broker's idle wait to child, which must accept work and have nothing
 * outstanding: it sends BLMOVE key inbox RIGHT LEFT 0 (both borrowed) on its own connection to the broker's
 * Redis (pool_options.redis), runs what it takes and waits again, until recalled or a task runs long. The tasks it brings are
 * known by seq, seq + 1, ...: the caller reserves POOL_LEND_SEQS of them. false when it cannot be lent.
 * on_wait_took follows for each task, on_wait_end once the lend is over. */
#define POOL_LEND_SEQS 1000000u
bool pool_lend_wait(struct pool *p, int child, uint64_t seq, const char *key, const char *inbox);
/* Asks child to end its lent wait: on_wait_end follows (after on_wait_took, when a message beat the request). */
void pool_recall_wait(struct pool *p, int child);
/* The gate the children decide by (lentwait.h), NULL if none could be mapped. Borrowed. */
struct lent_gate *pool_gate(struct pool *p);
int pool_pollfds(struct pool *p, struct pollfd *fds, int max);
void pool_process(struct pool *p, const struct pollfd *fds, int n);
void pool_flush(struct pool *p);
/* What a child is running now, from memory it shares with the main process (no syscall): true and the
 * task's seq and start time (CLOCK_MONOTONIC seconds) while it runs one, false between tasks. */
bool pool_running(const struct pool *p, int child, uint64_t *seq, double *started);
/* After on_child_exit: the task the child was running when it died (true, *seq), or false when it died
 * between tasks (say, replaced after --max-tasks-per-child): nothing it was given had started. */
bool pool_died_running(const struct pool *p, int child, uint64_t *seq);
/* Tells the task seq running in child that it was revoked (task_should_stop sees it); no effect once it ended. */
void pool_flag_revoked(struct pool *p, int child, uint64_t seq);
/* Kills one child at once (a hard time limit); on_child_exit follows from pool_process. */
void pool_kill_child(struct pool *p, int child);
/* CLOCK_MONOTONIC in seconds: the clock pool_running's start times use. */
double pool_clock(void);
/* Replaces a child that exited (after on_child_exit): 0, -1 with errno, or 1 when the index was shrunk away and
 * stays empty. */
int pool_respawn(struct pool *p, int child);
/* Asks every child to finish and exit, waits for them. */
void pool_stop(struct pool *p);
/* Kills every child at once (cold shutdown). */
void pool_kill(struct pool *p);
void pool_free(struct pool *p);

#endif
