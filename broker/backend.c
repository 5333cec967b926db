/* The Redis result backend (protocol doc section 5): SETEX + PUBLISH per result, pipelined.
 * Runs in the worker's main process only.
 *
 * Every result is kept until Redis has confirmed both commands. When the connection breaks, the results
 * not yet confirmed are sent again, in order, once it is back (reconnecting with backoff): a result
 * computed while Redis is away is written late, never dropped. Writing one twice is harmless. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>

#include "broker.h"
#include "rconn.h"

#define BACKOFF_MIN 0.1
#define BACKOFF_MAX 5.0

struct store_op {
    struct backend *be;
    char *key;               /* owned: celery-task-meta-<id> */
    char *doc;               /* owned */
    size_t len;
    backend_done_fn done;
    void *arg;
    bool set_ok;             /* the SETEX of the current attempt succeeded */
    struct store_op *prev, *next;
};

struct backend {
    struct rconn conn;
    const struct broker_endpoint *ep; /* borrowed */
    long expires;
    struct store_op *head, *tail;     /* unconfirmed results, oldest first */
    size_t pending;
    double next_reconnect, backoff;
    char errstr[256];
};

static void send_op(struct backend *be, struct store_op *op);

static int connect_backend(struct backend *be, int timeout_ms)
{
    if (rconn_open(&be->conn, "backend", be->ep, timeout_ms) < 0)
        return -1;
    be->backoff = 0;
    for (struct store_op *op = be->head; op; op = op->next)
        send_op(be, op);
    return 0;
}

struct backend *backend_open(const struct broker_endpoint *ep, long expires, broker_log_fn log, char *err,
                             size_t errlen)
{
    struct backend *be = calloc(1, sizeof *be);
    if (!be)
        abort();
    be->ep = ep;
    be->expires = expires;
    be->conn.log = log;
    if (connect_backend(be, 5000) < 0) {
        snprintf(err, errlen, "%s", be->conn.errstr);
        backend_close(be);
        return NULL;
    }
    return be;
}

static void op_free(struct store_op *op)
{
    free(op->key);
    free(op->doc);
    free(op);
}

void backend_close(struct backend *be)
{
    if (!be)
        return;
    struct store_op *op = be->head;
    be->head = NULL; /* the callbacks below see no ops to keep */
    rconn_close(&be->conn);
    while (op) {
        struct store_op *next = op->next;
        op_free(op);
        op = next;
    }
    free(be->conn.q);
    free(be);
}

const char *backend_errstr(const struct backend *be)
{
    return be->errstr[0] ? be->errstr : be->conn.errstr;
}

bool backend_connected(const struct backend *be)
{
    return rconn_connected(&be->conn);
}

size_t backend_pending(const struct backend *be)
{
    return be->pending;
}

static void lost(struct backend *be, const char *why)
{
    snprintf(be->errstr, sizeof be->errstr, "%s", why);
    rconn_log(&be->conn, BROKER_LOG_ERROR,
              "Connection to the result backend lost (%s); %zu result(s) will be written when it is back", why,
              be->pending);
    rconn_close(&be->conn);
    be->backoff = BACKOFF_MIN;
    be->next_reconnect = rconn_epoch() + be->backoff;
}

int backend_pollfds(struct backend *be, struct pollfd *fds, int max)
{
    if (max < 1 || !rconn_connected(&be->conn))
        return 0;
    fds[0] = (struct pollfd){rconn_fd(&be->conn), POLLIN | (rconn_wants_write(&be->conn) ? POLLOUT : 0), 0};
    return 1;
}

int backend_process(struct backend *be, const struct pollfd *fds, int n)
{
    for (int i = 0; i < n; i++) {
        if (!rconn_connected(&be->conn) || fds[i].fd != rconn_fd(&be->conn) || !fds[i].revents)
            continue;
        if ((fds[i].revents & POLLOUT) && rconn_flush(&be->conn) < 0)
            goto broken;
        if ((fds[i].revents & (POLLIN | POLLHUP | POLLERR)) && rconn_read(&be->conn) < 0)
            goto broken;
    }
    return 0;
broken:
    lost(be, be->conn.errstr);
    return 0;
}

int backend_flush(struct backend *be)
{
    if (rconn_connected(&be->conn) && rconn_flush(&be->conn) < 0)
        lost(be, be->conn.errstr);
    return 0;
}

void backend_tick(struct backend *be, double now)
{
    if (rconn_connected(&be->conn) || now < be->next_reconnect)
        return;
    if (connect_backend(be, 1000) == 0) {
        rconn_log(&be->conn, BROKER_LOG_WARNING, "Reconnected to the result backend %s; writing %zu result(s)",
                  be->ep->display, be->pending);
        return;
    }
    be->backoff = be->backoff < BACKOFF_MIN ? BACKOFF_MIN : be->backoff * 2;
    if (be->backoff > BACKOFF_MAX)
        be->backoff = BACKOFF_MAX;
    rconn_log(&be->conn, BROKER_LOG_ERROR, "Cannot reach the result backend: %s. Trying again in %.2f seconds...",
              be->conn.errstr, be->backoff);
    be->next_reconnect = now + be->backoff;
}

