/* The idle wait lent to a pool process: see lentwait.h. */
#include "lentwait.h"

#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <hiredis/hiredis.h>

#include "log.h"
#include "message.h"
#include "task.h"

#define REVOKED_BITS (1u << 19) /* 64 KiB: 50,000 ids (Celery's cap) mark ~17% of it, two bits each: ~3% false hits */
/* A reply this large is read straight into a memfd, which the main process maps for its books instead of
 * getting a copy through the child's socket. Same size as the pool's memfd handoff. */
#define LENT_BIG (1u << 20)

/* Written by the main process only (atomically, byte-wise for the bits), read by the children. */
struct lent_gate {
    uint32_t open;
    uint64_t max_message_size;
    uint8_t revoked[REVOKED_BITS / 8];
};

struct lent_gate *lent_gate_new(void)
{
    struct lent_gate *g = mmap(NULL, sizeof *g, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    return g == MAP_FAILED ? NULL : g; /* zero-filled: closed, nothing revoked */
}

void lent_gate_free(struct lent_gate *g)
{
    if (g)
        munmap(g, sizeof *g);
}

void lent_gate_set(struct lent_gate *g, bool open, size_t max_message_size)
{
    if (!g)
        return;
    __atomic_store_n(&g->max_message_size, (uint64_t)max_message_size, __ATOMIC_RELAXED);
    __atomic_store_n(&g->open, open ? 1u : 0u, __ATOMIC_RELEASE);
}

/* Two bit positions for an id: the halves of its 64-bit FNV-1a hash. */
static void revoked_bits(const char *id, uint32_t *a, uint32_t *b)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (const unsigned char *p = (const unsigned char *)id; *p; p++)
        h = (h ^ *p) * 0x100000001b3ull;
    *a = (uint32_t)h % REVOKED_BITS;
    *b = (uint32_t)(h >> 32) % REVOKED_BITS;
}

size_t lent_gate_max_message_size(const struct lent_gate *g)
{
    return (size_t)__atomic_load_n(&g->max_message_size, __ATOMIC_RELAXED);
}

void lent_gate_revoke(struct lent_gate *g, const char *id)
{
    if (!g)
        return;
    uint32_t a, b;
    revoked_bits(id, &a, &b);
    __atomic_fetch_or(&g->revoked[a / 8], (uint8_t)(1u << (a % 8)), __ATOMIC_RELEASE);
    __atomic_fetch_or(&g->revoked[b / 8], (uint8_t)(1u << (b % 8)), __ATOMIC_RELEASE);
}

static bool maybe_revoked(const struct lent_gate *g, const char *id)
{
    uint32_t a, b;
    revoked_bits(id, &a, &b);
    return (__atomic_load_n(&g->revoked[a / 8], __ATOMIC_ACQUIRE) & (1u << (a % 8))) &&
           (__atomic_load_n(&g->revoked[b / 8], __ATOMIC_ACQUIRE) & (1u << (b % 8)));
}

static bool present(const struct msg_str *s)
{
    return s->s && s->len;
}

const struct task_def *lent_gate_admits(const struct lent_gate *g, const char *raw, size_t len)
{
    if (!__atomic_load_n(&g->open, __ATOMIC_ACQUIRE))
        return NULL;
    size_t max = lent_gate_max_message_size(g);
    struct msg_request req = {0};
    char err[64];
    /* What the main process would do with it on its own: anything but "run it now" is its to decide. */
    const struct task_def *def = NULL;
    if (msg_decode_envelope(raw, len, max, &req, err, sizeof err) == MSG_OK && present(&req.task) &&
        present(&req.id) && !present(&req.eta) && !present(&req.expires) && !maybe_revoked(g, req.id.s))
        def = task_registry_find(req.task.s);
    msg_request_clear(&req);
    return def;
}

