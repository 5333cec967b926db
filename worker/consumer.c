/* The main loop: see consumer.h. Main process only; pool children never run any of this. */
#include "consumer.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "broker.h"
#include "buf.h"
#include "executor.h"
#include "log.h"
#include "message.h"
#include "pool.h"
#include "result.h"
#include "task.h"

/* One message from the moment it is fetched until it is settled (result stored and acked, or requeued). */
struct job {
    struct broker_delivery *delivery; /* owned */
    struct msg_request req;           /* decoded in the main process; owned */
    uint64_t seq;
    double cost;                      /* expected runtime when dispatched (seconds) */
    double hard_limit;                /* seconds, 0: none (the message's timelimit, else --time-limit) */
    double eta;                       /* epoch seconds before which it must not run; 0: at once */
    double expires;                   /* epoch seconds after which it is revoked, not run; INFINITY: never */
    bool acked;
    bool requeued;
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
    double backlog;       /* sum of the expected runtimes of those jobs */
};

/* Expected runtime per task name (an moving average), so that short tasks are queued to children ahead of
 * time (keeping the pool busy while the main loop talks to Redis) while long ones are handed out one at a
 * time to whichever child is free, as Celery's fair scheduling does. */
#define COST_SLOTS 256
#define COST_UNKNOWN 0.002 /* a task never seen is assumed long: handed only to an idle child */
#define DISPATCH_HORIZON 0.002 /* queue to a busy child only while its backlog is shorter than this */
#define CHILD_QUEUE_MAX 256

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
    char *broker_display, *backend_display;
    struct broker *broker;
    struct backend *backend; /* NULL: results are not stored (no result backend configured) */
    struct pool *pool;
    struct child_state *children;

    struct job_list ready; /* decoded, waiting for a child */
    struct eta_heap eta;   /* ETA jobs not yet due (unacked, but not counted in `held`: stock Celery raises its
                            * prefetch count by one for each, so they do not hold up the queue) */
    char *scan_mark;       /* owned: tag of the first over-cap ETA message returned in this scan, or NULL */
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
    unsigned long processed;
    bool stopping;         /* warm shutdown under way */
    bool cold;             /* cold shutdown requested */
};

/* Signal handlers only record what arrived; the loop acts on it (style.md). */
static volatile sig_atomic_t got_term, got_quit;
static int signal_pipe[2] = {-1, -1};

static void on_signal(int sig)
{
    int saved = errno;
    if (sig == SIGQUIT)
        got_quit = 1;
    else
        got_term++;
    char c = (char)sig;
    if (write(signal_pipe[1], &c, 1) < 0) {
        /* the pipe is full: the loop is already awake */
    }
    errno = saved;
}

static double epoch_now(void)
{
    struct timeval tv;
    gettimeofday(&tv, NULL);
    return (double)tv.tv_sec + tv.tv_usec / 1e6;
}

static void list_push(struct job_list *l, struct job *j)
{
    j->next = NULL;
    if (l->tail)
        l->tail->next = j;
    else
        l->head = j;
    l->tail = j;
    l->len++;
}

static struct job *list_pop(struct job_list *l)
{
    struct job *j = l->head;
    if (!j)
        return NULL;
    l->head = j->next;
    if (!l->head)
        l->tail = NULL;
    l->len--;
    j->next = NULL;
    return j;
}

static bool eta_before(const struct job *a, const struct job *b)
{
    return a->eta < b->eta || (a->eta == b->eta && a->seq < b->seq); /* ties: in arrival order */
}

static void eta_sift_up(struct eta_heap *h, size_t i)
{
    while (i > 0 && eta_before(h->v[i], h->v[(i - 1) / 2])) {
        struct job *t = h->v[i];
        h->v[i] = h->v[(i - 1) / 2];
        h->v[(i - 1) / 2] = t;
        i = (i - 1) / 2;
    }
}

static void eta_sift_down(struct eta_heap *h, size_t i)
{
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < h->n && eta_before(h->v[l], h->v[m]))
            m = l;
        if (r < h->n && eta_before(h->v[r], h->v[m]))
            m = r;
        if (m == i)
            return;
        struct job *t = h->v[i];
        h->v[i] = h->v[m];
        h->v[m] = t;
        i = m;
    }
}

