/* rconn: one non-blocking Redis connection driven by the caller's poll loop, with a FIFO of reply callbacks.
 * Internal to broker/. Commands are appended to hiredis's output buffer (pipelined); rconn_flush writes what
 * the socket takes; rconn_read parses every complete reply and calls the callback registered with its
 * command, in order. Single-threaded: the process that created the connection is the only user. */
#ifndef CELERIAC_RCONN_H
#define CELERIAC_RCONN_H

#include <hiredis/hiredis.h>
#include <stdbool.h>
#include <stddef.h>

#include "broker.h"

/* Whether an error reply only means "not now" (a server loading its data set after a restart, a busy
 * script, a failover): the command must be sent again later, not given up. */
bool rconn_transient_error(const redisReply *r);

/* Wall-clock seconds since the epoch (kombu's unacked scores and our timers use it). */
double rconn_epoch(void);

struct rconn;
/* printf-style line to c->log (or stderr when unset). */
void rconn_log(const struct rconn *c, int level, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

struct rconn;
/* reply is borrowed (freed after the callback returns) unless the callback sets *steal to true, in which case
 * it takes ownership (free with freeReplyObject). reply is NULL when the connection was lost before the
 * reply came. */
typedef void (*rconn_cb)(struct rconn *c, redisReply *reply, void *arg, bool *steal);

struct rconn_pending {
    rconn_cb cb; /* NULL: the reply is only checked for errors */
    void *arg;
};

struct rconn {
    redisContext *ctx;  /* owned; NULL while disconnected */
    const char *name;   /* borrowed, for log lines: "broker", "backend" */
    struct rconn_pending *q; /* ring of callbacks for the replies still to come */
    rconn_cb push_cb;        /* pub/sub: receives every reply that no command waits for (messages) */
    void *push_arg;
    size_t q_head, q_len, q_cap;
    broker_log_fn log;       /* where unexpected replies are reported */
    /* A big bulk reply read straight into its final buffer, past hiredis's reader (see rconn_read). */
    char *direct;            /* owned: the payload and its CRLF as they come; NULL when none */
    size_t direct_len, direct_have;
    /* Set by the owner: direct replies land in a MAP_SHARED mapping of a memfd (so that they can be handed to
     * another process as they are) instead of malloc'd memory. During the callback of such a reply,
     * direct_fd is its memfd: a callback takes the mapping by setting reply->str to NULL (it is len + 2 bytes,
     * released with munmap; *steal must stay false) and the descriptor by setting direct_fd to -1; what it
     * does not take, rconn releases. */
    bool direct_memfd;
    int direct_fd;           /* the memfd of the direct reply being read or delivered; -1 when none */
    char errstr[256];
};

/* Blocking connect (timeout_ms), AUTH and SELECT; the connection is then switched to non-blocking.
 * Returns 0, or -1 with c->errstr set. */
int rconn_open(struct rconn *c, const char *name, const struct broker_endpoint *ep, int timeout_ms);
/* Closes the socket and calls every pending callback with a NULL reply. Safe to call twice. */
void rconn_close(struct rconn *c);
bool rconn_connected(const struct rconn *c);
int rconn_fd(const struct rconn *c);
bool rconn_wants_write(const struct rconn *c);
size_t rconn_pending(const struct rconn *c);

/* Appends one command (argv form; argv strings borrowed, copied into the output buffer). */
void rconn_command_argv(struct rconn *c, rconn_cb cb, void *arg, int argc, const char **argv, const size_t *lens);
/* Same as rconn_command_argv, formatted straight into the output buffer (no intermediate copies). */
void rconn_command_resp(struct rconn *c, rconn_cb cb, void *arg, int argc, const char **argv, const size_t *lens);
/* Appends one command in hiredis printf form ("SETEX %b %d %b"). */
void rconn_command(struct rconn *c, rconn_cb cb, void *arg, const char *fmt, ...);

/* Appends a command whose replies are not awaited: on a subscribed connection they go to push_cb. */
void rconn_send(struct rconn *c, const char *fmt, ...);

/* Writes as much of the output buffer as the socket accepts. Returns 0, or -1 when the connection broke
 * (then c->errstr says why; the caller closes). */
int rconn_flush(struct rconn *c);
/* Reads what is available and dispatches every complete reply. Returns 0, or -1 when the connection broke.
 * A top-level bulk string of 1 MiB or more that begins a read between two replies (a BLMOVE's 60 MB message,
 * the one reply in flight on its connection; a reply pipelined behind others mostly begins mid-read) is read
 * straight into the buffer its reply hands over, instead of through hiredis's reader, which holds such a
 * reply twice (its input buffer, then the reply's copy): two fewer copies and page-faulted buffers. */
int rconn_read(struct rconn *c);

/* A blocking command on an open connection, for start-up and rare maintenance only: flushes, then waits
 * for this command's reply (dispatching earlier ones). Returns the reply (caller frees with freeReplyObject)
 * or NULL on a broken connection. */
redisReply *rconn_call(struct rconn *c, const char *fmt, ...);
redisReply *rconn_call_argv(struct rconn *c, int argc, const char **argv, const size_t *lens);

/* The revoked set (bus_revoked_add / backend_revoked_add): a sorted set of ids scored by when they were revoked.
 * add is pipelined: the id (kept with its first time), then everything older than ttl or beyond the newest max
 * dropped, and the key set to expire with the ttl. load blocks: fn(arg, id, when) for each id revoked since
 * now - ttl, oldest first; returns how many, or -1. */
void rconn_revoked_add(struct rconn *c, const char *key, const char *id, double now, double ttl, long max);
long rconn_revoked_load(struct rconn *c, const char *key, double now, double ttl,
                        void (*fn)(void *arg, const char *id, double when), void *arg);

#endif