int lent_wait_start(struct lent_wait *w, const struct broker_endpoint *ep, const char *key, const char *inbox)
{
    if (!w->conn) {
        char err[256];
        w->conn = broker_connect_blocking(ep, 2000, err, sizeof err);
        if (!w->conn) {
            log_warning("cannot open a connection to wait for messages: %s", err);
            return -1;
        }
    }
    redisAppendCommand(w->conn, "BLMOVE %s %s RIGHT LEFT 0", key, inbox);
    int done = 0;
    while (!done) {
        if (redisBufferWrite(w->conn, &done) != REDIS_OK) {
            lent_wait_cancel(w);
            return -1;
        }
    }
    w->waiting = true;
    return w->conn->fd;
}

void lent_wait_cancel(struct lent_wait *w)
{
    if (w->conn)
        redisFree(w->conn);
    w->conn = NULL;
    w->waiting = false;
}

/* The length a bulk reply header "$<n>\r\n" announces, from the first bytes received, and the header's own
 * length in *head_len; -1 when head is not one (nil, an error, or not all there yet). */
static long long bulk_length(const char *head, size_t n, size_t *head_len)
{
    if (n < 4 || head[0] != '$')
        return -1;
    long long v = 0;
    size_t i = 1;
    for (; i < n && head[i] >= '0' && head[i] <= '9' && i < 20; i++)
        v = v * 10 + (head[i] - '0');
    if (i == 1 || i + 1 >= n || head[i] != '\r' || head[i + 1] != '\n')
        return -1;
    *head_len = i + 2;
    return v;
}

/* Moves exactly len bytes: written to fd (out), or received from the blocking socket fd (its receive timeout
 * bounds a stalled server). */
static bool move_all(int fd, char *p, size_t len, bool out)
{
    while (len) {
        ssize_t n = out ? write(fd, p, len) : recv(fd, p, len, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return false;
        p += n;
        len -= (size_t)n;
    }
    return true;
}

/* The bulk reply whose header (head_len bytes) was peeked, read past hiredis (whose reader holds nothing yet)
 * into a new memfd: size + 2 bytes, the reply's closing CRLF included (its CR made a NUL), as the main
 * process's own big reads are (broker.h). Through write(2) from a small buffer rather than into a mapping: filling 60 MB of fresh shared
 * memory by page faults took 61-67 ms here, writing it 26-29 ms, and mapping it populated afterwards 10 ms.
 * *raw: a read-only MAP_SHARED mapping. false when it cannot be had in full (the connection is then unusable). */
static bool read_into_memfd(int sock, size_t head_len, size_t size, char **raw, int *fd)
{
    char head[32];
    if (!move_all(sock, head, head_len, false))
        return false;
    int m = memfd_create("celeriac-message", MFD_CLOEXEC);
    if (m < 0)
        return false;
    size_t chunk = 256u << 10, left = size + 2;
    char *bounce = malloc(chunk);
    while (bounce && left) {
        ssize_t n = recv(sock, bounce, left < chunk ? left : chunk, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0 || !move_all(m, bounce, (size_t)n, true))
            break;
        left -= (size_t)n;
    }
    free(bounce);
    /* Terminated in place of its CR, as the main process's own reads leave a message. */
    char crlf[2];
    bool whole = left == 0 && pread(m, crlf, 2, (off_t)size) == 2 && crlf[0] == '\r' && crlf[1] == '\n' &&
                 pwrite(m, "", 1, (off_t)size) == 1;
    char *map = whole ? mmap(NULL, size + 2, PROT_READ, MAP_SHARED | MAP_POPULATE, m, 0) : MAP_FAILED;
    if (map == MAP_FAILED) {
        close(m);
        return false;
    }
    *raw = map;
    *fd = m;
    return true;
}

enum lent_outcome lent_wait_read(struct lent_wait *w, const struct lent_gate *g, char **raw, size_t *len, int *fd)
{
    *raw = NULL;
    *len = 0;
    *fd = -1;
    char head[32];
    ssize_t n = recv(w->conn->fd, head, sizeof head, MSG_PEEK);
    if (n > 0 && head[0] == '-') {
        redisReply *r = NULL;
        if (redisGetReply(w->conn, (void **)&r) == REDIS_OK && r && r->type == REDIS_REPLY_ERROR)
            log_warning("BLMOVE refused (%s): the main process waits for messages itself", r->str);
        freeReplyObject(r);
        lent_wait_cancel(w);
        return LENT_REFUSED;
    }
    size_t head_len = 0;
    long long size = n > 0 ? bulk_length(head, (size_t)n, &head_len) : -1;
    size_t max = lent_gate_max_message_size(g);
    /* Over the limit: the main process refuses it as it refuses any other (closing drops the reply unread). */
    if (size < 0 || (max && (unsigned long long)size > max)) {
        lent_wait_cancel(w);
        return LENT_LEFT;
    }
    if (size >= LENT_BIG) {
        if (!read_into_memfd(w->conn->fd, head_len, (size_t)size, raw, fd)) {
            lent_wait_cancel(w);
            return LENT_LEFT;
        }
        *len = (size_t)size;
        w->waiting = false;
        return LENT_MESSAGE;
    }
    redisReply *r = NULL;
    if (redisGetReply(w->conn, (void **)&r) != REDIS_OK || !r || r->type != REDIS_REPLY_STRING) {
        freeReplyObject(r);
        lent_wait_cancel(w);
        return LENT_LEFT;
    }
    *raw = r->str; /* taken over: freeReplyObject frees NULL */
    *len = r->len;
    r->str = NULL;
    freeReplyObject(r);
    w->waiting = false;
    return LENT_MESSAGE;
}

static void *notice_watchdog(void *arg)
{
    struct lent_notice *n = arg;
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGURG);
    for (;;) {
        int sig;
        if (sigwait(&set, &sig) != 0)
            continue;
        pthread_mutex_lock(&n->lock);
        if (n->armed && !n->sent) {
            n->sent = true;
            const char *p = n->frame;
            size_t left = n->len;
            while (left) {
                ssize_t w = write(n->fd, p, left);
                if (w < 0 && errno == EINTR)
                    continue;
                if (w <= 0)
                    break; /* the main process is gone; the task's own thread finds out too */
                p += w;
                left -= (size_t)w;
            }
        }
        pthread_mutex_unlock(&n->lock);
    }
    return NULL;
}