/* Takes ownership of j. */
static void eta_push(struct eta_heap *h, struct job *j)
{
    if (h->n == h->cap) {
        h->cap = h->cap ? h->cap * 2 : 64;
        h->v = realloc(h->v, h->cap * sizeof *h->v);
        if (!h->v)
            abort();
    }
    h->v[h->n++] = j;
    eta_sift_up(h, h->n - 1);
}

/* Removes the job at index i and gives it to the caller. */
static struct job *eta_remove(struct eta_heap *h, size_t i)
{
    struct job *j = h->v[i];
    h->v[i] = h->v[--h->n];
    if (i < h->n) {
        eta_sift_down(h, i);
        eta_sift_up(h, i);
    }
    return j;
}

/* Index of the job due last: one of the leaves of a min-heap. h must not be empty. */
static size_t eta_latest(const struct eta_heap *h)
{
    size_t best = h->n / 2;
    for (size_t i = best + 1; i < h->n; i++)
        if (eta_before(h->v[best], h->v[i]))
            best = i;
    return best;
}

static void job_free(struct job *j)
{
    msg_request_clear(&j->req);
    broker_delivery_free(j->delivery);
    free(j);
}

static void job_ack(struct consumer *c, struct job *j)
{
    if (j->acked)
        return;
    broker_ack(c->broker, j->delivery->tag);
    j->acked = true;
    c->held--;
}

static void job_label(const struct job *j, char *dst, size_t len)
{
    snprintf(dst, len, "%s[%s]", j->req.task.s ? j->req.task.s : "<unknown>", j->req.id.s ? j->req.id.s : "?");
}

static struct cost_slot *cost_slot(struct consumer *c, const char *name, bool create)
{
    uint64_t h = 1469598103934665603ULL;
    for (const char *p = name; *p; p++)
        h = (h ^ (unsigned char)*p) * 1099511628211ULL;
    for (size_t i = 0; i < COST_SLOTS; i++) {
        struct cost_slot *s = &c->costs[(h + i) % COST_SLOTS];
        if (s->name && strcmp(s->name, name) == 0)
            return s;
        if (!s->name) {
            if (!create)
                return NULL;
            s->name = strdup(name);
            s->avg = -1;
            return s;
        }
    }
    return NULL; /* table full: every further name counts as unknown */
}

static double expected_cost(struct consumer *c, const char *name)
{
    struct cost_slot *s = cost_slot(c, name, false);
    return s && s->avg >= 0 ? s->avg : COST_UNKNOWN;
}

static void learn_cost(struct consumer *c, const char *name, double runtime)
{
    struct cost_slot *s = cost_slot(c, name, true);
    if (s)
        s->avg = s->avg < 0 ? runtime : 0.8 * s->avg + 0.2 * runtime;
}

/* ------------------------------------------------------------------ results */

static void on_stored(void *arg, bool ok);

struct store_ctx {
    struct consumer *c;
    struct job *job; /* settled (acked if late, freed) once stored; NULL for documents of no job */
};

static void store_doc(struct consumer *c, struct job *j, const char *task_id, const char *doc, size_t len)
{
    if (!c->backend || !len || !task_id) {
        if (j) {
            job_ack(c, j);
            job_free(j);
        }
        return;
    }
    struct store_ctx *sc = malloc(sizeof *sc);
    if (!sc)
        abort();
    sc->c = c;
    sc->job = j;
    c->stores_in_flight++;
    backend_store(c->backend, task_id, doc, len, on_stored, sc);
}

static void on_stored(void *arg, bool ok)
{
    struct store_ctx *sc = arg;
    struct consumer *c = sc->c;
    c->stores_in_flight--;
    if (sc->job) {
        if (ok) {
            job_ack(c, sc->job);
        } else {
            char label[256];
            job_label(sc->job, label, sizeof label);
            log_error("Could not store the result of %s: %s", label, backend_errstr(c->backend));
            /* Not acked: with late ack the unacked record stays, so the visibility timeout brings the message
             * back instead of losing it. It no longer counts against prefetch. */
            if (!sc->job->acked) {
                sc->job->acked = true;
                c->held--;
            }
        }
        job_free(sc->job);
    }
    free(sc);
}

/* Settles a job the main process refuses without running it: FAILURE stored when the id is known, acked.
 * with_traceback: false where stock Celery stores a null traceback (NotRegistered). */
