/* The Redis result backend (protocol doc section 5): SETEX + PUBLISH per result, pipelined.
 * Runs in the worker's main process only. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "broker.h"
#include "rconn.h"

struct backend {
    struct rconn conn;
    long expires;
    char errstr[256];
};

struct store_op {
    backend_done_fn done;
    void *arg;
    bool ok; /* the SETEX succeeded */
};

struct backend *backend_open(const struct broker_endpoint *ep, long expires, broker_log_fn log, char *err,
                             size_t errlen)
{
    struct backend *be = calloc(1, sizeof *be);
    if (!be)
        abort();
    be->expires = expires;
    be->conn.log = log;
    if (rconn_open(&be->conn, "backend", ep, 5000) < 0) {
        snprintf(err, errlen, "%s", be->conn.errstr);
        backend_close(be);
        return NULL;
    }
    return be;
}

void backend_close(struct backend *be)
{
    if (!be)
        return;
    rconn_close(&be->conn);
    free(be->conn.q);
    free(be);
}

const char *backend_errstr(const struct backend *be)
{
    return be->errstr[0] ? be->errstr : be->conn.errstr;
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
        if (fds[i].fd != rconn_fd(&be->conn) || !fds[i].revents)
            continue;
        if ((fds[i].revents & POLLOUT) && rconn_flush(&be->conn) < 0)
            goto broken;
        if ((fds[i].revents & (POLLIN | POLLHUP | POLLERR)) && rconn_read(&be->conn) < 0)
            goto broken;
    }
    return 0;
broken:
    snprintf(be->errstr, sizeof be->errstr, "%s", be->conn.errstr);
    rconn_close(&be->conn);
    return -1;
}

int backend_flush(struct backend *be)
{
    if (!rconn_connected(&be->conn))
        return -1;
    if (rconn_flush(&be->conn) < 0) {
        snprintf(be->errstr, sizeof be->errstr, "%s", be->conn.errstr);
        rconn_close(&be->conn);
        return -1;
    }
    return 0;
}

static void on_set_reply(struct rconn *c, redisReply *r, void *arg, bool *steal)
{
    (void)steal;
    struct store_op *op = arg;
    op->ok = r && r->type != REDIS_REPLY_ERROR;
    if (r && r->type == REDIS_REPLY_ERROR)
        rconn_log(c, BROKER_LOG_ERROR, "storing a result failed: %s", r->str);
}

static void on_publish_reply(struct rconn *c, redisReply *r, void *arg, bool *steal)
{
    (void)c;
    (void)steal;
    struct store_op *op = arg;
    bool ok = op->ok && r && r->type != REDIS_REPLY_ERROR;
    if (op->done)
        op->done(op->arg, ok);
    free(op);
}

void backend_store(struct backend *be, const char *task_id, const char *doc, size_t len, backend_done_fn done,
                   void *arg)
{
    struct store_op *op = malloc(sizeof *op);
    if (!op)
        abort();
    *op = (struct store_op){done, arg, false};
    /* Hot path: one SETEX and one PUBLISH per task, formatted here as RESP in one go rather than through
     * hiredis's printf-style parser. */
    static const char prefix[] = "celery-task-meta-";
    size_t idlen = strlen(task_id), keylen = sizeof prefix - 1 + idlen;
    char expires[24];
    int explen = snprintf(expires, sizeof expires, "%ld", be->expires);
    const char *argv[4];
    size_t lens[4];
    char *key = malloc(keylen + 1);
    if (!key)
        abort();
    memcpy(key, prefix, sizeof prefix - 1);
    memcpy(key + sizeof prefix - 1, task_id, idlen + 1);
    int argc = 0;
    if (be->expires > 0) {
        argv[0] = "SETEX", lens[0] = 5;
        argv[1] = key, lens[1] = keylen;
        argv[2] = expires, lens[2] = (size_t)explen;
        argv[3] = doc, lens[3] = len;
        argc = 4;
    } else {
        argv[0] = "SET", lens[0] = 3;
        argv[1] = key, lens[1] = keylen;
        argv[2] = doc, lens[2] = len;
        argc = 3;
    }
    rconn_command_resp(&be->conn, on_set_reply, op, argc, argv, lens);
    argv[0] = "PUBLISH", lens[0] = 7;
    argv[1] = key, lens[1] = keylen;
    argv[2] = doc, lens[2] = len;
    rconn_command_resp(&be->conn, on_publish_reply, op, 3, argv, lens);
    free(key);
}
