#include "rconn.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include <sys/time.h>

bool rconn_transient_error(const redisReply *r)
{
    static const char *const prefixes[] = {"LOADING", "BUSY", "TRYAGAIN", "MASTERDOWN", "READONLY"};
    if (!r || r->type != REDIS_REPLY_ERROR || !r->str)
        return false;
    for (size_t i = 0; i < sizeof prefixes / sizeof *prefixes; i++)
        if (strncmp(r->str, prefixes[i], strlen(prefixes[i])) == 0)
            return true;
    return false;
}

double rconn_epoch(void)
{
    struct timeval tv;
    gettimeofday(&tv, NULL);
    return (double)tv.tv_sec + tv.tv_usec / 1e6;
}

void rconn_log(const struct rconn *c, int level, const char *fmt, ...)
{
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (c->log)
        c->log(level, line);
    else
        fprintf(stderr, "celeriac: %s\n", line);
}

static void queue_push(struct rconn *c, rconn_cb cb, void *arg)
{
    if (c->q_len == c->q_cap) {
        size_t cap = c->q_cap ? c->q_cap * 2 : 256;
        struct rconn_pending *q = malloc(cap * sizeof *q);
        if (!q)
            abort();
        for (size_t i = 0; i < c->q_len; i++)
            q[i] = c->q[(c->q_head + i) % c->q_cap];
        free(c->q);
        c->q = q;
        c->q_cap = cap;
        c->q_head = 0;
    }
    c->q[(c->q_head + c->q_len) % c->q_cap] = (struct rconn_pending){cb, arg};
    c->q_len++;
}

static struct rconn_pending queue_pop(struct rconn *c)
{
    struct rconn_pending p = c->q[c->q_head];
    c->q_head = (c->q_head + 1) % c->q_cap;
    c->q_len--;
    return p;
}

/* One step of the handshake: AUTH or SELECT. Returns 0, or -1 with err filled. */
static int handshake(redisContext *ctx, int argc, const char **argv, const char *what,
                     const struct broker_endpoint *ep, char *err, size_t errlen)
{
    size_t lens[3];
    for (int i = 0; i < argc; i++)
        lens[i] = strlen(argv[i]);
    redisReply *r = redisCommandArgv(ctx, argc, argv, lens);
    int rc = r && r->type != REDIS_REPLY_ERROR ? 0 : -1;
    if (rc < 0)
        snprintf(err, errlen, "%s on %s failed: %s", what, ep->display,
                 r && r->type == REDIS_REPLY_ERROR ? r->str : ctx->errstr);
    if (r)
        freeReplyObject(r);
    return rc;
}

redisContext *broker_connect_blocking(const struct broker_endpoint *ep, int timeout_ms, char *err, size_t errlen)
{
    struct timeval tv = {timeout_ms / 1000, (timeout_ms % 1000) * 1000};
    redisContext *ctx = ep->socket ? redisConnectUnixWithTimeout(ep->socket, tv)
                                   : redisConnectWithTimeout(ep->host ? ep->host : "127.0.0.1", ep->port, tv);
    if (!ctx || ctx->err) {
        snprintf(err, errlen, "cannot connect to %s: %s", ep->display, ctx ? ctx->errstr : "out of memory");
        goto fail;
    }
    redisSetTimeout(ctx, tv);
    if (ep->password) {
        /* AUTH user password (Redis 6 ACL) or AUTH password */
        const char *auth[3] = {"AUTH", ep->username ? ep->username : ep->password, ep->password};
        if (handshake(ctx, ep->username ? 3 : 2, auth, "authentication", ep, err, errlen) < 0)
            goto fail;
    }
    if (ep->db) {
        char db[16];
        snprintf(db, sizeof db, "%d", ep->db);
        const char *select[2] = {"SELECT", db};
        if (handshake(ctx, 2, select, "SELECT", ep, err, errlen) < 0)
            goto fail;
    }
    if (!ep->socket)
        redisEnableKeepAlive(ctx); /* TCP only: on a unix socket it fails and poisons the context */
    return ctx;
fail:
    if (ctx)
        redisFree(ctx);
    return NULL;
}