static void fail_job(struct consumer *c, struct job *j, const char *exc_type, const char *message,
                     bool with_traceback)
{
    struct buf doc = {0};
    if (j->req.id.s) { /* even with ignore_result: see fail_doc in executor.c */
        struct buf tb = {0};
        if (with_traceback)
            result_traceback(&tb, j->req.task.s ? j->req.task.s : "?", exc_type, message);
        struct result_meta meta = {.task_id = j->req.id.s, .group_id = j->req.group.s,
                                   .parent_id = j->req.parent_id.s};
        result_doc_exception(&doc, &meta, "FAILURE", exc_type, message, tb.data, epoch_now());
        buf_free(&tb);
    }
    store_doc(c, j, j->req.id.s, doc.data, doc.len);
    buf_free(&doc);
}

static void log_received(const struct job *j)
{
    if (log_enabled(LOG_INFO)) {
        char label[256];
        job_label(j, label, sizeof label);
        log_info("Task %s received", label);
    }
}

/* Settles a job whose `expires` has passed without running it, as stock Celery's Request.revoked() does:
 * REVOKED with TaskRevokedError("expired") and a null traceback, then acked. j must be counted in held. */
static void revoke_expired(struct consumer *c, struct job *j)
{
    char label[256];
    job_label(j, label, sizeof label);
    log_info("Discarding revoked task: %s", label);
    struct buf doc = {0};
    if (j->req.id.s) { /* even with ignore_result: stock stores errors unless the *task* ignores results */
        struct result_meta meta = {.task_id = j->req.id.s, .group_id = j->req.group.s,
                                   .parent_id = j->req.parent_id.s};
        result_doc_exception(&doc, &meta, "REVOKED", "TaskRevokedError", "expired", NULL, epoch_now());
    }
    store_doc(c, j, j->req.id.s, doc.data, doc.len);
    buf_free(&doc);
}

/* Reads the eta and expires headers into j. An empty string means none, as Celery's maybe_iso8601 has it.
 * A time that cannot be read makes the stock worker raise InvalidTaskError (worker/request.py), log the
 * message and reject it without a result; here the job is failed with InvalidTaskError (the same wording) so
 * that the client's get() does not wait forever, and acked. Returns 0, or -1 when j was settled. */
static int job_read_times(struct consumer *c, struct job *j)
{
    const struct msg_str *fields[] = {&j->req.eta, &j->req.expires};
    double *out[] = {&j->eta, &j->expires};
    const char *names[] = {"ETA", "expires"};
    for (size_t i = 0; i < 2; i++) {
        if (!fields[i]->s || !fields[i]->len)
            continue;
        double t = msg_parse_time(fields[i]->s, fields[i]->len);
        if (t >= 0) {
            *out[i] = t;
            continue;
        }
        struct buf repr = {0}, message = {0};
        result_repr_str(&repr, fields[i]->s, fields[i]->len < 100 ? fields[i]->len : 100); /* peer-sized */
        buf_printf(&message, "invalid %s value %s: unable to parse date string %s", names[i], repr.data,
                   repr.data);
        log_error("Received invalid task message: %s\nThe message has been ignored and discarded.", message.data);
        fail_job(c, j, "InvalidTaskError", message.data, true);
        buf_free(&repr);
        buf_free(&message);
        return -1;
    }
    return 0;
}

/* Messages returned to the queue by the ETA cap: see ETA_SCAN_MAX. Called for every delivery (tag borrowed),
 * before it is handled: the scan is over when its first returned message comes round again. */
static void eta_scan_check(struct consumer *c, const char *tag)
{
    if (!c->scan_mark || (strcmp(tag, c->scan_mark) != 0 && c->scan_returned < ETA_SCAN_MAX))
        return;
    double now = epoch_now(), took = now - c->scan_started;
    c->fetch_resume_min = now + ETA_PAUSE_RATIO * took;
    c->fetch_paused_until = now + fmax(ETA_PAUSE_MIN, ETA_PAUSE_RATIO * took);
    log_debug("Returned %ld ETA task(s) over --max-eta-reserved to their queues in %.3fs; next look in %.3fs",
              c->scan_returned, took, c->fetch_paused_until - now);
    free(c->scan_mark);
    c->scan_mark = NULL;
    c->scan_returned = 0;
}

/* An ETA job the cap leaves no room for: back to its queue, unchanged, behind what is queued now. Frees j,
 * which must not be counted in held. */