int backend_next_tick_ms(const struct backend *be, double now)
{
    if (rconn_connected(&be->conn))
        return 1000;
    double ms = (be->next_reconnect - now) * 1000.0;
    return ms < 0 ? 0 : ms > 1000 ? 1000 : (int)ms + 1;
}

static void unlink_op(struct backend *be, struct store_op *op)
{
    if (op->prev)
        op->prev->next = op->next;
    else
        be->head = op->next;
    if (op->next)
        op->next->prev = op->prev;
    else
        be->tail = op->prev;
    be->pending--;
}

static void on_set_reply(struct rconn *c, redisReply *r, void *arg, bool *steal)
{
    (void)steal;
    struct store_op *op = arg;
    op->set_ok = r && r->type != REDIS_REPLY_ERROR;
    if (rconn_transient_error(r)) {
        /* Redis is not ready yet (loading after a restart...): treat it as a lost connection, so that this
         * result and every later one are sent again after the reconnect. */
        rconn_log(c, BROKER_LOG_WARNING, "result backend not ready: %s", r->str);
        rconn_close(c);
        return;
    }
    if (r && r->type == REDIS_REPLY_ERROR)
        rconn_log(c, BROKER_LOG_ERROR, "storing a result failed: %s", r->str);
}

static void on_publish_reply(struct rconn *c, redisReply *r, void *arg, bool *steal)
{
    (void)c;
    (void)steal;
    struct store_op *op = arg;
    struct backend *be = op->be;
    if (!r)
        return; /* connection lost: the op stays queued and is sent again after the reconnect (or freed by
                 * backend_close) */
    /* An error reply (out of memory, read-only replica...) is final for this result: say so to the caller. */
    bool ok = op->set_ok && r->type != REDIS_REPLY_ERROR;
    unlink_op(be, op);
    if (op->done)
        op->done(op->arg, ok);
    op_free(op);
}

/* Hot path: one SETEX and one PUBLISH per result, formatted straight into the output buffer. */
static void send_op(struct backend *be, struct store_op *op)
{
    size_t keylen = strlen(op->key);
    char expires[24];
    int explen = snprintf(expires, sizeof expires, "%ld", be->expires);
    const char *argv[4];
    size_t lens[4];
    int argc;
    op->set_ok = false;
    if (be->expires > 0) {
        argv[0] = "SETEX", lens[0] = 5;
        argv[1] = op->key, lens[1] = keylen;
        argv[2] = expires, lens[2] = (size_t)explen;
        argv[3] = op->doc, lens[3] = op->len;
        argc = 4;
    } else {
        argv[0] = "SET", lens[0] = 3;
        argv[1] = op->key, lens[1] = keylen;
        argv[2] = op->doc, lens[2] = op->len;
        argc = 3;
    }
    rconn_command_resp(&be->conn, on_set_reply, op, argc, argv, lens);
    argv[0] = "PUBLISH", lens[0] = 7;
    argv[1] = op->key, lens[1] = keylen;
    argv[2] = op->doc, lens[2] = op->len;
    rconn_command_resp(&be->conn, on_publish_reply, op, 3, argv, lens);
}

void backend_store(struct backend *be, const char *task_id, const char *doc, size_t len, backend_done_fn done,
                   void *arg)
{
    static const char prefix[] = "celery-task-meta-";
    struct store_op *op = calloc(1, sizeof *op);
    size_t idlen = strlen(task_id);
    if (!op || !(op->key = malloc(sizeof prefix + idlen)) || !(op->doc = malloc(len + 1)))
        abort();
    memcpy(op->key, prefix, sizeof prefix - 1);
    memcpy(op->key + sizeof prefix - 1, task_id, idlen + 1);
    memcpy(op->doc, doc, len);
    op->doc[len] = '\0';
    op->len = len;
    op->be = be;
    op->done = done;
    op->arg = arg;
    op->prev = be->tail;
    if (be->tail)
        be->tail->next = op;
    else
        be->head = op;
    be->tail = op;
    be->pending++;
    if (rconn_connected(&be->conn))
        send_op(be, op);
}

void backend_revoked_add(struct backend *be, const char *key, const char *id, double now, double ttl, long max)
{
    rconn_revoked_add(&be->conn, key, id, now, ttl, max);
}

long backend_revoked_load(struct backend *be, const char *key, double now, double ttl,
                          void (*fn)(void *arg, const char *id, double when), void *arg)
{
    return rconn_revoked_load(&be->conn, key, now, ttl, fn, arg);
}
