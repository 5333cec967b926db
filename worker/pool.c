/* The prefork pool: see DESIGN in pool.h. pool_* functions run in the main process; child_loop runs in
 * each child, from fork to exit. */
#include "pool.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <hiredis/hiredis.h>

#include "buf.h"
#include "executor.h"
#include "lentwait.h"
#include "log.h"
#include "task.h"

enum {
    FRAME_TASK = 1, FRAME_RESULT = 2, FRAME_TASK_FD = 3,
    FRAME_WAIT = 4, FRAME_RECALL = 5, FRAME_TOOK = 6, FRAME_WAIT_END = 7, FRAME_TOOK_FD = 8, /* lentwait.h */
};
/* Frame: u32 length of what follows | u8 type | payload.
 * TASK payload:    u64 seq | f64 soft time limit (0: the message's or the default) | raw message
 * TASK_FD payload: u64 seq | f64 soft time limit | u64 message length; the message is in a memfd passed
 *                  (SCM_RIGHTS) with the frame's first byte
 * RESULT payload:  u64 seq | u8 flags (1 failed, 2 stored, 4 retried) | f64 runtime | u32 doc length | doc | summary (rest)
 * WAIT payload:    u64 seq (for the task the wait may bring) | u32 key length | queue key | inbox (rest)
 * RECALL:          no payload: end the wait now, if it is still on
 * TOOK payload:    u64 seq | u8 1 when the wait goes on after it, 0 when the lend ends with it | raw message:
 *                  taken by the wait and running now (its RESULT follows)
 * TOOK_FD payload: u64 seq | u8 0 | u64 message length: as TOOK for a message of 1 MiB or more, which is in a
 *                  memfd passed with the frame's first byte (child to main: the only frame that carries one)
 * WAIT_END payload: u8 enum pool_wait_end: the wait is over, nothing was run */
#define FRAME_HEADER 5
/* Messages this large go to the child in a memfd it maps, instead of through the socket: a 60 MB message
 * took ~70 ms of socket round trips (a couple of hundred KiB per wakeup) on top of copying it into the frame
 * buffer; written into a memfd it is one copy, and the child reads it in place. */
#define HANDOFF_MIN (1u << 20)
#define FDS_PER_READ 8 /* the kernel hands over the fds of one send per read; room to spare */
#define LONG_TASK_S 0.0005 /* a child sends results at once after a task this long */
#define BIG_BUFFER (16u << 20) /* a frame buffer this large is freed, not kept, once empty */
#define TOOK_AFTER_S 0.001 /* a lent task running this long is announced before it ends (lentwait.h) */

/* The memfds received over a pool socket and not yet used, in the order of their frames. */
struct fd_fifo {
    int *fds; /* owned, as is every fd in it */
    size_t head, len, cap;
};

/* Reads what the socket has into in, collecting passed fds into fifo. flags: recvmsg's. Returns as read(2). */
static ssize_t read_frames(int fd, struct buf *in, struct fd_fifo *fifo, int flags)
{
    union {
        char buf[CMSG_SPACE(sizeof(int) * FDS_PER_READ)];
        struct cmsghdr align;
    } control;
    struct iovec iov = {in->data + in->len, in->cap - in->len - 1};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf,
                         .msg_controllen = sizeof control.buf};
    ssize_t n = recvmsg(fd, &msg, MSG_CMSG_CLOEXEC | flags);
    for (struct cmsghdr *c = n >= 0 ? CMSG_FIRSTHDR(&msg) : NULL; c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < k; i++) {
            int got;
            memcpy(&got, CMSG_DATA(c) + i * sizeof(int), sizeof got);
            if (fifo->head + fifo->len == fifo->cap) {
                if (fifo->head) {
                    memmove(fifo->fds, fifo->fds + fifo->head, fifo->len * sizeof *fifo->fds);
                    fifo->head = 0;
                }
                if (fifo->len == fifo->cap) {
                    fifo->cap = fifo->cap ? fifo->cap * 2 : 8;
                    if (!(fifo->fds = realloc(fifo->fds, fifo->cap * sizeof *fifo->fds)))
                        abort();
                }
            }
            fifo->fds[fifo->head + fifo->len++] = got;
        }
    }
    return n;
}

/* The oldest fd of fifo (the caller's), or -1 when none came. */
static int fifo_pop(struct fd_fifo *fifo)
{
    if (!fifo->len)
        return -1;
    fifo->len--;
    return fifo->fds[fifo->head++];
}

static void fifo_close_all(struct fd_fifo *fifo)
{
    for (size_t i = 0; i < fifo->len; i++)
        close(fifo->fds[fifo->head + i]);
    fifo->head = fifo->len = 0;
}

struct child {
    pid_t pid;
    int fd;           /* main's end of the socketpair; -1 when dead */
    struct buf out;   /* frames waiting to be written, from out_sent on */
    size_t out_sent;  /* bytes of out already written: consumed lazily, see send_out */
    struct buf in;    /* bytes read, not yet parsed */
    struct fd_fifo fds_in; /* memfds that came with in (TOOK_FD frames) */
    struct handoff {  /* memfds to send with the byte of out at offset `at` (the start of their frame) */
        size_t at;
        int fd;       /* owned until sent */
    } *handoffs;      /* owned; in the order of their frames */
    size_t nhandoffs, handoffs_cap;
    char name[32];    /* "ForkPoolWorker-N", N counting every child ever started, as Celery does */
    struct pool_slot *slot; /* its own shared page, mapped once per index and kept for the index's next child */
    long outstanding;       /* tasks submitted whose result frame has not come back */
    bool wanted;            /* the index should hold a process (false once shrunk away, or never used) */
    bool leaving;           /* takes no new work; its input is closed once it has nothing outstanding */
    bool input_closed;
    bool lent;              /* the broker's wait is lent to it (pool_lend_wait) and has not come back */
    uint64_t lent_next;     /* the seq the next task its wait brings will have */
    bool recalled;          /* ... and a RECALL is on its way */
};