static void eta_return(struct consumer *c, struct job *j)
{
    if (!c->cap_warned) {
        log_warning("%zu ETA tasks are held (--max-eta-reserved); the ones due later stay in their queues until "
                    "there is room", c->eta.n);
        c->cap_warned = true;
    }
    broker_defer(c->broker, j->delivery);
    if (!c->scan_mark) {
        c->scan_mark = strdup(j->delivery->tag);
        if (!c->scan_mark)
            abort();
        /* Returned in the fetch that ended the last scan, it starts this one, which only goes on once the
         * pause is over: the time spent waiting is not time spent scanning. */
        c->scan_started = fmax(epoch_now(), c->fetch_paused_until);
    }
    c->scan_returned++;
    job_free(j);
}

/* Holds a job whose eta is in the future until it is due, without counting it against prefetch. With the cap
 * reached, the job due last (this one or a held one) goes back to the queue, so the worker always holds the
 * ones due first. Takes ownership of j (counted in held when called). */
static void eta_hold(struct consumer *c, struct job *j)
{
    c->held--;
    long cap = c->cfg->max_eta_reserved;
    if (cap > 0 && c->eta.n >= (size_t)cap) {
        size_t last = eta_latest(&c->eta);
        if (eta_before(j, c->eta.v[last])) {
            struct job *out = eta_remove(&c->eta, last);
            log_received(j);
            eta_push(&c->eta, j);
            j = out;
        }
        eta_return(c, j); /* not logged as received: it comes round again at every scan */
        return;
    }
    log_received(j);
    eta_push(&c->eta, j);
}

/* Moves the held ETA jobs that are due to the ready list (where they count against prefetch like any other),
 * revoking the ones that expired while they waited. */
static void eta_release(struct consumer *c, double now)
{
    while (c->eta.n && c->eta.v[0]->eta <= now) {
        struct job *j = eta_remove(&c->eta, 0);
        c->held++;
        if (c->fetch_paused_until > c->fetch_resume_min)
            c->fetch_paused_until = c->fetch_resume_min; /* room for one more: look at the queue again */
        if (now > j->expires)
            revoke_expired(c, j);
        else
            list_push(&c->ready, j);
    }
}

/* ------------------------------------------------------------------ broker events */

static void on_deliver(void *arg, struct broker_delivery *d)
{
    struct consumer *c = arg;
    struct job *j = calloc(1, sizeof *j);
    if (!j)
        abort();
    j->delivery = d;
    j->seq = ++c->next_seq;
    j->expires = INFINITY;
    c->held++;
    eta_scan_check(c, d->tag);
    if (c->stopping) {
        /* Fetched after the shutdown began: straight back where it came from. */
        broker_requeue(c->broker, d);
        c->held--;
        job_free(j);
        return;
    }
    char err[256] = "";
    int rc = msg_decode(d->raw, d->len, (size_t)c->cfg->max_message_size, &j->req, err, sizeof err);
    if (rc != MSG_OK) {
        size_t show = d->len < 512 ? d->len : 512;
        log_error("Received invalid message%s%s: %s; message (%zu bytes): %.*s", j->req.id.s ? " for task " : "",
                  j->req.id.s ? j->req.id.s : "", err, d->len, (int)show, d->raw);
        fail_job(c, j, executor_decode_exc_type(rc), err, true);
        return;
    }
    if (!task_registry_find(j->req.task.s)) {
        log_error("Received unregistered task of type '%s'.\nThe message has been ignored and discarded.",
                  j->req.task.s);
        fail_job(c, j, "NotRegistered", j->req.task.s, false);
        return;
    }
    if (job_read_times(c, j) < 0)
        return;
    double now = epoch_now();
    if (j->eta > now && now <= j->expires) {
        eta_hold(c, j);
        return;
    }
    log_received(j);
    if (now > j->expires)
        revoke_expired(c, j);
    else
        list_push(&c->ready, j);
}

/* ------------------------------------------------------------------ pool events */

static void on_result(void *arg, int child, const struct pool_result *r)
{
    struct consumer *c = arg;
    struct job *j = list_pop(&c->children[child].jobs);
    if (!j || j->seq != r->seq) {
        log_critical("pool child %d answered out of order (seq %llu); this is a bug", child,
                     (unsigned long long)r->seq);
        if (j)
            job_free(j);
        return;
    }
    c->processed++;
    c->children[child].backlog -= j->cost;
    if (c->children[child].backlog < 0 || !c->children[child].jobs.len)
        c->children[child].backlog = 0;
    learn_cost(c, j->req.task.s, r->runtime);
    if (r->failed || log_enabled(LOG_INFO)) {
        char label[256];
        job_label(j, label, sizeof label);
        if (r->failed)
            log_error("Task %s raised unexpected: %s", label, r->summary);
        else if (r->retried)
            log_info("Task %s retry: %s", label, r->summary); /* stock Celery's wording */
        else
            log_info("Task %s succeeded in %.6gs: %s", label, r->runtime, r->summary);
    }
    if (r->stored) {
        job_ack(c, j); /* late ack: the child has had the result confirmed */
        job_free(j);
    } else {
        store_doc(c, j, j->req.id.s, r->doc, r->doc_len);
    }
}