int rconn_open(struct rconn *c, const char *name, const struct broker_endpoint *ep, int timeout_ms)
{
    c->name = name;
    c->errstr[0] = '\0';
    c->direct_fd = -1;
    redisContext *ctx = broker_connect_blocking(ep, timeout_ms, c->errstr, sizeof c->errstr);
    if (!ctx)
        return -1;
    /* From here on the caller's poll loop drives the socket: hiredis treats EAGAIN as "try later" only
     * when the context is not marked blocking. */
    int flags = fcntl(ctx->fd, F_GETFL);
    fcntl(ctx->fd, F_SETFL, flags | O_NONBLOCK);
    ctx->flags &= ~REDIS_BLOCK;
    c->ctx = ctx;
    return 0;
}

static void direct_release(struct rconn *c, char *buf, size_t len);

void rconn_close(struct rconn *c)
{
    if (c->ctx) {
        redisFree(c->ctx);
        c->ctx = NULL;
    }
    if (c->direct)
        direct_release(c, c->direct, c->direct_len);
    c->direct = NULL;
    while (c->q_len) {
        struct rconn_pending p = queue_pop(c);
        bool steal = false;
        if (p.cb)
            p.cb(c, NULL, p.arg, &steal);
    }
}

bool rconn_connected(const struct rconn *c)
{
    return c->ctx != NULL;
}

int rconn_fd(const struct rconn *c)
{
    return c->ctx ? c->ctx->fd : -1;
}

bool rconn_wants_write(const struct rconn *c)
{
    return c->ctx && sdslen(c->ctx->obuf) > 0;
}

size_t rconn_pending(const struct rconn *c)
{
    return c->q_len;
}

void rconn_command_argv(struct rconn *c, rconn_cb cb, void *arg, int argc, const char **argv, const size_t *lens)
{
    rconn_command_resp(c, cb, arg, argc, argv, lens);
}

void rconn_command_resp(struct rconn *c, rconn_cb cb, void *arg, int argc, const char **argv, const size_t *lens)
{
    if (!c->ctx) {
        bool steal = false;
        if (cb)
            cb(c, NULL, arg, &steal);
        return;
    }
    char head[32];
    int n = snprintf(head, sizeof head, "*%d\r\n", argc);
    c->ctx->obuf = sdscatlen(c->ctx->obuf, head, (size_t)n);
    for (int i = 0; i < argc; i++) {
        n = snprintf(head, sizeof head, "$%zu\r\n", lens[i]);
        c->ctx->obuf = sdscatlen(c->ctx->obuf, head, (size_t)n);
        c->ctx->obuf = sdscatlen(c->ctx->obuf, argv[i], lens[i]);
        c->ctx->obuf = sdscatlen(c->ctx->obuf, "\r\n", 2);
    }
    queue_push(c, cb, arg);
}

void rconn_command(struct rconn *c, rconn_cb cb, void *arg, const char *fmt, ...)
{
    if (!c->ctx) {
        bool steal = false;
        if (cb)
            cb(c, NULL, arg, &steal);
        return;
    }
    va_list ap;
    va_start(ap, fmt);
    redisvAppendCommand(c->ctx, fmt, ap);
    va_end(ap);
    queue_push(c, cb, arg);
}

void rconn_send(struct rconn *c, const char *fmt, ...)
{
    if (!c->ctx)
        return;
    va_list ap;
    va_start(ap, fmt);
    redisvAppendCommand(c->ctx, fmt, ap);
    va_end(ap);
}

int rconn_flush(struct rconn *c)
{
    if (!c->ctx)
        return -1;
    int done = 0;
    while (!done) {
        size_t before = sdslen(c->ctx->obuf);
        if (redisBufferWrite(c->ctx, &done) == REDIS_ERR) {
            snprintf(c->errstr, sizeof c->errstr, "%s connection lost: %s", c->name, c->ctx->errstr);
            return -1;
        }
        if (!done && sdslen(c->ctx->obuf) == before)
            break; /* the socket is full: poll for POLLOUT */
    }
    return 0;
}

/* Hands one reply to the callback of the oldest command (or the push callback). Returns -1 when a callback
 * closed the connection. */