static int notice_start(struct lent_notice *n, int fd)
{
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGURG);
    /* Blocked in this (the task's) thread before the watchdog inherits the mask: only sigwait takes it. */
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    struct sigevent sev = {.sigev_notify = SIGEV_SIGNAL, .sigev_signo = SIGURG};
    if (timer_create(CLOCK_MONOTONIC, &sev, &n->timer) < 0)
        return -1;
    pthread_mutex_init(&n->lock, NULL);
    n->fd = fd;
    pthread_t t;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 64 * 1024);
    int rc = pthread_create(&t, &attr, notice_watchdog, n);
    pthread_attr_destroy(&attr);
    if (rc != 0) {
        timer_delete(n->timer);
        return -1;
    }
    n->started = true;
    return 0;
}

int lent_notice_arm(struct lent_notice *n, int fd, const char *frame, size_t len, double after)
{
    if (!n->started && (n->failed || notice_start(n, fd) < 0)) {
        n->failed = true;
        return -1;
    }
    pthread_mutex_lock(&n->lock);
    n->frame = frame;
    n->len = len;
    n->armed = true;
    n->sent = false;
    pthread_mutex_unlock(&n->lock);
    struct itimerspec it = {{0, 0}, {(time_t)after, (long)((after - (double)(time_t)after) * 1e9)}};
    timer_settime(n->timer, 0, &it, NULL);
    return 0;
}

bool lent_notice_disarm(struct lent_notice *n)
{
    struct itimerspec off = {{0, 0}, {0, 0}};
    timer_settime(n->timer, 0, &off, NULL);
    pthread_mutex_lock(&n->lock);
    bool sent = n->sent;
    n->armed = false;
    pthread_mutex_unlock(&n->lock);
    return sent;
}