static void on_child_exit(void *arg, int child, int status)
{
    struct consumer *c = arg;
    struct job_list lost = c->children[child].jobs;
    c->children[child].jobs = (struct job_list){0};
    c->children[child].backlog = 0;
    char why[96];
    if (WIFSIGNALED(status))
        snprintf(why, sizeof why, "signal %d (%s)", WTERMSIG(status), sigabbrev_np(WTERMSIG(status)) ?
                 sigabbrev_np(WTERMSIG(status)) : "?");
    else
        snprintf(why, sizeof why, "exitcode %d", WEXITSTATUS(status));
    uint64_t killed_seq = c->children[child].killed_seq, running_seq = 0;
    c->children[child].killed_seq = 0;
    /* Only the job the child had started is lost with it; the ones behind it go to another child. */
    struct job *running = NULL;
    if (pool_died_running(c->pool, child, &running_seq) && lost.head && lost.head->seq == running_seq)
        running = list_pop(&lost);
    if (running && running->seq == killed_seq) {
        char label[256];
        job_label(running, label, sizeof label);
        log_error("Hard time limit (%gs) exceeded for %s", running->hard_limit, label);
        log_error("Task handler raised error: TimeLimitExceeded(%g,) [%s]", running->hard_limit, label);
        c->processed++;
        struct buf doc = {0}, tb = {0};
        char message[64];
        snprintf(message, sizeof message, "TimeLimitExceeded(%g,)", running->hard_limit);
        result_traceback(&tb, running->req.task.s, "TimeLimitExceeded", message);
        json_t *args = json_pack("[f]", running->hard_limit);
        struct result_meta meta = {.task_id = running->req.id.s, .group_id = running->req.group.s,
                                   .parent_id = running->req.parent_id.s};
        if (running->req.id.s)
            result_doc_exception_args(&doc, &meta, "FAILURE", "TimeLimitExceeded", args, tb.data, epoch_now());
        json_decref(args);
        store_doc(c, running, running->req.id.s, doc.data, doc.len);
        buf_free(&doc);
        buf_free(&tb);
        running = NULL;
    }
    if (running) {
        char label[256], message[160];
        job_label(running, label, sizeof label);
        /* billiard's wording, "signal 11 (SIGSEGV)" or "exitcode 3", with our sequence number as the job. */
        if (WIFSIGNALED(status))
            snprintf(message, sizeof message, "Worker exited prematurely: signal %d (SIG%s) Job: %llu.",
                     WTERMSIG(status), sigabbrev_np(WTERMSIG(status)) ? sigabbrev_np(WTERMSIG(status)) : "?",
                     (unsigned long long)running->seq);
        else
            snprintf(message, sizeof message, "Worker exited prematurely: exitcode %d Job: %llu.",
                     WEXITSTATUS(status), (unsigned long long)running->seq);
        log_error("Task handler raised error: WorkerLostError('%s') [%s]", message, label);
        c->processed++;
        fail_job(c, running, "WorkerLostError", message, true);
    }
    struct job *j;
    struct job_list back = {0};
    while ((j = list_pop(&lost)))
        list_push(&back, j);
    while ((j = list_pop(&c->ready)))
        list_push(&back, j);
    c->ready = back;
    if (!c->stopping || c->ready.len) {
        if (WIFEXITED(status) && WEXITSTATUS(status) == 0)
            log_info("Pool process %d retired (task or memory limit); starting a new one",
                     (int)pool_child_pid(c->pool, child));
        else if (!killed_seq)
            log_error("Pool process %d exited (%s); starting a new one", (int)pool_child_pid(c->pool, child), why);
        if (pool_respawn(c->pool, child) < 0)
            log_critical("cannot restart pool process: %s", strerror(errno));
    }
}

/* ------------------------------------------------------------------ time limits */