static int deliver(struct rconn *c, redisReply *r)
{
    if (!c->q_len && c->push_cb) {
        bool steal = false;
        c->push_cb(c, r, c->push_arg, &steal);
        if (!steal)
            freeReplyObject(r);
        return c->ctx ? 0 : -1;
    }
    if (!c->q_len) {
        /* A reply nobody asked for: a bug, not something to guess about. Drop it loudly. */
        rconn_log(c, BROKER_LOG_ERROR, "unexpected reply on the %s connection (type %d)", c->name, r->type);
        freeReplyObject(r);
        return 0;
    }
    struct rconn_pending p = queue_pop(c);
    bool steal = false;
    if (p.cb)
        p.cb(c, r, p.arg, &steal);
    else if (r->type == REDIS_REPLY_ERROR)
        rconn_log(c, BROKER_LOG_ERROR, "%s command failed: %s", c->name, r->str);
    if (!steal)
        freeReplyObject(r);
    return c->ctx ? 0 : -1; /* -1: a callback closed the connection */
}

static int dispatch_replies(struct rconn *c)
{
    for (;;) {
        void *reply = NULL;
        if (redisGetReplyFromReader(c->ctx, &reply) == REDIS_ERR) {
            snprintf(c->errstr, sizeof c->errstr, "%s protocol error: %s", c->name, c->ctx->errstr);
            return -1;
        }
        if (!reply)
            return 0;
        if (deliver(c, reply) < 0)
            return -1;
    }
}

#define DIRECT_MIN (1 << 20)

/* A buffer of len bytes that is the MAP_SHARED mapping of a new memfd, kept in c->direct_fd; NULL on failure
 * (the caller then uses malloc). It is filled through the descriptor (direct_put), not the mapping: 60 MB of
 * fresh shared memory took 61-67 ms by page faults, 26-29 ms by write(2). */
static char *memfd_buffer(struct rconn *c, size_t len)
{
    int fd = memfd_create("celeriac-message", MFD_CLOEXEC);
    if (fd < 0)
        return NULL;
    void *m = ftruncate(fd, (off_t)len) == 0 ? mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0) : MAP_FAILED;
    if (m == MAP_FAILED) {
        close(fd);
        return NULL;
    }
    c->direct_fd = fd;
    return m;
}

/* deliver() for a reply whose str is a mapping (direct_memfd): the callback takes it by setting str to NULL.
 * *taken says whether it did; the reply itself is freed here, never its mapping. */
static int deliver_mapped(struct rconn *c, redisReply *r, bool *taken)
{
    char *str = r->str;
    *taken = false;
    if (!c->q_len) {
        rconn_log(c, BROKER_LOG_ERROR, "unexpected reply on the %s connection (type %d)", c->name, r->type);
    } else {
        struct rconn_pending p = queue_pop(c);
        bool steal = false;
        if (p.cb)
            p.cb(c, r, p.arg, &steal);
        *taken = r->str != str;
    }
    r->str = NULL;
    freeReplyObject(r);
    return c->ctx ? 0 : -1;
}

/* Whether hiredis's reader holds nothing of a reply: no bytes left, and no reply begun. After the last reply
 * it hands out, the reader has already set up the next one (ridx 0, its type not read yet). */
static bool reader_at_boundary(const redisReader *rd)
{
    if (rd->pos != rd->len)
        return false;
    if (rd->ridx == -1)
        return true;
#if HIREDIS_MAJOR >= 1
    return rd->ridx == 0 && rd->task[0]->type == -1;
#else
    return rd->ridx == 0 && rd->rstack[0].type == -1;
#endif
}

/* Appends data[0..n) to the direct reply. false when the memfd refuses it (out of memory). */
static bool direct_put(struct rconn *c, const char *data, size_t n)
{
    if (c->direct_fd < 0) {
        memcpy(c->direct + c->direct_have, data, n);
    } else {
        for (size_t done = 0; done < n;) {
            ssize_t w = pwrite(c->direct_fd, data + done, n - done, (off_t)(c->direct_have + done));
            if (w < 0 && errno == EINTR)
                continue;
            if (w <= 0) {
                snprintf(c->errstr, sizeof c->errstr, "%s: cannot keep a %zu-byte reply in memory: %s", c->name,
                         c->direct_len, w < 0 ? strerror(errno) : "short write");
                return false;
            }
            done += (size_t)w;
        }
    }
    c->direct_have += n;
    return true;
}