/* One per child, in memory shared with it: the child stamps the task it starts, so the main process can
 * enforce hard time limits without asking. Written only by the child, read only by the main process. */
struct pool_slot {
    uint64_t seq;        /* the task running now, 0 between tasks */
    double started;      /* when it started, pool_clock() seconds */
    uint64_t revoke_seq; /* written by the main process: a running task revoked without terminate */
};

struct pool {
    struct pool_options opt;
    struct pool_handlers h;
    void *arg;
    struct child *children; /* cap entries; indexes are stable for the life of the pool */
    int cap;
    int started;             /* children ever started, for names */
    struct lent_gate *gate;  /* owned; shared with every child */
};

static void put_u32(struct buf *b, uint32_t v)
{
    buf_append(b, &v, sizeof v);
}

static void put_u64(struct buf *b, uint64_t v)
{
    buf_append(b, &v, sizeof v);
}

static uint32_t get_u32(const char *p)
{
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

static uint64_t get_u64(const char *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof v);
    return v;
}


double pool_clock(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static int write_all(int fd, const char *p, size_t len)
{
    while (len) {
        ssize_t n = write(fd, p, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

/* sendmsg of p[0..len) with fd (borrowed) attached to its first byte. Returns as sendmsg(2). */
static ssize_t send_with_fd(int sock, const char *p, size_t len, int fd, int flags)
{
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } control;
    memset(&control, 0, sizeof control);
    struct iovec iov = {(void *)p, len};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf,
                         .msg_controllen = sizeof control.buf};
    struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(cm), &fd, sizeof(int));
    return sendmsg(sock, &msg, flags);
}

/* Forgets the memfds not yet sent (their frames are being dropped). */
static void drop_handoffs(struct child *c)
{
    for (size_t i = 0; i < c->nhandoffs; i++)
        close(c->handoffs[i].fd);
    c->nhandoffs = 0;
}

/* ------------------------------------------------------------------ child side */

/* Resident set size of this process in KiB, or 0 if unknown. */
static long resident_kib(void)
{
    long pages = 0;
    FILE *f = fopen("/proc/self/statm", "r");
    if (f) {
        if (fscanf(f, "%*s %ld", &pages) != 1)
            pages = 0;
        fclose(f);
    }
    return pages * (sysconf(_SC_PAGESIZE) / 1024);
}

/* Whether this child should retire after the task it just ran (Celery's max_tasks_per_child and
 * max_memory_per_child); what it was given beyond it goes to its replacement. */
static bool should_retire(const struct pool_options *opt, long done)
{
    if (opt->max_tasks_per_child > 0 && done >= opt->max_tasks_per_child)
        return true;
    if (opt->max_memory_per_child > 0 && resident_kib() > opt->max_memory_per_child) {
        log_warning("child process uses %ld KiB, more than --max-memory-per-child %d: replacing it", resident_kib(),
                    opt->max_memory_per_child);
        return true;
    }
    return false;
}

/* A child's own connection to the result backend: results of a batch are pipelined, and a frame is marked
 * "stored" only once Redis confirmed its SETEX and PUBLISH. Any trouble and the results go to the main
 * process as usual, whose backend keeps them across outages; the connection is retried a second later. */
struct child_store {
    const struct pool_options *opt;
    redisContext *conn;
    double retry_at;
    size_t *flag_at;  /* offsets in the output buffer of the flag bytes of frames whose doc was sent */
    size_t n, cap;
};

static void store_append(struct child_store *cs, const char *id, const struct buf *doc, size_t flag_at)
{
    if (!cs->opt->results || !doc->len || !id[0])
        return;
    if (!cs->conn) {
        if (pool_clock() < cs->retry_at)
            return;
        char err[256];
        cs->conn = broker_connect_blocking(cs->opt->results, 1000, err, sizeof err);
        if (!cs->conn) {
            cs->retry_at = pool_clock() + 1.0;
            return;
        }
    }
    if (cs->opt->result_expires > 0)
        redisAppendCommand(cs->conn, "SETEX celery-task-meta-%s %ld %b", id, cs->opt->result_expires, doc->data,
                           doc->len);
    else
        redisAppendCommand(cs->conn, "SET celery-task-meta-%s %b", id, doc->data, doc->len);
    redisAppendCommand(cs->conn, "PUBLISH celery-task-meta-%s %b", id, doc->data, doc->len);
    if (cs->n == cs->cap) {
        cs->cap = cs->cap ? cs->cap * 2 : 64;
        cs->flag_at = realloc(cs->flag_at, cs->cap * sizeof *cs->flag_at);
        if (!cs->flag_at)
            abort();
    }
    cs->flag_at[cs->n++] = flag_at;
}

/* Sends the batch's commands and reads their replies, marking each frame whose result is stored. */
static void store_flush(struct child_store *cs, struct buf *out)
{
    size_t i = 0;
    for (; i < cs->n && cs->conn; i++) {
        bool ok = true;
        for (int k = 0; k < 2; k++) {
            void *reply = NULL;
            if (redisGetReply(cs->conn, &reply) != REDIS_OK) {
                redisFree(cs->conn);
                cs->conn = NULL;
                cs->retry_at = pool_clock() + 1.0;
                ok = false;
                break;
            }
            ok = ok && ((redisReply *)reply)->type != REDIS_REPLY_ERROR;
            freeReplyObject(reply);
        }
        if (ok)
            out->data[cs->flag_at[i]] |= 2;
    }
    cs->n = 0;
}

/* The message of a TASK_FD frame: the next memfd, mapped (*map, *maplen: what to munmap) or, should mapping
 * fail, read into *copy (caller frees). Returns the message, or NULL when there is none to be had (the task
 * then fails as an undecodable message would). */
static const char *handoff_message(struct fd_fifo *fifo, size_t len, void **map, size_t *maplen, char **copy)
{
    *map = NULL;
    *copy = NULL;
    int fd = fifo_pop(fifo);
    if (fd < 0 || len == 0) {
        if (fd >= 0)
            close(fd);
        return NULL;
    }
    const char *msg = NULL;
    void *m = mmap(NULL, len, PROT_READ, MAP_PRIVATE | MAP_POPULATE, fd, 0);
    if (m != MAP_FAILED) {
        *map = m;
        *maplen = len;
        msg = m;
    } else if ((*copy = malloc(len))) {
        size_t got = 0;
        while (got < len) {
            ssize_t r = pread(fd, *copy + got, len - got, (off_t)got);
            if (r < 0 && errno == EINTR)
                continue;
            if (r <= 0)
                break;
            got += (size_t)r;
        }
        if (got == len)
            msg = *copy;
    }
    close(fd);
    return msg;
}

/* What a child keeps between tasks. */
struct child_env {
    int fd; /* its end of the socketpair */
    const struct pool_options *opt;
    struct pool_slot *slot;
    const struct lent_gate *gate;
    struct executor *ex;
    struct child_store store;
    struct buf out, doc, summary;
    long done;
    struct lent_wait wait;
    char *wait_key, *wait_inbox; /* owned: what the lent wait moves from and to, kept for the next BLMOVE */
    uint64_t wait_seq;           /* the seq of the next task it brings */
    uint64_t wait_seqs_left;     /* of the block the main process reserved for this lend (POOL_LEND_SEQS) */
    struct lent_notice notice;
    struct buf took; /* the TOOK frame of the lent task running now */
    bool took_announced; /* its watchdog sent it while the task ran (a long task: the lend ends with it) */
};

static int child_send(struct child_env *env);

/* Runs one task and appends its RESULT frame to env->out, sent at once after a long task. took: a lent
 * task's TOOK frame, which goes first (marked: the wait goes on) unless its watchdog sent it already (then
 * took_announced); NULL otherwise. Returns true when the child should retire now (or its socket broke). */
static bool run_task(struct child_env *env, uint64_t seq, double soft_time_limit, const char *message,
                     size_t message_len, struct buf *took)
{
    buf_reset(&env->doc);
    buf_reset(&env->summary);
    double runtime = 0;
    double now = pool_clock();
    __atomic_store(&env->slot->started, &now, __ATOMIC_RELAXED);
    __atomic_store_n(&env->slot->seq, seq, __ATOMIC_RELEASE);
    enum executor_status status = executor_run(env->ex, message, message_len, soft_time_limit, &env->doc,
                                                &env->summary, &runtime);
    __atomic_store_n(&env->slot->seq, 0, __ATOMIC_RELEASE);
    bool retire = should_retire(env->opt, ++env->done);
    struct buf *out = &env->out;
    env->took_announced = took && lent_notice_disarm(&env->notice);
    if (took && !env->took_announced) {
        took->data[4 + 1 + 8] = retire ? 0 : 1; /* it waits again, unless it is leaving now */
        buf_append(out, took->data, took->len);
    }
    put_u32(out, (uint32_t)(1 + 8 + 1 + 8 + 4 + env->doc.len + env->summary.len));
    buf_append_char(out, FRAME_RESULT);
    put_u64(out, seq);
    store_append(&env->store, executor_last_task_id(env->ex), &env->doc, out->len);
    /* bit 0: failed; bit 1 (set by store_flush): stored; bit 2: retried */
    buf_append_char(out, (char)((status == EXECUTOR_FAILED ? 1 : 0) | (status == EXECUTOR_RETRIED ? 4 : 0)));
    buf_append(out, &runtime, sizeof runtime);
    put_u32(out, (uint32_t)env->doc.len);
    buf_append(out, env->doc.data ? env->doc.data : "", env->doc.len);
    buf_append(out, env->summary.data ? env->summary.data : "", env->summary.len);
    if (runtime > LONG_TASK_S || out->len > (1 << 20) || retire)
        return child_send(env) < 0 || retire;
    return false;
}

/* Stores the results gathered and writes every frame waiting in env->out. */
static int child_send(struct child_env *env)
{
    if (!env->out.len)
        return 0;
    store_flush(&env->store, &env->out);
    int rc = write_all(env->fd, env->out.data, env->out.len);
    buf_reset(&env->out);
    return rc;
}

static void wait_end(struct child_env *env, enum pool_wait_end why)
{
    put_u32(&env->out, 2);
    buf_append_char(&env->out, FRAME_WAIT_END);
    buf_append_char(&env->out, (char)why);
}

/* A WAIT frame (payload borrowed): the BLMOVE goes out on the child's own connection. */
static void wait_begin(struct child_env *env, const char *p, size_t len)
{
    uint32_t klen = len >= 12 ? get_u32(p + 8) : 0;
    if (len < 12 || 12 + (size_t)klen >= len || env->wait.waiting || !env->opt->redis) {
        wait_end(env, POOL_WAIT_UNREACHABLE);
        return;
    }
    free(env->wait_key);
    free(env->wait_inbox);
    env->wait_key = strndup(p + 12, klen);
    env->wait_inbox = strndup(p + 12 + klen, len - 12 - klen);
    if (!env->wait_key || !env->wait_inbox)
        abort();
    env->wait_seq = get_u64(p);
    env->wait_seqs_left = POOL_LEND_SEQS;
    if (lent_wait_start(&env->wait, env->opt->redis, env->wait_key, env->wait_inbox) < 0)
        wait_end(env, POOL_WAIT_UNREACHABLE);
}

/* Writes a TOOK_FD frame with fd (borrowed: the main process gets its own reference) after what env->out
 * holds. */
static int took_fd_send(struct child_env *env, uint64_t seq, size_t len, int fd)
{
    if (child_send(env) < 0)
        return -1;
    char frame[4 + 1 + 8 + 1 + 8];
    uint32_t flen = sizeof frame - 4;
    uint64_t len64 = len;
    memcpy(frame, &flen, 4);
    frame[4] = FRAME_TOOK_FD;
    memcpy(frame + 5, &seq, 8);
    frame[13] = 0;
    memcpy(frame + 14, &len64, 8);
    ssize_t w;
    while ((w = send_with_fd(env->fd, frame, sizeof frame, fd, MSG_NOSIGNAL)) < 0 && errno == EINTR)
        ;
    if (w <= 0)
        return -1;
    return write_all(env->fd, frame + w, sizeof frame - (size_t)w);
}

/* A lent message of 1 MiB or more (raw: the mapping of memfd fd, both owned): the main process hears of it
 * at once, with the memfd, and the lend ends with it (a task that size is not a short one). */
static bool run_big_taken(struct child_env *env, const struct task_def *def, char *raw, size_t len, int fd)
{
    uint64_t seq = env->wait_seq++;
    bool stop = took_fd_send(env, seq, len, fd) < 0 ||
                run_task(env, seq, def->soft_time_limit > 0 ? def->soft_time_limit : 0, raw, len, NULL);
    munmap(raw, len + 2);
    close(fd);
    return stop || child_send(env) < 0;
}

static void taken_free(char *raw, size_t len, int fd)
{
    if (fd >= 0) {
        munmap(raw, len + 2);
        close(fd);
    } else {
        free(raw);
    }
}

/* The wait's reply is readable: run the message and wait again at once (the lend lasts until recalled, so a
 * message arriving right after is not left to the main process's slower path), or leave it in the inbox for
 * the main process and end the lend. Returns true when the child should retire now. */
static bool wait_answered(struct child_env *env)
{
    char *raw;
    size_t len;
    int fd;
    enum lent_outcome o = lent_wait_read(&env->wait, env->gate, &raw, &len, &fd);
    const struct task_def *def = o == LENT_MESSAGE ? lent_gate_admits(env->gate, raw, len) : NULL;
    if (!def) {
        taken_free(raw, len, fd);
        wait_end(env, o == LENT_REFUSED ? POOL_WAIT_REFUSED : POOL_WAIT_OVER);
        return child_send(env) < 0;
    }
    if (fd >= 0)
        return run_big_taken(env, def, raw, len, fd);
    struct buf *took = &env->took;
    buf_reset(took);
    put_u32(took, (uint32_t)(1 + 8 + 1 + len));
    buf_append_char(took, FRAME_TOOK);
    put_u64(took, env->wait_seq);
    buf_append_char(took, 0); /* as sent before the task ends: the lend ends with it */
    buf_append(took, raw, len);
    bool deferred = lent_notice_arm(&env->notice, env->fd, took->data, took->len, TOOK_AFTER_S) == 0;
    if (!deferred)
        buf_append(&env->out, took->data, took->len);
    bool stop = child_send(env) < 0 || run_task(env, env->wait_seq, def->soft_time_limit > 0 ? def->soft_time_limit : 0,
                                                raw, len, deferred ? took : NULL);
    free(raw);
    env->wait_seq++;
    if (stop)
        return true;
    /* A short task: its result goes to Redis, then the wait again at once (its TOOK said so), so the next
     * message does not take the main process's slower path, and then the frames. A long one was announced
     * while it ran, ending the lend: meanwhile the main process waited, or lent the wait to another process. */
    if (deferred && !env->took_announced) {
        store_flush(&env->store, &env->out);
        if (--env->wait_seqs_left == 0)
            wait_end(env, POOL_WAIT_OVER); /* the main process lends again, with a fresh block */
        else if (lent_wait_start(&env->wait, env->opt->redis, env->wait_key, env->wait_inbox) < 0)
            wait_end(env, POOL_WAIT_UNREACHABLE);
    }
    return child_send(env) < 0;
}

static void child_loop(int fd, const struct pool_options *opt, struct pool_slot *slot, const struct lent_gate *gate)
{
    struct child_env env = {.fd = fd, .opt = opt, .slot = slot, .gate = gate, .store = {.opt = opt}};
    struct executor_options eopt = {opt->hostname,       opt->redis,         opt->backend,      opt->result_expires,
                                    opt->soft_time_limit, opt->native_queue, opt->default_queue, &slot->seq,
                                    &slot->revoke_seq};
    env.ex = executor_new(&eopt);
    struct buf in = {0};
    struct fd_fifo fifo = {0};
    for (;;) {
        int idle_ms = executor_idle_ms(env.ex);
        if (env.wait.waiting) {
            struct pollfd pf[2] = {{fd, POLLIN, 0}, {env.wait.conn->fd, POLLIN, 0}};
            int ready = poll(pf, 2, idle_ms);
            if (ready == 0)
                executor_idle(env.ex);
            if (ready <= 0)
                continue; /* EINTR, or idle */
            if (pf[1].revents && wait_answered(&env))
                goto done;
            log_flush();
            if (!pf[0].revents)
                continue;
        }
        if (!env.wait.waiting && idle_ms >= 0 && poll(&(struct pollfd){fd, POLLIN, 0}, 1, idle_ms) == 0) {
            executor_idle(env.ex);
            continue;
        }
        buf_reserve(&in, 1 << 16);
        ssize_t n = read_frames(fd, &in, &fifo, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break; /* the main process closed our socket: time to go */
        in.len += (size_t)n;
        size_t off = 0;
        while (in.len - off >= FRAME_HEADER) {
            uint32_t flen = get_u32(in.data + off);
            if (in.len - off < 4 + (size_t)flen)
                break;
            const char *frame = in.data + off + 4;
            off += 4 + flen;
            if (frame[0] == FRAME_WAIT) {
                wait_begin(&env, frame + 1, flen - 1);
                continue;
            }
            if (frame[0] == FRAME_RECALL) {
                if (env.wait.waiting) {
                    lent_wait_cancel(&env.wait);
                    wait_end(&env, POOL_WAIT_OVER);
                }
                continue;
            }
            if (!((frame[0] == FRAME_TASK && flen >= 17) || (frame[0] == FRAME_TASK_FD && flen == 25)))
                continue;
            uint64_t seq = get_u64(frame + 1);
            double soft_time_limit;
            memcpy(&soft_time_limit, frame + 9, sizeof soft_time_limit);
            const char *message = frame + 17;
            size_t message_len = flen - 17;
            void *map = NULL;
            size_t maplen = 0;
            char *copy = NULL;
            if (frame[0] == FRAME_TASK_FD) {
                message_len = get_u64(frame + 17);
                message = handoff_message(&fifo, message_len, &map, &maplen, &copy);
                if (!message) {
                    message = "";
                    message_len = 0;
                }
            }
            bool stop = run_task(&env, seq, soft_time_limit, message, message_len, NULL);
            if (map)
                munmap(map, maplen);
            free(copy);
            if (stop)
                goto done;
        }
        buf_consume(&in, off);
        if (in.len == 0 && in.cap > BIG_BUFFER)
            buf_free(&in);
        if (child_send(&env) < 0)
            goto done;
        log_flush();
    }
done:
    log_flush();
    lent_wait_cancel(&env.wait);
    fifo_close_all(&fifo);
    free(fifo.fds);
    if (env.store.conn)
        redisFree(env.store.conn);
    free(env.store.flag_at);
    buf_free(&in);
    buf_free(&env.out);
    buf_free(&env.doc);
    buf_free(&env.summary);
    buf_free(&env.took);
    free(env.wait_key);
    free(env.wait_inbox);
    executor_free(env.ex);
}

/* ------------------------------------------------------------------ main side */

static int spawn(struct pool *p, int i)
{
    struct child *c = &p->children[i];
    if (!c->slot) {
        c->slot = mmap(NULL, sizeof *c->slot, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
        if (c->slot == MAP_FAILED) {
            c->slot = NULL;
            return -1;
        }
    }
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
        return -1;
    int index = ++p->started;
    log_flush(); /* or the child would flush the parent's buffered lines a second time */
    pid_t pid = fork();
    if (pid < 0) {
        close(sv[0]);
        close(sv[1]);
        return -1;
    }
    if (pid == 0) {
        /* Die with the main process rather than linger as an orphan holding nothing useful. */
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() == 1)
            _exit(1);
        /* Ctrl-C reaches the whole process group; the main process decides how children stop. */
        signal(SIGINT, SIG_IGN);
        signal(SIGTERM, SIG_DFL);
        signal(SIGQUIT, SIG_DFL);
        signal(SIGCHLD, SIG_DFL);
        signal(SIGPIPE, SIG_IGN);
        for (int j = 0; j < p->cap; j++) {
            if (p->children[j].fd >= 0)
                close(p->children[j].fd);
            drop_handoffs(&p->children[j]); /* or this process would pin the others' messages */
        }
        close(sv[0]);
        static char name[32]; /* the log module keeps a pointer to it for the life of the process */
        snprintf(name, sizeof name, "ForkPoolWorker-%d", index);
        log_set_process(name);
        child_loop(sv[1], &p->opt, c->slot, p->gate);
        _exit(0);
    }
    close(sv[1]);
    c->pid = pid;
    c->fd = sv[0];
    c->slot->seq = 0;
    c->outstanding = 0;
    c->out_sent = 0;
    c->wanted = true;
    c->leaving = c->input_closed = c->lent = c->recalled = false;
    snprintf(c->name, sizeof c->name, "ForkPoolWorker-%d", index);
    buf_reset(&c->out);
    buf_reset(&c->in);
    return 0;
}

struct pool *pool_start(const struct pool_options *opt, const struct pool_handlers *h, void *arg, char *err,
                        size_t errlen)
{
    struct pool *p = calloc(1, sizeof *p);
    if (!p)
        abort();
    p->opt = *opt;
    p->h = *h;
    p->arg = arg;
    p->gate = lent_gate_new(); /* NULL: nothing is ever lent */
    if (pool_grow(p, opt->concurrency) < 0) {
        snprintf(err, errlen, "cannot start pool process: %s", strerror(errno));
        pool_kill(p);
        pool_free(p);
        return NULL;
    }
    return p;
}

int pool_grow(struct pool *p, int n)
{
    for (; n > 0; n--) {
        int i = 0;
        while (i < p->cap && (p->children[i].wanted || p->children[i].fd >= 0))
            i++;
        if (i == p->cap) {
            struct child *grown = realloc(p->children, (size_t)(p->cap + 1) * sizeof *grown);
            if (!grown)
                abort();
            p->children = grown;
            p->children[p->cap++] = (struct child){.fd = -1};
        }
        if (spawn(p, i) < 0)
            return -1;
    }
    return 0;
}

static void recall(struct child *c)
{
    if (!c->lent || c->recalled)
        return;
    put_u32(&c->out, 1);
    buf_append_char(&c->out, FRAME_RECALL);
    c->recalled = true;
}

/* Closes a leaving child's input once everything it was given has come back: it reads EOF and exits 0. A
 * lent wait is recalled first (what it brings is settled before the child goes). */
static void release_if_drained(struct child *c)
{
    if (c->leaving && c->lent)
        recall(c);
    if (c->leaving && !c->input_closed && c->fd >= 0 && !c->lent && c->outstanding == 0 && c->out.len == 0) {
        shutdown(c->fd, SHUT_WR);
        c->input_closed = true;
    }
}

int pool_shrink(struct pool *p, int n)
{
    int done = 0;
    /* Idle ones first, as billiard does, then the ones with the least queued. */
    for (long most = 0; done < n && most <= LONG_MAX / 2; most = most ? most * 2 : 1) {
        for (int i = p->cap - 1; i >= 0 && done < n; i--) {
            struct child *c = &p->children[i];
            if (!c->wanted || c->leaving || c->fd < 0 || c->outstanding > most)
                continue;
            c->wanted = false;
            c->leaving = true;
            release_if_drained(c);
            done++;
        }
        if (pool_size(p) == 0)
            break;
    }
    return done;
}

void pool_restart(struct pool *p)
{
    /* The replacements start now, at new indexes, so the pool keeps its size while the old processes finish
     * what they were given; each old index is left empty when its process exits. */
    int replaced = 0;
    for (int i = 0; i < p->cap; i++) {
        struct child *c = &p->children[i];
        if (c->fd >= 0 && c->wanted) {
            c->wanted = false;
            c->leaving = true;
            release_if_drained(c);
            replaced++;
        }
    }
    if (pool_grow(p, replaced) < 0)
        log_error("pool restart: cannot start a pool process: %s", strerror(errno));
}

int pool_size(const struct pool *p)
{
    int n = 0;
    for (int i = 0; i < p->cap; i++)
        n += p->children[i].wanted;
    return n;
}

int pool_capacity(const struct pool *p)
{
    return p->cap;
}

bool pool_accepts(const struct pool *p, int child)
{
    const struct child *c = &p->children[child];
    return c->fd >= 0 && !c->leaving;
}

pid_t pool_child_pid(const struct pool *p, int child)
{
    return p->children[child].pid;
}

bool pool_child_alive(const struct pool *p, int child)
{
    return p->children[child].fd >= 0;
}

bool pool_child_writing(const struct pool *p, int child)
{
    const struct child *c = &p->children[child];
    return c->fd >= 0 && c->out.len > c->out_sent;
}

bool pool_child_leaving(const struct pool *p, int child)
{
    return p->children[child].leaving;
}

/* A memfd holding raw, or -1 when one cannot be had (the message then goes inline). */
static int handoff_fd(const char *raw, size_t len)
{
    int fd = memfd_create("celeriac-task", MFD_CLOEXEC);
    if (fd < 0)
        return -1;
    if (write_all(fd, raw, len) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

void pool_submit(struct pool *p, int child, uint64_t seq, double soft_time_limit, const char *raw, size_t len,
                 int raw_fd)
{
    struct child *c = &p->children[child];
    int fd = -1;
    if (len >= HANDOFF_MIN) /* a memfd the message already lives in is handed over as it is */
        fd = raw_fd >= 0 ? fcntl(raw_fd, F_DUPFD_CLOEXEC, 0) : -1;
    if (len >= HANDOFF_MIN && fd < 0)
        fd = handoff_fd(raw, len);
    if (fd >= 0) {
        if (c->nhandoffs == c->handoffs_cap) {
            c->handoffs_cap = c->handoffs_cap ? c->handoffs_cap * 2 : 4;
            if (!(c->handoffs = realloc(c->handoffs, c->handoffs_cap * sizeof *c->handoffs)))
                abort();
        }
        c->handoffs[c->nhandoffs++] = (struct handoff){c->out.len, fd};
        put_u32(&c->out, 1 + 8 + 8 + 8);
        buf_append_char(&c->out, FRAME_TASK_FD);
        put_u64(&c->out, seq);
        buf_append(&c->out, &soft_time_limit, sizeof soft_time_limit);
        put_u64(&c->out, (uint64_t)len);
        c->outstanding++;
        return;
    }
    put_u32(&c->out, (uint32_t)(1 + 8 + 8 + len));
    buf_append_char(&c->out, FRAME_TASK);
    put_u64(&c->out, seq);
    buf_append(&c->out, &soft_time_limit, sizeof soft_time_limit);
    buf_append(&c->out, raw, len);
    c->outstanding++;
}

bool pool_lend_wait(struct pool *p, int child, uint64_t seq, const char *key, const char *inbox)
{
    struct child *c = &p->children[child];
    if (!p->gate || !pool_accepts(p, child) || c->lent || c->outstanding || !p->opt.redis ||
        p->opt.redis->kind != BROKER_REDIS)
        return false;
    size_t klen = strlen(key), ilen = strlen(inbox);
    put_u32(&c->out, (uint32_t)(1 + 8 + 4 + klen + ilen));
    buf_append_char(&c->out, FRAME_WAIT);
    put_u64(&c->out, seq);
    put_u32(&c->out, (uint32_t)klen);
    buf_append(&c->out, key, klen);
    buf_append(&c->out, inbox, ilen);
    c->lent = true;
    c->lent_next = seq;
    c->recalled = false;
    return true;
}

void pool_recall_wait(struct pool *p, int child)
{
    recall(&p->children[child]);
}

struct lent_gate *pool_gate(struct pool *p)
{
    return p->gate;
}

int pool_pollfds(struct pool *p, struct pollfd *fds, int max)
{
    int n = 0;
    for (int i = 0; i < p->cap && n < max; i++) {
        struct child *c = &p->children[i];
        if (c->fd >= 0)
            fds[n++] = (struct pollfd){c->fd, POLLIN | (c->out.len ? POLLOUT : 0), 0};
    }
    return n;
}

static void child_gone(struct pool *p, int i)
{
    struct child *c = &p->children[i];
    close(c->fd);
    c->fd = -1;
    int status = 0;
    while (waitpid(c->pid, &status, 0) < 0 && errno == EINTR)
        ;
    buf_reset(&c->out);
    c->out_sent = 0;
    drop_handoffs(c);
    buf_reset(&c->in);
    fifo_close_all(&c->fds_in);
    if (c->lent) { /* whatever its wait moved is still in the inbox */
        c->lent = false;
        uint64_t running = 0;
        if (pool_died_running(p, i, &running) && running == c->lent_next)
            p->h.on_wait_took(p->arg, i, running, NULL, 0, -1, true); /* died running it before it said so */
        else
            p->h.on_wait_end(p->arg, i, POOL_WAIT_OVER);
    }
    p->h.on_child_exit(p->arg, i, status);
}

/* A TOOK_FD frame from child i: the message is mapped from its memfd and goes to the handler with it. Should
 * that fail, the handler is told as if the child had died before saying what it took: the message is then read
 * from where the child moved it. */
static void took_fd_received(struct pool *p, int i, uint64_t seq, size_t len)
{
    struct child *c = &p->children[i];
    c->outstanding++;
    c->lent_next = seq + 1;
    c->lent = false;
    int fd = fifo_pop(&c->fds_in);
    char *raw = fd >= 0 ? mmap(NULL, len + 2, PROT_READ, MAP_SHARED, fd, 0) : MAP_FAILED;
    if (raw == MAP_FAILED) {
        if (fd >= 0)
            close(fd);
        p->h.on_wait_took(p->arg, i, seq, NULL, 0, -1, true);
        return;
    }
    p->h.on_wait_took(p->arg, i, seq, raw, len, fd, true);
}

static void parse_results(struct pool *p, int i)
{
    struct child *c = &p->children[i];
    size_t off = 0;
    while (c->in.len - off >= 4) {
        uint32_t flen = get_u32(c->in.data + off);
        if (c->in.len - off < 4 + (size_t)flen)
            break;
        const char *f = c->in.data + off + 4;
        off += 4 + flen;
        if (f[0] == FRAME_TOOK && flen >= 10 && c->lent) {
            c->outstanding++;
            c->lent_next = get_u64(f + 1) + 1;
            c->lent = f[9] == 1;
            p->h.on_wait_took(p->arg, i, get_u64(f + 1), f + 10, flen - 10, -1, !c->lent);
            continue;
        }
        if (f[0] == FRAME_TOOK_FD && flen == 18 && c->lent) {
            took_fd_received(p, i, get_u64(f + 1), (size_t)get_u64(f + 10));
            continue;
        }
        if (f[0] == FRAME_WAIT_END && flen == 2 && c->lent) {
            c->lent = false;
            p->h.on_wait_end(p->arg, i, f[1]);
            continue;
        }
        if (flen < 1 + 8 + 1 + 8 + 4 || f[0] != FRAME_RESULT)
            continue;
        struct pool_result r;
        r.seq = get_u64(f + 1);
        r.failed = (f[9] & 1) != 0;
        r.retried = (f[9] & 4) != 0;
        r.stored = (f[9] & 2) != 0;
        memcpy(&r.runtime, f + 10, sizeof r.runtime);
        uint32_t dlen = get_u32(f + 18);
        if ((size_t)22 + dlen > flen)
            continue;
        r.doc = f + 22;
        r.doc_len = dlen;
        /* The summary runs to the end of the frame; copy it to get a terminated string. */
        size_t slen = flen - 22 - dlen;
        char *summary = malloc(slen + 1);
        if (!summary)
            abort();
        memcpy(summary, f + 22 + dlen, slen);
        summary[slen] = '\0';
        r.summary = summary;
        c->outstanding--;
        p->h.on_result(p->arg, i, &r);
        free(summary);
    }
    buf_consume(&c->in, off);
    release_if_drained(c);
}

/* Writes what the socket takes. A 48 MB message goes out a few hundred KiB per call: moving the rest to the
 * front each time (buf_consume) made that quadratic (~0.5 s of memmove per such message), so the written
 * part is skipped by offset and dropped when everything is out, or compacted once it is most of the buffer. */
static void send_out(struct child *c)
{
    /* A memfd goes with the first byte of its frame, and the bytes before that frame go without it. */
    size_t upto = c->out.len;
    ssize_t w;
    if (c->nhandoffs && c->handoffs[0].at > c->out_sent)
        upto = c->handoffs[0].at;
    if (c->nhandoffs && c->handoffs[0].at == c->out_sent) {
        if (c->nhandoffs > 1)
            upto = c->handoffs[1].at;
        w = send_with_fd(c->fd, c->out.data + c->out_sent, upto - c->out_sent, c->handoffs[0].fd,
                         MSG_DONTWAIT | MSG_NOSIGNAL);
        if (w > 0) { /* the fd went with these bytes: the child holds its own reference now */
            close(c->handoffs[0].fd);
            memmove(c->handoffs, c->handoffs + 1, (c->nhandoffs - 1) * sizeof *c->handoffs);
            c->nhandoffs--;
        }
    } else {
        w = send(c->fd, c->out.data + c->out_sent, upto - c->out_sent, MSG_DONTWAIT | MSG_NOSIGNAL);
    }
    if (w <= 0)
        return;
    c->out_sent += (size_t)w;
    if (c->out_sent == c->out.len) {
        if (c->out.cap > BIG_BUFFER)
            buf_free(&c->out); /* one huge message must not pin its size for the life of the child */
        else
            buf_reset(&c->out);
        c->out_sent = 0;
    } else if (c->out_sent > (1u << 20) && c->out_sent > c->out.len / 2) {
        buf_consume(&c->out, c->out_sent);
        for (size_t i = 0; i < c->nhandoffs; i++)
            c->handoffs[i].at -= c->out_sent;
        c->out_sent = 0;
    }
}

void pool_process(struct pool *p, const struct pollfd *fds, int n)
{
    for (int k = 0; k < n; k++) {
        if (!fds[k].revents)
            continue;
        for (int i = 0; i < p->cap; i++) {
            struct child *c = &p->children[i];
            if (c->fd != fds[k].fd)
                continue;
            if (fds[k].revents & POLLOUT)
                send_out(c);
            if (fds[k].revents & (POLLIN | POLLHUP | POLLERR)) {
                buf_reserve(&c->in, 1 << 16);
                ssize_t r = read_frames(c->fd, &c->in, &c->fds_in, MSG_DONTWAIT);
                if (r > 0) {
                    c->in.len += (size_t)r;
                    parse_results(p, i);
                } else if (r == 0 || (errno != EINTR && errno != EAGAIN)) {
                    child_gone(p, i);
                }
            }
            break;
        }
    }
}

void pool_flush(struct pool *p)
{
    for (int i = 0; i < p->cap; i++) {
        struct child *c = &p->children[i];
        if (c->fd >= 0 && c->out.len)
            send_out(c);
    }
}

int pool_respawn(struct pool *p, int child)
{
    if (!p->children[child].wanted)
        return 1; /* shrunk away: the index stays empty until a grow reuses it */
    return spawn(p, child);
}

void pool_stop(struct pool *p)
{
    for (int i = 0; i < p->cap; i++) {
        struct child *c = &p->children[i];
        if (c->fd < 0)
            continue;
        shutdown(c->fd, SHUT_WR); /* the child sees EOF once it has read everything queued */
    }
    for (int i = 0; i < p->cap; i++) {
        struct child *c = &p->children[i];
        if (c->fd < 0)
            continue;
        int status;
        while (waitpid(c->pid, &status, 0) < 0 && errno == EINTR)
            ;
        close(c->fd);
        c->fd = -1;
    }
}

void pool_kill(struct pool *p)
{
    for (int i = 0; i < p->cap; i++) {
        struct child *c = &p->children[i];
        if (c->fd < 0)
            continue;
        kill(c->pid, SIGKILL);
        int status;
        while (waitpid(c->pid, &status, 0) < 0 && errno == EINTR)
            ;
        close(c->fd);
        c->fd = -1;
    }
}

bool pool_died_running(const struct pool *p, int child, uint64_t *seq)
{
    const struct pool_slot *slot = p->children[child].slot;
    *seq = slot ? __atomic_load_n(&slot->seq, __ATOMIC_ACQUIRE) : 0;
    return *seq != 0;
}

bool pool_running(const struct pool *p, int child, uint64_t *seq, double *started)
{
    struct pool_slot *slot = p->children[child].slot;
    if (p->children[child].fd < 0 || !slot)
        return false;
    uint64_t s = __atomic_load_n(&slot->seq, __ATOMIC_ACQUIRE);
    if (!s)
        return false;
    *seq = s;
    __atomic_load(&slot->started, started, __ATOMIC_RELAXED);
    return true;
}

void pool_flag_revoked(struct pool *p, int child, uint64_t seq)
{
    if (p->children[child].slot)
        __atomic_store_n(&p->children[child].slot->revoke_seq, seq, __ATOMIC_RELEASE);
}

void pool_kill_child(struct pool *p, int child)
{
    if (p->children[child].fd >= 0)
        kill(p->children[child].pid, SIGKILL);
}

void pool_free(struct pool *p)
{
    if (!p)
        return;
    lent_gate_free(p->gate);
    for (int i = 0; i < p->cap; i++) {
        if (p->children[i].slot)
            munmap(p->children[i].slot, sizeof *p->children[i].slot);
        buf_free(&p->children[i].out);
        buf_free(&p->children[i].in);
        drop_handoffs(&p->children[i]);
        free(p->children[i].handoffs);
        fifo_close_all(&p->children[i].fds_in);
        free(p->children[i].fds_in.fds);
    }
    free(p->children);
    free(p);
}