/* Kills the child of every task past its hard limit; on_child_exit then fails it with TimeLimitExceeded.
 * Returns the milliseconds until the next limit could pass (for the poll timeout), or -1 when none runs. */
static int enforce_time_limits(struct consumer *c)
{
    double now = pool_clock(), next = -1;
    for (int i = 0; i < pool_size(c->pool); i++) {
        struct child_state *cs = &c->children[i];
        struct job *j = cs->jobs.head;
        uint64_t seq;
        double started;
        if (!j || j->hard_limit <= 0 || cs->killed_seq || !pool_running(c->pool, i, &seq, &started) ||
            seq != j->seq)
            continue;
        double left = started + j->hard_limit - now;
        if (left <= 0) {
            cs->killed_seq = seq;
            pool_kill_child(c->pool, i);
        } else if (next < 0 || left < next) {
            next = left;
        }
    }
    /* A task queued behind a running one starts later; look again soon rather than compute when. */
    for (int i = 0; i < pool_size(c->pool); i++)
        if (c->children[i].jobs.head && c->children[i].jobs.head->hard_limit > 0 && (next < 0 || next > 0.05))
            next = 0.05;
    return next < 0 ? -1 : (int)(next * 1000) + 1;
}

/* ------------------------------------------------------------------ dispatch */

static void dispatch(struct consumer *c)
{
    int n = pool_size(c->pool);
    double now = epoch_now();
    while (c->ready.len) {
        struct job *j = c->ready.head;
        if (now > j->expires) { /* it may have waited here, behind a backlog, past its expiry */
            revoke_expired(c, list_pop(&c->ready));
            continue;
        }
        double cost = expected_cost(c, j->req.task.s);
        int best = -1;
        for (int i = 0; i < n; i++) {
            struct child_state *cs = &c->children[i];
            if (best < 0 || cs->backlog < c->children[best].backlog ||
                (cs->backlog == c->children[best].backlog && cs->jobs.len < c->children[best].jobs.len))
                best = i;
        }
        struct child_state *cs = &c->children[best];
        if (cs->jobs.len && (cs->backlog + cost > DISPATCH_HORIZON || cs->jobs.len >= CHILD_QUEUE_MAX))
            break; /* every child has enough to do; the rest waits here, where it can still be requeued */
        list_pop(&c->ready);
        j->cost = cost;
        j->hard_limit = j->req.has_time_limit ? j->req.time_limit : c->cfg->time_limit;
        cs->backlog += cost;
        pool_submit(c->pool, best, j->seq, j->delivery->raw, j->delivery->len);
        list_push(&cs->jobs, j);
        if (!c->cfg->acks_late)
            job_ack(c, j); /* early ack: the pool has accepted it */
        if (c->cfg->track_started && c->backend && j->req.id.s && !j->req.ignore_result) {
            struct buf doc = {0};
            struct result_meta meta = {.task_id = j->req.id.s, .group_id = j->req.group.s,
                                       .parent_id = j->req.parent_id.s};
            result_doc_started(&doc, &meta, (int)pool_child_pid(c->pool, best), c->cfg->node_name);
            store_doc(c, NULL, j->req.id.s, doc.data, doc.len);
            buf_free(&doc);
        }
    }
}

/* ------------------------------------------------------------------ set-up */

static int endpoint_from_url(const char *url, struct redis_url *u, struct broker_endpoint *ep, char **display,
                             char *err, size_t errlen)
{
    if (redis_url_parse(url, u, err, errlen) < 0)
        return -1;
    *display = redis_url_redact(url);
    *ep = (struct broker_endpoint){u->host, u->port, u->socket, u->username, u->password, u->db, *display};
    return 0;
}

static void log_from_broker(int level, const char *line)
{
    log_msg((enum log_level)level, "%s", line);
}

static void install_signals(void)
{
    if (pipe2(signal_pipe, O_NONBLOCK | O_CLOEXEC) < 0)
        abort();
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGQUIT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
}