/* data (n bytes just read) at a reply boundary: when it starts a bulk string of DIRECT_MIN bytes or more,
 * that reply is read directly from here on. Returns the bytes of data it took (header and payload), 0 when
 * it does not apply (the data then goes to hiredis as usual), SIZE_MAX when it cannot be kept (errstr). */
static size_t direct_start(struct rconn *c, const char *data, size_t n)
{
    const redisReader *rd = c->ctx->reader;
    if (n < 4 || data[0] != '$' || !reader_at_boundary(rd))
        return 0;
    size_t i = 1;
    unsigned long long len = 0;
    for (; i < n && i < 19 && data[i] >= '0' && data[i] <= '9'; i++)
        len = len * 10 + (unsigned long long)(data[i] - '0');
    if (i + 1 >= n || data[i] != '\r' || data[i + 1] != '\n' || len < DIRECT_MIN)
        return 0;
    i += 2;
    c->direct_len = (size_t)len;
    c->direct = c->direct_memfd ? memfd_buffer(c, c->direct_len + 2) : NULL;
    if (!c->direct && !(c->direct = malloc(c->direct_len + 2)))
        abort();
    size_t take = n - i < c->direct_len + 2 ? n - i : c->direct_len + 2;
    c->direct_have = 0;
    if (!direct_put(c, data + i, take))
        return SIZE_MAX;
    return i + take;
}

/* Releases a direct buffer: malloc'd, or the mapping of direct_fd. */
static void direct_release(struct rconn *c, char *buf, size_t len)
{
    if (c->direct_fd >= 0) {
        munmap(buf, len + 2);
        close(c->direct_fd);
        c->direct_fd = -1;
    } else {
        free(buf);
    }
}

/* Delivers the direct reply once all of it is in. Returns -1 on a protocol error or a closed connection. */
static int direct_finish(struct rconn *c)
{
    if (c->direct_have < c->direct_len + 2)
        return 0;
    char *buf = c->direct;
    size_t len = c->direct_len;
    c->direct = NULL;
    if (buf[len] != '\r' || buf[len + 1] != '\n') {
        direct_release(c, buf, len);
        snprintf(c->errstr, sizeof c->errstr, "%s protocol error: a bulk reply without its CRLF", c->name);
        return -1;
    }
    buf[len] = '\0';
    redisReply *r = calloc(1, sizeof *r); /* freeReplyObject frees both (hiredis's default allocator) */
    if (!r)
        abort();
    r->type = REDIS_REPLY_STRING;
    r->len = len;
    r->str = buf;
    if (c->direct_fd < 0)
        return deliver(c, r);
    /* A mapping: freeReplyObject must never free() it. */
    bool taken = false;
    int rc = deliver_mapped(c, r, &taken);
    if (!taken) {
        direct_release(c, buf, len);
    } else if (c->direct_fd >= 0) {
        close(c->direct_fd); /* the mapping was taken, the descriptor not */
        c->direct_fd = -1;
    }
    return rc;
}

