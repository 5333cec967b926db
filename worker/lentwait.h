/* lentwait: the broker's idle wait, lent to a pool process.
 *
 * WHY. An idle worker waits for its next message in a BLMOVE (broker.h). When the main process reads the
 * reply and hands the message to a pool process, that is two sleeping processes woken one after the other
 * before the task starts, each wake-up costing 50-300 us on a VM whose idle vCPUs halt. So the main process
 * lends the wait to an idle pool process instead: the child sends the same BLMOVE (same queue, the main
 * process's inbox) on its own connection, and when a message comes it tells the main process what it took
 * (a TOOK frame with the message) and runs it at once; the main process then does its bookkeeping (events,
 * ack, time limits) as if it had dispatched it. What the child may not decide alone (an ETA or expiry, a
 * possibly revoked id, rate or time limits set by control, a message over the size limit) it leaves in the
 * inbox and ends the wait; the main process then reads it from there. A message of 1 MiB or more is read into
 * a memfd that goes with its TOOK frame: the main process maps it instead of reading a copy.
 *
 * The gate is what the child needs to know to decide: written by the main process, read by the children,
 * in memory shared across fork. Child-side functions run in the pool process only. */
#ifndef CELERIAC_LENTWAIT_H
#define CELERIAC_LENTWAIT_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <time.h>

#include "broker.h"

struct lent_gate;

/* Maps the gate (shared; closed until lent_gate_set). Before forking. NULL when it cannot be mapped. */
struct lent_gate *lent_gate_new(void);
void lent_gate_free(struct lent_gate *g);
/* Both setters do nothing on NULL (no gate could be mapped: nothing is lent).
 * open: whether a child may run what it takes (false while anything makes the main process's say needed for
 * every task: rate or time limits set per task type, track_started). max_message_size as the worker's (0: no
 * limit). */
void lent_gate_set(struct lent_gate *g, bool open, size_t max_message_size);
size_t lent_gate_max_message_size(const struct lent_gate *g);
/* Marks id (borrowed) as possibly revoked: a child leaves such a message to the main process. Never cleared
 * (a revoked id stays marked for the life of the worker; a false positive only costs the fast path). */
void lent_gate_revoke(struct lent_gate *g, const char *id);
/* Child side: the task the child may run raw[0..len) as itself, or NULL when that is the main process's call. */
struct task_def;
const struct task_def *lent_gate_admits(const struct lent_gate *g, const char *raw, size_t len);

/* Child side: one BLMOVE at a time on a connection kept across waits. */
struct lent_wait {
    struct redisContext *conn; /* owned; NULL until the first wait, and after a cancel or an error */
    bool waiting;
};

/* Sends BLMOVE key inbox RIGHT LEFT 0 (both borrowed). Returns the fd to poll for the reply, or -1 when the
 * connection or the send failed (the wait is then over: nothing was taken). */
int lent_wait_start(struct lent_wait *w, const struct broker_endpoint *ep, const char *key, const char *inbox);

enum lent_outcome {
    LENT_MESSAGE, /* *raw is the message: it is in the inbox. *fd -1: caller frees *raw; else *raw is the
                   * MAP_SHARED mapping (*len + 2 bytes) of the memfd *fd, both the caller's */
    LENT_LEFT,    /* the wait is over, the message (if any) left in the inbox for the main process */
    LENT_REFUSED, /* the server refused the BLMOVE (an ACL, say): lending is pointless here */
};
/* Reads the reply once the fd is readable (g: the gate, for the size limit). A reply over the limit is not
 * read: the connection is closed instead (the server then drops it), and it is the main process's to refuse. */
enum lent_outcome lent_wait_read(struct lent_wait *w, const struct lent_gate *g, char **raw, size_t *len, int *fd);
/* Stops a wait (closing the connection is the only sure way); what it may have moved stays in the inbox. */
void lent_wait_cancel(struct lent_wait *w);

/* Child side: when the main process hears of a lent task. Telling it at once (a TOOK frame before the task)
 * wakes it while the task and its result are on their way, and on two cores it then competes with them
 * (measured: idle p99 2.4 -> 1.0 ms when told with the result, under load from other work). So a short task's
 * TOOK goes with its result; a watchdog thread sends it once the task has run `after` seconds, so that the
 * main process knows of a long one (hard time limits, inspect, events) within that time. The watchdog wakes
 * only then (a timer signal, SIGURG, which the task's own thread keeps blocked: the task's system calls are
 * never interrupted by it). */
struct lent_notice {
    bool started;      /* thread and timer exist; false: lent_notice_arm fails, the caller sends at once */
    bool failed;       /* they could not be created: not tried again */
    int fd;            /* where frames go (the child's socket) */
    timer_t timer;
    pthread_mutex_t lock;
    const char *frame; /* borrowed while armed */
    size_t len;
    bool armed, sent;
};
/* Arms the watchdog to write frame[0..len) to fd after `after` seconds. -1 when there is no watchdog: the
 * caller sends the frame itself, now. */
int lent_notice_arm(struct lent_notice *n, int fd, const char *frame, size_t len, double after);
/* Disarms it; true when the watchdog sent the frame already (else it is the caller's to send). */
bool lent_notice_disarm(struct lent_notice *n);

#endif