static void begin_warm_shutdown(struct consumer *c)
{
    c->stopping = true;
    log_warning("worker: Warm shutdown (MainProcess)");
    /* Held ETA jobs go back too, as stock Celery restores them (they were never counted in held); first, so
     * that the prefetched ones, which are due now, end up nearest the consuming end. */
    size_t held_eta = c->eta.n;
    while (c->eta.n) {
        struct job *e = eta_remove(&c->eta, c->eta.n - 1);
        broker_requeue(c->broker, e->delivery);
        job_free(e);
    }
    if (held_eta)
        log_info("Restored %zu ETA message(s) to their queues", held_eta);
    /* Back in reverse order, each to the consuming end, so the queue hands them out in the original order. */
    int n = c->ready.len, i = 0;
    struct job **all = calloc((size_t)n + 1, sizeof *all);
    struct job *j;
    while ((j = list_pop(&c->ready)))
        all[i++] = j;
    for (i = n - 1; i >= 0; i--) {
        broker_requeue(c->broker, all[i]->delivery);
        c->held--;
        job_free(all[i]);
    }
    free(all);
    if (n)
        log_info("Restored %d prefetched message(s) to their queues", n);
}

static bool busy(const struct consumer *c)
{
    for (int i = 0; i < pool_size(c->pool); i++)
        if (c->children[i].jobs.len)
            return true;
    /* broker_pending: requeues of a warm shutdown (up to --max-eta-reserved held ETA messages) may be more than
     * the socket takes at once; leaving before they are written would leave them to the visibility timeout. */
    return c->stores_in_flight > 0 || broker_fetch_in_flight(c->broker) > 0 || c->ready.len > 0 ||
           broker_pending(c->broker) > 0;
}