int rconn_read(struct rconn *c)
{
    if (!c->ctx)
        return -1;
    /* Everything the socket holds, in big reads (redisBufferRead takes 16 KiB per call: a 48 MB message then
     * cost 3,000 turns of the main loop, measured at 1.4 s), up to a bound so that the other connections get
     * their turn. */
    static char chunk[256 * 1024]; /* scratch for one read; the main loop is single-threaded */
    for (int rounds = 0; rounds < 256; rounds++) {
        bool direct = c->direct != NULL, in_place = direct && c->direct_fd < 0;
        char *dst = in_place ? c->direct + c->direct_have : chunk;
        size_t room = direct ? c->direct_len + 2 - c->direct_have : sizeof chunk;
        if (!in_place && room > sizeof chunk)
            room = sizeof chunk;
        ssize_t n = read(c->ctx->fd, dst, room);
        if (n > 0) {
            if (direct) {
                if (in_place)
                    c->direct_have += (size_t)n;
                else if (!direct_put(c, chunk, (size_t)n))
                    return -1;
                if (direct_finish(c) < 0)
                    return -1;
                continue;
            }
            size_t used = 0;
            if (n >= 4 && chunk[0] == '$') {
                /* The replies before it go first, so that the reader is at a boundary and order is kept. */
                if (dispatch_replies(c) < 0)
                    return -1;
                used = direct_start(c, chunk, (size_t)n);
                if (used == SIZE_MAX || (used && direct_finish(c) < 0))
                    return -1;
            }
            if (used < (size_t)n && redisReaderFeed(c->ctx->reader, chunk + used, (size_t)n - used) != REDIS_OK) {
                snprintf(c->errstr, sizeof c->errstr, "%s connection lost: protocol error", c->name);
                return -1;
            }
            if ((size_t)n < sizeof chunk)
                break;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            break;
        snprintf(c->errstr, sizeof c->errstr, "%s connection lost: %s", c->name,
                 n == 0 ? "Server closed the connection" : strerror(errno));
        return -1;
    }
    return dispatch_replies(c);
}

struct call_slot {
    redisReply *reply;
    bool done;
};

static void call_done(struct rconn *c, redisReply *reply, void *arg, bool *steal)
{
    (void)c;
    struct call_slot *slot = arg;
    slot->reply = reply;
    slot->done = true;
    *steal = reply != NULL;
}

static redisReply *wait_for(struct rconn *c, struct call_slot *slot)
{
    while (!slot->done) {
        struct pollfd pfd = {c->ctx->fd, POLLIN | (rconn_wants_write(c) ? POLLOUT : 0), 0};
        int n = poll(&pfd, 1, 5000);
        if (n == 0) {
            snprintf(c->errstr, sizeof c->errstr, "%s: no reply within 5 s", c->name);
            rconn_close(c);
            break;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if ((pfd.revents & POLLOUT) && rconn_flush(c) < 0) {
            rconn_close(c);
            break;
        }
        if ((pfd.revents & (POLLIN | POLLHUP | POLLERR)) && rconn_read(c) < 0) {
            rconn_close(c);
            break;
        }
    }
    return slot->reply;
}

redisReply *rconn_call(struct rconn *c, const char *fmt, ...)
{
    if (!c->ctx)
        return NULL;
    struct call_slot slot = {NULL, false};
    va_list ap;
    va_start(ap, fmt);
    redisvAppendCommand(c->ctx, fmt, ap);
    va_end(ap);
    queue_push(c, call_done, &slot);
    return wait_for(c, &slot);
}

redisReply *rconn_call_argv(struct rconn *c, int argc, const char **argv, const size_t *lens)
{
    if (!c->ctx)
        return NULL;
    struct call_slot slot = {NULL, false};
    redisAppendCommandArgv(c->ctx, argc, argv, lens);
    queue_push(c, call_done, &slot);
    return wait_for(c, &slot);
}

void rconn_revoked_add(struct rconn *c, const char *key, const char *id, double now, double ttl, long max)
{
    if (!rconn_connected(c))
        return;
    rconn_command(c, NULL, NULL, "ZADD %s NX %.6f %s", key, now, id);
    rconn_command(c, NULL, NULL, "ZREMRANGEBYSCORE %s -inf (%.6f", key, now - ttl);
    rconn_command(c, NULL, NULL, "ZREMRANGEBYRANK %s 0 %ld", key, -max - 1);
    rconn_command(c, NULL, NULL, "EXPIRE %s %ld", key, (long)ttl);
}

long rconn_revoked_load(struct rconn *c, const char *key, double now, double ttl,
                        void (*fn)(void *arg, const char *id, double when), void *arg)
{
    redisReply *r = rconn_call(c, "ZRANGEBYSCORE %s %.6f +inf WITHSCORES", key, now - ttl);
    long n = -1;
    if (r && r->type == REDIS_REPLY_ARRAY) {
        n = 0;
        for (size_t i = 0; i + 1 < r->elements; i += 2) {
            if (r->element[i]->type != REDIS_REPLY_STRING || r->element[i + 1]->type != REDIS_REPLY_STRING)
                continue;
            fn(arg, r->element[i]->str, strtod(r->element[i + 1]->str, NULL));
            n++;
        }
    }
    if (r)
        freeReplyObject(r);
    return n;
}