int consumer_run(const struct config *cfg)
{
    struct consumer cons = {0}, *c = &cons;
    char err[512];
    int exit_code = 1;
    c->cfg = cfg;
    c->prefetch = cfg->concurrency * cfg->prefetch_multiplier;
    if (c->prefetch <= 0)
        c->prefetch = 1 << 30; /* Celery: a multiplier of 0 means no limit */

    if (endpoint_from_url(cfg->broker_url, &c->broker_url, &c->broker_ep, &c->broker_display, err, sizeof err) < 0)
        goto fail_config;
    if (cfg->result_backend &&
        endpoint_from_url(cfg->result_backend, &c->backend_url, &c->backend_ep, &c->backend_display, err,
                          sizeof err) < 0)
        goto fail_config;

    install_signals();
    task_registry_enable_test_tasks(cfg->enable_test_tasks);
    /* Fork the pool first: no connection may cross a fork. */
    c->children = calloc((size_t)cfg->concurrency, sizeof *c->children);
    /* Children store results themselves, except with --track-started: the main process writes STARTED, and
     * a child's SUCCESS on another connection could then land before it and be overwritten. */
    struct pool_options popt = {cfg->concurrency,
                                cfg->soft_time_limit,
                                cfg->max_tasks_per_child,
                                cfg->max_memory_per_child,
                                cfg->node_name,
                                &c->broker_ep,
                                cfg->result_backend && !cfg->track_started ? &c->backend_ep : NULL,
                                cfg->result_expires,
                                cfg->result_backend ? &c->backend_ep : NULL,
                                cfg->queues[0],
                                cfg->default_queue};
    struct pool_handlers ph = {on_result, on_child_exit};
    c->pool = pool_start(&popt, &ph, c, err, sizeof err);
    if (!c->pool) {
        log_critical("%s", err);
        goto out;
    }

    struct broker_options bopt = {(const char *const *)cfg->queues, cfg->nqueues, cfg->visibility_timeout,
                                 log_from_broker};
    struct broker_handlers bh = {on_deliver};
    c->broker = broker_open(&c->broker_ep, &bopt, &bh, c, err, sizeof err);
    if (!c->broker) {
        log_critical("Cannot connect to %s: %s", c->broker_display, err);
        goto out;
    }
    if (cfg->result_backend) {
        c->backend = backend_open(&c->backend_ep, cfg->result_expires, log_from_broker, err, sizeof err);
        if (!c->backend) {
            log_critical("Cannot connect to result backend %s: %s", c->backend_display, err);
            goto out;
        }
    } else {
        log_warning("No result backend is configured (--result-backend / CELERY_RESULT_BACKEND): results are "
                    "not stored");
    }

    log_info("Connected to %s", c->broker_display);
    struct buf qs = {0};
    for (size_t i = 0; i < cfg->nqueues; i++)
        buf_printf(&qs, "%s%s", i ? "," : "", cfg->queues[i]);
    log_info("celeriac %s: concurrency %d (prefork), prefetch %d, queues %s, %s ack", CELERIAC_VERSION,
             cfg->concurrency, c->prefetch, qs.data, cfg->acks_late ? "late" : "early");
    buf_free(&qs);
    log_info("%s ready.", cfg->node_name);
    log_flush();

    for (;;) {
        if (got_quit || got_term > 1) {
            c->cold = true;
            break;
        }
        if (got_term && !c->stopping)
            begin_warm_shutdown(c);
        if (c->stopping && !busy(c))
            break;

        double now = epoch_now();
        if (!c->stopping)
            eta_release(c, now);
        dispatch(c);
        /* The whole budget in one fetch (splitting it measured slower); a second fetch can go out while one
         * is in flight when early acks have freed budget meanwhile. */
        int budget = c->prefetch - c->held - broker_fetch_in_flight(c->broker);
        if (!c->stopping && budget > 0 && now >= c->fetch_paused_until && broker_should_fetch(c->broker))
            broker_fetch(c->broker, budget);
        pool_flush(c->pool);
        broker_flush(c->broker);
        if (c->backend)
            backend_flush(c->backend);
        log_flush();

        struct pollfd fds[8 + 256];
        int nfds = 0;
        fds[nfds++] = (struct pollfd){signal_pipe[0], POLLIN, 0};
        int bfirst = nfds;
        nfds += broker_pollfds(c->broker, fds + nfds, 4);
        int bcount = nfds - bfirst;
        int befirst = nfds;
        if (c->backend)
            nfds += backend_pollfds(c->backend, fds + nfds, 2);
        int becount = nfds - befirst;
        int pfirst = nfds;
        nfds += pool_pollfds(c->pool, fds + nfds, 256);
        int pcount = nfds - pfirst;

        now = epoch_now();
        int timeout = broker_next_tick_ms(c->broker, now);
        double wake = INFINITY; /* the next held ETA job due, or the end of a fetch pause */
        if (c->eta.n && !c->stopping)
            wake = c->eta.v[0]->eta;
        if (c->fetch_paused_until > now && c->fetch_paused_until < wake)
            wake = c->fetch_paused_until;
        if (wake < INFINITY) {
            double ms = ceil((wake - now) * 1000.0);
            if (ms < timeout)
                timeout = ms < 0 ? 0 : (int)ms;
        }
        if (c->backend) {
            int bt = backend_next_tick_ms(c->backend, now);
            timeout = bt < timeout ? bt : timeout;
        }
        int limit_ms = enforce_time_limits(c);
        if (limit_ms >= 0 && limit_ms < timeout)
            timeout = limit_ms;
        int n = poll(fds, (nfds_t)nfds, timeout);
        if (n < 0 && errno != EINTR) {
            log_critical("poll: %s", strerror(errno));
            goto out;
        }
        if (fds[0].revents) {
            char drain[64];
            while (read(signal_pipe[0], drain, sizeof drain) > 0)
                ;
        }
        if (n > 0) {
            pool_process(c->pool, fds + pfirst, pcount);
            broker_process(c->broker, fds + bfirst, bcount);
            if (c->backend)
                backend_process(c->backend, fds + befirst, becount);
        }
        now = epoch_now();
        broker_tick(c->broker, now);
        if (c->backend)
            backend_tick(c->backend, now);
    }

    if (c->cold) {
        log_warning("worker: Cold shutdown (MainProcess)");
        pool_kill(c->pool);
        exit_code = 1;
    } else {
        broker_flush(c->broker);
        pool_stop(c->pool);
        exit_code = 0;
    }
    goto out;

fail_config:
    log_critical("%s", err);
    exit_code = 2;
out:
    log_flush();
    if (c->pool && exit_code != 0 && !c->cold)
        pool_kill(c->pool);
    pool_free(c->pool);
    for (int i = 0; c->children && i < cfg->concurrency; i++) {
        struct job *j;
        while ((j = list_pop(&c->children[i].jobs)))
            job_free(j);
    }
    struct job *j;
    while ((j = list_pop(&c->ready)))
        job_free(j);
    /* Cold shutdown: not requeued, so their unacked records stay for the visibility timeout. */
    for (size_t i = 0; i < c->eta.n; i++)
        job_free(c->eta.v[i]);
    free(c->eta.v);
    free(c->scan_mark);
    backend_close(c->backend);
    broker_close(c->broker);
    free(c->children);
    for (size_t i = 0; i < COST_SLOTS; i++)
        free(c->costs[i].name);
    redis_url_clear(&c->broker_url);
    redis_url_clear(&c->backend_url);
    free(c->broker_display);
    free(c->backend_display);
    return exit_code;
}
