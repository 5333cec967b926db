/* The main loop: see consumer.h. Main process only; pool children never run any of this. */
#include "consumer.h"
#include "consumer_int.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "amqp_broker.h"
#include "broker.h"
#include "buf.h"
#include "control.h"
#include "executor.h"
#include "http.h"
#include "lentwait.h"
#include "log.h"
#include "message.h"
#include "metrics.h"
#include "pool.h"
#include "pubsub.h"
#include "result.h"
#include "revoked.h"
#include "taskdir.h"
#include "task.h"

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

void revoked_store_add(struct consumer *c, const char *id, double now)
{
    /* On a Redis broker the set lives there (every celeriac on it shares it); on AMQP, in the result
     * backend's Redis, the one Redis such a worker has. */
    if (c->broker_ep.kind != BROKER_AMQP)
        bus_revoked_add(c->bus, REVOKED_KEY, id, now, REVOKED_TTL, REVOKED_MAX);
    else if (c->backend)
        backend_revoked_add(c->backend, REVOKED_KEY, id, now, REVOKED_TTL, REVOKED_MAX);
}

void consumer_request_stop(void)
{
    if (!got_term)
        got_term = 1;
}

double epoch_now(void)
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

static void list_push_front(struct job_list *l, struct job *j)
{
    j->next = l->head;
    l->head = j;
    if (!l->tail)
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
struct job *eta_remove(struct eta_heap *h, size_t i)
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
    if (j->reject)
        broker_reject(c->broker, j->delivery->tag);
    else
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

/* ------------------------------------------------------------------ events */

#define HEARTBEAT_FREQ 2.0   /* seconds between worker-heartbeat events, as Celery's default */
#define TASK_BATCH_MAX 24    /* task events per task.multi message at most, as Celery's dispatcher */

/* A new event with the fields every event has (doc 8.1); advances the clock. */
static json_t *event_new(struct consumer *c, const char *type)
{
    json_t *ev = json_pack("{s:s, s:s, s:i, s:i, s:I, s:f}", "type", type, "hostname", c->cfg->node_name,
                           "utcoffset", c->utcoffset, "pid", (int)getpid(), "clock", (json_int_t)++c->clock,
                           "timestamp", epoch_now());
    if (!ev)
        abort();
    return ev;
}

/* A task event for j (uuid set), or NULL when task events are off: callers add their fields and hand it to
 * task_event_send. */
static json_t *task_event(struct consumer *c, const char *type, const struct job *j)
{
    if (!c->task_events || !j->req.id.s)
        return NULL;
    json_t *ev = event_new(c, type);
    json_object_set_new(ev, "uuid", json_string(j->req.id.s));
    return ev;
}

static void publish_event(struct consumer *c, const char *routing_key, const json_t *body)
{
    struct buf env = {0}, channel = {0};
    control_event_envelope(&env, c->cfg->node_name, routing_key, body);
    buf_printf(&channel, "%s%s", c->event_prefix, routing_key);
    bus_publish(c->bus, channel.data, env.data, env.len);
    buf_free(&env);
    buf_free(&channel);
}

static void task_events_flush(struct consumer *c)
{
    if (!c->task_batch)
        return;
    publish_event(c, "task.multi", c->task_batch);
    json_decref(c->task_batch);
    c->task_batch = NULL;
}

/* Takes ownership of ev (NULL: nothing). Task events go out batched, once per loop pass, as Celery's do. */
static void task_event_send(struct consumer *c, json_t *ev)
{
    if (!ev)
        return;
    if (!c->task_batch)
        c->task_batch = json_array();
    json_array_append_new(c->task_batch, ev);
    if (json_array_size(c->task_batch) >= TASK_BATCH_MAX)
        task_events_flush(c);
}

static int active_count(const struct consumer *c)
{
    int n = 0;
    uint64_t seq;
    double started;
    for (int i = 0; i < pool_capacity(c->pool); i++)
        n += pool_running(c->pool, i, &seq, &started);
    return n;
}

/* worker-online, -heartbeat, -offline (doc 8.3): sent with or without -E, as Celery does. */
void worker_event(struct consumer *c, const char *type)
{
    json_t *ev = event_new(c, type);
    json_object_set_new(ev, "freq", json_real(HEARTBEAT_FREQ));
    json_object_set_new(ev, "active", json_integer(active_count(c)));
    json_object_set_new(ev, "processed", json_integer((json_int_t)c->processed));
    json_object_set_new(ev, "loadavg", control_loadavg());
    /* Flower and the gossip treat these as a Celery worker's; the version is the protocol spoken. */
    json_object_set_new(ev, "sw_ident", json_string("py-celery"));
    json_object_set_new(ev, "sw_ver", json_string("5.2.6"));
    json_object_set_new(ev, "sw_sys", json_string("Linux"));
    char rk[32];
    snprintf(rk, sizeof rk, "%s", type);
    for (char *p = rk; *p; p++)
        if (*p == '-')
            *p = '.';
    publish_event(c, rk, ev);
    json_decref(ev);
}

static void event_received(struct consumer *c, const struct job *j)
{
    metrics_count(c->metrics, j->req.task.s, METRICS_RECEIVED);
    json_t *ev = task_event(c, "task-received", j);
    if (!ev)
        return;
    const struct msg_request *r = &j->req;
    json_object_set_new(ev, "name", json_string(r->task.s ? r->task.s : ""));
    json_object_set_new(ev, "args", json_string(r->argsrepr.s ? r->argsrepr.s : "()"));
    json_object_set_new(ev, "kwargs", json_string(r->kwargsrepr.s ? r->kwargsrepr.s : "{}"));
    json_object_set_new(ev, "root_id", r->root_id.s ? json_string(r->root_id.s) : json_null());
    json_object_set_new(ev, "parent_id", r->parent_id.s ? json_string(r->parent_id.s) : json_null());
    json_object_set_new(ev, "retries", json_integer(r->retries));
    json_object_set_new(ev, "eta", r->eta.s && r->eta.len ? json_string(r->eta.s) : json_null());
    json_object_set_new(ev, "expires", r->expires.s && r->expires.len ? json_string(r->expires.s) : json_null());
    task_event_send(c, ev);
}

/* task-started once the child has begun running j (or, for a task too short to be seen running, just before
 * its outcome). */
void event_started(struct consumer *c, struct job *j)
{
    if (j->started_sent)
        return;
    j->started_sent = true;
    task_event_send(c, task_event(c, "task-started", j));
}

static void event_failed(struct consumer *c, const struct job *j, const char *type, const char *exception,
                         const char *traceback)
{
    json_t *ev = task_event(c, type, j);
    if (!ev)
        return;
    json_object_set_new(ev, "exception", json_string(exception));
    if (traceback)
        json_object_set_new(ev, "traceback", json_string(traceback));
    task_event_send(c, ev);
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
    metrics_count(c->metrics, j->req.task.s, METRICS_FAILED);
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

/* Settles a job without running it (or after killing it), as stock Celery's Request.revoked() and
 * terminate do (doc 7): REVOKED with TaskRevokedError(reason) ("expired", "revoked" or "terminated") and a
 * null traceback, a task-revoked event, then acked. j must be counted in held. signum: 0 for none. */
void settle_revoked(struct consumer *c, struct job *j, const char *reason, int signum)
{
    metrics_count(c->metrics, j->req.task.s, METRICS_REVOKED);
    char label[256];
    job_label(j, label, sizeof label);
    log_info("Discarding revoked task: %s", label);
    json_t *ev = task_event(c, "task-revoked", j);
    if (ev) {
        json_object_set_new(ev, "terminated", json_boolean(strcmp(reason, "terminated") == 0));
        json_object_set_new(ev, "signum", signum ? json_integer(signum) : json_null());
        json_object_set_new(ev, "expired", json_boolean(strcmp(reason, "expired") == 0));
        task_event_send(c, ev);
    }
    struct buf doc = {0};
    if (j->req.id.s) { /* even with ignore_result: stock stores errors unless the *task* ignores results */
        struct result_meta meta = {.task_id = j->req.id.s, .group_id = j->req.group.s,
                                   .parent_id = j->req.parent_id.s};
        result_doc_exception(&doc, &meta, "REVOKED", "TaskRevokedError", reason, NULL, epoch_now());
    }
    store_doc(c, j, j->req.id.s, doc.data, doc.len);
    buf_free(&doc);
}

static void revoke_expired(struct consumer *c, struct job *j)
{
    settle_revoked(c, j, "expired", 0);
}

static bool job_revoked(struct consumer *c, const struct job *j)
{
    return j->req.id.s && revoked_has(c->revoked, j->req.id.s, epoch_now());
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
    broker_defer(c->broker, j->delivery, isfinite(j->expires) ? j->expires : 0);
    if (!c->scan_mark) {
        c->scan_mark = strdup(broker_delivery_identity(j->delivery));
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
            event_received(c, j);
            eta_push(&c->eta, j);
            j = out;
        }
        eta_return(c, j); /* not logged as received: it comes round again at every scan */
        return;
    }
    log_received(j);
    event_received(c, j);
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
        else if (job_revoked(c, j))
            settle_revoked(c, j, "revoked", 0);
        else
            list_push(&c->ready, j);
    }
}

/* ------------------------------------------------------------------ broker events */

static double job_assign(struct consumer *c, struct job *j, int child, double cost, double now);
static void job_handed(struct consumer *c, struct job *j, int child);

/* The delivery a pool process took through the lent wait and is running already: decoded and put on that
 * child's books as dispatch would have. false when it does not decode (impossible: the child decoded it with the
 * same code); it is then handled as any delivery, and the child's result finds no job (logged). */
static bool took_bind(struct consumer *c, struct job *j)
{
    char err[256];
    if (msg_decode_envelope(j->delivery->raw, j->delivery->len, (size_t)c->cfg->max_message_size, &j->req, err,
                            sizeof err) != MSG_OK) {
        msg_request_clear(&j->req);
        j->req = (struct msg_request){0};
        return false;
    }
    int child = c->took_child;
    j->seq = c->took_seq;
    log_debug("Task %s[%s] taken by pool process %d, which waited for it", j->req.task.s, j->req.id.s,
              (int)pool_child_pid(c->pool, child));
    log_received(j);
    event_received(c, j);
    job_assign(c, j, child, expected_cost(c, j->req.task.s), epoch_now());
    list_push_front(&c->children[child].jobs, j); /* it runs before anything sent to the child since the lend */
    job_handed(c, j, child);
    if (job_revoked(c, j)) /* revoked after the child looked (the same race as a revoke overtaking a fetch) */
        pool_flag_revoked(c->pool, child, j->seq);
    return true;
}

static void on_deliver(void *arg, struct broker_delivery *d)
{
    struct consumer *c = arg;
    struct job *j = calloc(1, sizeof *j);
    if (!j)
        abort();
    j->delivery = d;
    j->seq = ++c->next_seq;
    j->expires = INFINITY;
    c->broker_progress = j->received = epoch_now();
    c->held++;
    eta_scan_check(c, broker_delivery_identity(d));
    if (c->took_child >= 0 && took_bind(c, j))
        return;
    if (c->stopping) {
        /* Fetched after the shutdown began: straight back where it came from. */
        broker_requeue(c->broker, d);
        c->held--;
        job_free(j);
        return;
    }
    char err[256] = "";
    int rc = msg_decode_envelope(d->raw, d->len, (size_t)c->cfg->max_message_size, &j->req, err, sizeof err);
    if (rc != MSG_OK) {
        size_t show = d->len < 512 ? d->len : 512;
        log_error("Received invalid message%s%s: %s; message (%zu bytes): %.*s", j->req.id.s ? " for task " : "",
                  j->req.id.s ? j->req.id.s : "", err, d->len, (int)show, d->raw);
        json_t *ev = task_event(c, "task-rejected", j);
        if (ev) {
            json_object_set_new(ev, "requeue", json_false());
            task_event_send(c, ev);
        }
        /* As the stock consumer: a message it cannot decode is acked (on_decode_error), one that is not a
         * task message or has invalid headers is rejected (on_unknown_message, on_invalid_task). */
        j->reject = rc == MSG_ERR_UNKNOWN || rc == MSG_ERR_ENVELOPE;
        fail_job(c, j, executor_decode_exc_type(rc), err, true);
        return;
    }
    if (!task_registry_find(j->req.task.s)) {
        j->reject = true; /* on_unknown_task rejects */
        log_error("Received unregistered task of type '%s'.\nThe message has been ignored and discarded.",
                  j->req.task.s);
        struct buf exc = {0};
        result_exc_repr(&exc, "NotRegistered", j->req.task.s);
        event_failed(c, j, "task-failed", exc.data, NULL);
        buf_free(&exc);
        fail_job(c, j, "NotRegistered", j->req.task.s, false);
        return;
    }
    if (job_read_times(c, j) < 0)
        return;
    if (job_revoked(c, j)) { /* as Celery's strategy: no task-received for a revoked task */
        settle_revoked(c, j, "revoked", 0);
        return;
    }
    double now = epoch_now();
    if (j->eta > now && now <= j->expires) {
        eta_hold(c, j);
        return;
    }
    log_received(j);
    event_received(c, j);
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
    metrics_count(c->metrics, j->req.task.s,
                  r->retried ? METRICS_RETRIED : r->failed ? METRICS_FAILED : METRICS_SUCCEEDED);
    metrics_runtime(c->metrics, j->req.task.s, r->runtime);
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
    if (c->task_events) {
        event_started(c, j);
        if (r->failed || r->retried) {
            /* The traceback is in the result document (none when the task ignores results). */
            json_t *doc = r->doc_len ? json_loadb(r->doc, r->doc_len, 0, NULL) : NULL;
            /* A retry's summary is "Retry in 0.1s[: KeyError('x')]"; its event carries, as stock Celery's does,
             * the repr of the exception that caused it: None for a plain retry. */
            const char *exc = r->summary;
            if (r->retried)
                exc = strstr(r->summary, ": ") ? strstr(r->summary, ": ") + 2 : "None";
            event_failed(c, j, r->retried ? "task-retried" : "task-failed", exc,
                         json_string_value(json_object_get(doc, "traceback")));
            json_decref(doc);
        } else {
            json_t *ev = task_event(c, "task-succeeded", j);
            if (ev) {
                json_object_set_new(ev, "result", json_string(r->summary));
                json_object_set_new(ev, "runtime", json_real(r->runtime));
                task_event_send(c, ev);
            }
        }
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
    uint64_t revoked_seq = c->children[child].revoked_seq;
    int revoke_signal = c->children[child].revoke_signal;
    c->children[child].killed_seq = c->children[child].revoked_seq = 0;
    /* Only the job the child had started is lost with it; the ones behind it go to another child. */
    struct job *running = NULL;
    if (pool_died_running(c->pool, child, &running_seq) && lost.head && lost.head->seq == running_seq)
        running = list_pop(&lost);
    if (running && running->seq == revoked_seq) {
        c->processed++;
        settle_revoked(c, running, "terminated", revoke_signal);
        running = NULL;
    }
    if (running && running->seq == killed_seq) {
        char label[256];
        job_label(running, label, sizeof label);
        log_error("Hard time limit (%gs) exceeded for %s", running->hard_limit, label);
        log_error("Task handler raised error: TimeLimitExceeded(%g,) [%s]", running->hard_limit, label);
        metrics_count(c->metrics, running->req.task.s, METRICS_FAILED);
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
        bool planned = pool_child_leaving(c->pool, child);
        if (planned && WIFEXITED(status) && WEXITSTATUS(status) == 0)
            log_debug("Pool process %d left (pool shrink or restart)", (int)pool_child_pid(c->pool, child));
        else if (WIFEXITED(status) && WEXITSTATUS(status) == 0)
            log_info("Pool process %d retired (task or memory limit); starting a new one",
                     (int)pool_child_pid(c->pool, child));
        else if (!killed_seq && !revoked_seq)
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
    for (int i = 0; i < pool_capacity(c->pool); i++) {
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
    for (int i = 0; i < pool_capacity(c->pool); i++)
        if (c->children[i].jobs.head && c->children[i].jobs.head->hard_limit > 0 && (next < 0 || next > 0.05))
            next = 0.05;
    return next < 0 ? -1 : (int)(next * 1000) + 1;
}

/* ------------------------------------------------------------------ rate limits */

/* The limits entry of a task name (borrowed), created when asked; NULL when none (or the table is full). */
struct task_limits *task_limits(struct consumer *c, const char *name, bool create)
{
    for (size_t i = 0; i < c->nlimits; i++)
        if (strcmp(c->limits[i].name, name) == 0)
            return &c->limits[i];
    if (!create || c->nlimits == TASK_LIMITS_MAX)
        return NULL;
    struct task_limits *l = &c->limits[c->nlimits++];
    *l = (struct task_limits){.name = strdup(name), .tokens = 1.0, .last = epoch_now()};
    if (!l->name)
        abort();
    return l;
}

static void refill(struct task_limits *l, double now)
{
    l->tokens = fmin(1.0, l->tokens + (now - l->last) * l->rate);
    l->last = now;
}

/* Takes j's rate-limit token; false when its task has none left and j must wait. */
static bool rate_take(struct consumer *c, struct job *j, double now)
{
    if (j->rate_ok)
        return true;
    struct task_limits *l = task_limits(c, j->req.task.s, false);
    if (!l || l->rate <= 0)
        return true;
    refill(l, now);
    if (l->tokens < 1.0 - 1e-9)
        return false;
    l->tokens -= 1.0;
    j->rate_ok = true;
    return true;
}

/* Moves the throttled jobs that have a token now back to the head of the ready list (they came first). */
static void rate_release(struct consumer *c, double now)
{
    struct job_list keep = {0}, go = {0};
    struct job *j;
    while ((j = list_pop(&c->throttled)))
        list_push(rate_take(c, j, now) ? &go : &keep, j);
    c->throttled = keep;
    if (!go.len)
        return;
    while ((j = list_pop(&c->ready)))
        list_push(&go, j);
    c->ready = go;
}

/* Milliseconds until the first throttled job gets its token; -1 when none waits. */
static int rate_wait_ms(struct consumer *c, double now)
{
    double best = -1;
    for (struct job *j = c->throttled.head; j; j = j->next) {
        struct task_limits *l = task_limits(c, j->req.task.s, false);
        if (!l || l->rate <= 0)
            return 0;
        refill(l, now);
        double wait = (1.0 - l->tokens) / l->rate;
        if (best < 0 || wait < best)
            best = wait;
    }
    return best < 0 ? -1 : (int)ceil(best * 1000.0);
}

/* Celery's rate strings: "10/s", "100/m", "5/h", or a bare number per second. Tasks per second, 0 for "no
 * limit" ("0", ""), -1 when unreadable. */
double parse_rate(const char *text)
{
    if (!text || !*text)
        return 0;
    char *end;
    double n = strtod(text, &end);
    if (end == text || n < 0 || !isfinite(n))
        return -1;
    if (!*end || strcmp(end, "/s") == 0)
        return n;
    if (strcmp(end, "/m") == 0)
        return n / 60.0;
    if (strcmp(end, "/h") == 0)
        return n / 3600.0;
    return -1;
}

/* Per-child state follows the pool's capacity, which a grow may raise. */
void children_fit(struct consumer *c)
{
    int cap = pool_capacity(c->pool);
    if (cap <= c->nchildren)
        return;
    struct child_state *grown = realloc(c->children, (size_t)cap * sizeof *grown);
    if (!grown)
        abort();
    memset(grown + c->nchildren, 0, (size_t)(cap - c->nchildren) * sizeof *grown);
    c->children = grown;
    c->nchildren = cap;
}

/* A loaded task's declared rate_limit (celeriac.h) applies as if set by the rate_limit command. */
static void apply_rate_default(const struct task_def *t, void *arg)
{
    struct consumer *c = arg;
    if (!t->rate_limit)
        return;
    double rate = parse_rate(t->rate_limit);
    struct task_limits *l = rate >= 0 ? task_limits(c, t->name, true) : NULL;
    if (rate < 0)
        log_warning("Task %s declares rate_limit \"%s\", which is not like \"10/s\", \"100/m\" or \"5/h\": ignored",
                    t->name, t->rate_limit);
    if (!l)
        return;
    l->rate = rate;
    l->tokens = 1.0;
    l->last = epoch_now();
}

/* After loading or reloading task modules: their declared defaults, and new processes for the new code. */
void tasks_loaded(struct consumer *c, bool restart_pool)
{
    task_registry_each(apply_rate_default, c);
    if (restart_pool) {
        pool_restart(c->pool);
        children_fit(c);
    }
}

/* ------------------------------------------------------------------ autoscale */

int reserved_count(const struct consumer *c)
{
    int n = c->ready.len + c->throttled.len;
    for (int i = 0; i < c->nchildren; i++)
        n += c->children[i].jobs.len;
    return n;
}

/* Celery's autoscaler rule: as many processes as tasks reserved, between min and max; up at once, down only
 * once keepalive seconds have passed since the last scale-up. Shrinking picks idle processes first and lets
 * busy ones finish (pool_shrink). */
static void autoscale(struct consumer *c)
{
    if (!c->autoscale_max || c->stopping)
        return;
    int procs = pool_size(c->pool), qty = reserved_count(c);
    int want = qty < c->autoscale_max ? qty : c->autoscale_max;
    if (want > procs) {
        log_info("Scaling up %d processes.", want - procs);
        if (pool_grow(c->pool, want - procs) < 0)
            log_error("autoscale: cannot start a pool process: %s", strerror(errno));
        children_fit(c);
        c->last_scale_up = pool_clock();
        return;
    }
    want = qty > c->autoscale_min ? qty : c->autoscale_min;
    if (want < procs && c->last_scale_up && pool_clock() - c->last_scale_up > c->autoscale_keepalive) {
        log_info("Scaling down %d processes.", procs - want);
        pool_shrink(c->pool, procs - want);
    }
}

/* ------------------------------------------------------------------ dispatch */

/* How long the child given a big message stays the preferred one (warm_child): longer than it keeps its buffer
 * when idle (executor.h), short enough that a long task does not keep the wait from being lent for long. */
#define WARM_S 30.0

/* Whether child (an index, or -1) is there and has nothing to do. */
static bool idle_child(const struct consumer *c, int child)
{
    return child >= 0 && child < pool_capacity(c->pool) && pool_accepts(c->pool, child) &&
           !c->children[child].jobs.len && child != c->lent_child;
}

/* The warm child (see WARM_S), forgotten once gone (shrunk, replaced: its buffer went with it) or long idle;
 * -1 when there is none. */
static int warm_child_now(struct consumer *c)
{
    int warm = c->warm_child;
    if (warm >= pool_capacity(c->pool) ||
        (warm >= 0 && (!pool_accepts(c->pool, warm) || epoch_now() - c->warm_at > WARM_S)))
        warm = c->warm_child = -1;
    return warm;
}

static void dispatch(struct consumer *c)
{
    int n = pool_capacity(c->pool);
    double now = epoch_now();
    if (c->throttled.len)
        rate_release(c, now);
    while (c->ready.len) {
        struct job *j = c->ready.head;
        if (now > j->expires) { /* it may have waited here, behind a backlog, past its expiry */
            revoke_expired(c, list_pop(&c->ready));
            continue;
        }
        if (job_revoked(c, j)) { /* revoked while it waited here */
            settle_revoked(c, list_pop(&c->ready), "revoked", 0);
            continue;
        }
        if (!rate_take(c, j, now)) { /* waits for its token; the jobs behind it go on */
            list_push(&c->throttled, list_pop(&c->ready));
            continue;
        }
        double cost = expected_cost(c, j->req.task.s);
        int warm = j->delivery->raw_shared ? warm_child_now(c) : -1;
        bool to_warm = idle_child(c, warm);
        int best = to_warm ? warm : -1;
        for (int i = 0; i < n && !to_warm; i++) {
            struct child_state *cs = &c->children[i];
            if (!pool_accepts(c->pool, i) || i == c->lent_child)
                continue; /* empty, or leaving (shrink, restart); or waiting for the next message itself */
            if (cs->jobs.len && cs->backlog + cost <= PACK_BACKLOG) {
                best = i;
                break;
            }
            if (best < 0 || cs->backlog < c->children[best].backlog ||
                (cs->backlog == c->children[best].backlog && cs->jobs.len < c->children[best].jobs.len))
                best = i;
        }
        if (best < 0 && c->lent_child >= 0 && pool_accepts(c->pool, c->lent_child)) {
            best = c->lent_child; /* the only one left: it stops waiting first (frames are read in order) */
            pool_recall_wait(c->pool, best);
        }
        if (best < 0)
            break; /* every process is being replaced: the jobs wait here for the new ones */
        struct child_state *cs = &c->children[best];
        if (cs->jobs.len && (cs->backlog + cost > DISPATCH_HORIZON || cs->jobs.len >= CHILD_QUEUE_MAX))
            break; /* every child has enough to do; the rest waits here, where it can still be requeued */
        list_pop(&c->ready);
        if (j->delivery->raw_shared) {
            c->warm_child = best;
            c->warm_at = now;
        }
        double soft_limit = job_assign(c, j, best, cost, now);
        pool_submit(c->pool, best, j->seq, soft_limit, j->delivery->raw, j->delivery->len,
                    j->delivery->raw_shared ? j->delivery->raw_fd : -1);
        log_debug("Task %s[%s] handed to pool process %d", j->req.task.s, j->req.id.s,
                  (int)pool_child_pid(c->pool, best));
        list_push(&cs->jobs, j);
        job_handed(c, j, best);
    }
}

/* The books of a job handed to child: totals, its expected cost, its hard limit. Returns the soft limit the
 * child is to apply when the message sets none. */
static double job_assign(struct consumer *c, struct job *j, int child, double cost, double now)
{
    json_t *total = json_object_get(c->totals, j->req.task.s);
    json_object_set_new(c->totals, j->req.task.s, json_integer(total ? json_integer_value(total) + 1 : 1));
    j->cost = cost;
    metrics_queue_latency(c->metrics, now - fmax(j->received, j->eta));
    struct task_limits *tl = task_limits(c, j->req.task.s, false);
    const struct task_def *def = task_registry_find(j->req.task.s);
    /* Celery's precedence: the message, then the task type's limit (time_limit control), then the task's
     * declared default, then the worker's. */
    j->hard_limit = j->req.has_time_limit        ? j->req.time_limit
                    : tl && tl->hard_limit > 0   ? tl->hard_limit
                    : def && def->time_limit > 0 ? def->time_limit
                                                 : c->cfg->time_limit;
    c->children[child].backlog += cost;
    c->children[child].writes++;
    return tl && tl->soft_limit > 0 ? tl->soft_limit : def ? def->soft_time_limit : 0;
}

/* Once the job is on child's list: the early ack (the pool has accepted it) and the STARTED state. */
static void job_handed(struct consumer *c, struct job *j, int child)
{
    const struct task_def *def = task_registry_find(j->req.task.s);
    if (!c->cfg->acks_late && !(def && def->acks_late))
        job_ack(c, j);
    if (c->cfg->track_started && c->backend && j->req.id.s && !j->req.ignore_result) {
        struct buf doc = {0};
        struct result_meta meta = {.task_id = j->req.id.s, .group_id = j->req.group.s,
                                   .parent_id = j->req.parent_id.s};
        result_doc_started(&doc, &meta, (int)pool_child_pid(c->pool, child), c->cfg->node_name);
        store_doc(c, NULL, j->req.id.s, doc.data, doc.len);
        buf_free(&doc);
    }
}

/* ------------------------------------------------------------------ the lent wait (lentwait.h) */

/* What a child must know to run what it takes by itself: kept current every pass (limits and revokes change
 * through remote control). */
static void gate_refresh(struct consumer *c)
{
    lent_gate_set(pool_gate(c->pool), !c->cfg->track_started && c->nlimits == 0, (size_t)c->cfg->max_message_size);
}

/* broker_handlers.lend_wait: to an idle child (the warm one first), when nothing waits in the main process
 * and the warm child is not busy (see warm_child). */
static bool lend_wait(void *arg, const char *key, const char *inbox)
{
    struct consumer *c = arg;
    if (c->stopping || c->lent_child >= 0 || c->ready.len || c->throttled.len || epoch_now() < c->lend_after ||
        !pool_gate(c->pool))
        return false;
    int n = pool_capacity(c->pool), warm = warm_child_now(c);
    if (warm >= 0 && !idle_child(c, warm))
        return false;
    gate_refresh(c);
    for (int k = 0; k < n; k++) {
        int i = warm >= 0 ? (warm + k) % n : k;
        if (!idle_child(c, i))
            continue;
        uint64_t seq = c->next_seq + 1;
        if (pool_lend_wait(c->pool, i, seq, key, inbox)) {
            c->next_seq += POOL_LEND_SEQS; /* the seqs of the tasks the lend brings */
            c->lent_child = i;
            return true;
        }
    }
    return false;
}

static void recall_wait(void *arg)
{
    struct consumer *c = arg;
    if (c->lent_child >= 0)
        pool_recall_wait(c->pool, c->lent_child);
}

static void on_wait_took(void *arg, int child, uint64_t seq, const char *raw, size_t len, int raw_fd,
                         bool lend_over)
{
    struct consumer *c = arg;
    if (lend_over)
        c->lent_child = -1;
    if (raw_fd >= 0) {
        c->warm_child = child;
        c->warm_at = epoch_now();
    }
    c->took_child = child;
    c->took_seq = seq;
    broker_wait_took(c->broker, raw, len, raw_fd, lend_over);
    c->took_child = -1;
}

static void on_wait_end(void *arg, int child, int why)
{
    (void)child;
    struct consumer *c = arg;
    c->lent_child = -1;
    if (why == POOL_WAIT_REFUSED)
        c->lend_after = INFINITY; /* the child logged why; the main process's own BLMOVE finds out the same */
    else if (why == POOL_WAIT_UNREACHABLE)
        c->lend_after = epoch_now() + 1.0;
    broker_wait_ended(c->broker);
}

/* Hands what is ready to the pool, then asks the broker for the budget that leaves. Before acks are flushed: a
 * window closing for a fetch pause must reach the broker ahead of the acks that would otherwise reopen it (and
 * bring the ETA tasks just returned straight back). */
static void dispatch_and_fetch(struct consumer *c, double now)
{
    dispatch(c);
    /* The whole budget in one fetch (splitting it measured slower); a second fetch can go out while one
     * is in flight when early acks have freed budget meanwhile. */
    int budget = c->prefetch - c->held - broker_fetch_in_flight(c->broker);
    if (now < c->fetch_paused_until) /* AMQP: the window closes for the pause (Redis: no fetch, as < 0) */
        budget = -broker_fetch_in_flight(c->broker);
    if (!c->stopping && budget != 0 && broker_should_fetch(c->broker))
        broker_fetch(c->broker, budget);
}

/* The job child is running now, or NULL; *started gets its start time (pool_clock). */
struct job *running_job(const struct consumer *c, int child, double *started)
{
    uint64_t seq;
    struct job *j = c->children[child].jobs.head;
    if (j && pool_running(c->pool, child, &seq, started) && seq == j->seq)
        return j;
    return NULL;
}

static void on_revoked_loaded(void *arg, const char *id, double when)
{
    struct consumer *c = arg;
    revoked_add(c->revoked, id, when);
    lent_gate_revoke(pool_gate(c->pool), id);
}

/* Task-started for every job a child has begun since the last pass. */
static void notice_started(struct consumer *c)
{
    if (!c->task_events)
        return;
    for (int i = 0; i < pool_capacity(c->pool); i++) {
        double started;
        struct job *j = running_job(c, i, &started);
        if (j)
            event_started(c, j);
    }
}

/* ------------------------------------------------------------------ health and metrics */

#define STALL_S 10.0 /* a fetch unanswered this long means the consumer is stuck: not ready */

/* Why the worker is not ready (a static string), or NULL when it is. */
static const char *not_ready_reason(const struct consumer *c, double now)
{
    if (c->stopping)
        return "shutting down";
    if (!broker_connected(c->broker))
        return "broker disconnected";
    if (c->backend && !backend_connected(c->backend))
        return "result backend disconnected";
    if (!bus_connected(c->bus))
        return "control channel disconnected";
    if (now - c->broker_progress > STALL_S)
        return "consumer stalled: a fetch has had no answer";
    return NULL;
}

static void on_http(void *arg, const char *path, struct buf *body, int *status, const char **content_type)
{
    struct consumer *c = arg;
    double now = epoch_now();
    const char *why = not_ready_reason(c, now);
    *status = 200;
    if (strcmp(path, "/healthz") == 0) {
        buf_append_str(body, "ok\n"); /* answered by the loop itself: it turns */
    } else if (strcmp(path, "/readyz") == 0) {
        if (why) {
            *status = 503;
            buf_printf(body, "not ready: %s\n", why);
        } else {
            buf_append_str(body, "ready\n");
        }
    } else if (strcmp(path, "/metrics") == 0) {
        int busy = active_count(c);
        struct metrics_gauges g = {busy, pool_size(c->pool) - busy, c->held, (int)c->eta.n, c->broker_reconnects,
                                   broker_connected(c->broker), !c->backend || backend_connected(c->backend), !why};
        metrics_render(c->metrics, &g, body);
        *content_type = "text/plain; version=0.0.4; charset=utf-8";
    } else {
        *status = 404;
        buf_append_str(body, "not found: /healthz, /readyz, /metrics\n");
    }
}

/* ------------------------------------------------------------------ set-up */

static int endpoint_from_url(const char *url, struct redis_url *u, struct amqp_url *a, struct broker_endpoint *ep,
                             char **display, char *err, size_t errlen)
{
    if (a && amqp_url_is(url)) {
        if (amqp_url_parse(url, a, err, errlen) < 0)
            return -1;
        *display = redis_url_redact(url);
        amqp_url_endpoint(a, *display, ep);
        /* stats reads the host and user from u; the vhost is not a db number (0 there). */
        *u = (struct redis_url){strdup(a->host), a->port, NULL, strdup(a->username ? a->username : "guest"), NULL, 0};
        return 0;
    }
    if (redis_url_parse(url, u, err, errlen) < 0)
        return -1;
    *display = redis_url_redact(url);
    *ep = (struct broker_endpoint){.host = u->host, .port = u->port, .socket = u->socket, .username = u->username,
                                   .password = u->password, .db = u->db, .display = *display};
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

/* Drops the jobs not yet handed to a process whose message the broker takes back itself when the connection
 * is lost (AMQP: the unacked messages of a closed channel are requeued, and delivered again). Keeping them
 * would run those tasks twice; stock Celery clears its reserved requests and ETA timer then too. */
static struct job_list drop_lost(struct consumer *c, struct job_list *l, bool counted)
{
    struct job_list keep = {0};
    struct job *j;
    while ((j = list_pop(l))) {
        if (broker_delivery_lost(c->broker, j->delivery)) {
            c->held -= counted;
            job_free(j);
        } else {
            list_push(&keep, j);
        }
    }
    return keep;
}

static void drop_lost_jobs(struct consumer *c)
{
    c->ready = drop_lost(c, &c->ready, true);
    c->throttled = drop_lost(c, &c->throttled, true);
    size_t before = c->eta.n;
    for (size_t i = c->eta.n; i-- > 0;)
        if (broker_delivery_lost(c->broker, c->eta.v[i]->delivery))
            job_free(eta_remove(&c->eta, i));
    if (before != c->eta.n)
        log_info("Dropped %zu held ETA task(s): the broker delivers them again", before - c->eta.n);
}

static void begin_warm_shutdown(struct consumer *c)
{
    c->stopping = true;
    broker_pause(c->broker); /* AMQP: the broker stops pushing messages (Redis: nothing to do) */
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
    /* Throttled jobs came before the ready ones. Back in reverse order, each to the consuming end, so the
     * queue hands them out in the original order. */
    struct job *t;
    while ((t = list_pop(&c->ready)))
        list_push(&c->throttled, t);
    c->ready = c->throttled;
    c->throttled = (struct job_list){0};
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
    for (int i = 0; i < pool_capacity(c->pool); i++)
        if (c->children[i].jobs.len)
            return true;
    /* broker_pending: requeues of a warm shutdown (up to --max-eta-reserved held ETA messages) may be more than
     * the socket takes at once; leaving before they are written would leave them to the visibility timeout. */
    return c->stores_in_flight > 0 || broker_fetch_in_flight(c->broker) > 0 || c->ready.len > 0 ||
           c->throttled.len > 0 ||
           broker_pending(c->broker) > 0;
}

int consumer_run(const struct config *cfg)
{
    struct consumer cons = {0}, *c = &cons;
    char err[512];
    int exit_code = 1;
    c->cfg = cfg;
    /* With --autoscale the pool starts at its minimum and the prefetch is sized for its maximum, as Celery's. */
    int processes = cfg->autoscale_max ? cfg->autoscale_min : cfg->concurrency;
    c->autoscale_max = cfg->autoscale_max;
    c->autoscale_min = cfg->autoscale_min;
    const char *keepalive = getenv("AUTOSCALE_KEEPALIVE");
    c->autoscale_keepalive = keepalive && atof(keepalive) > 0 ? atof(keepalive) : 30.0;
    c->prefetch = (cfg->autoscale_max ? cfg->autoscale_max : cfg->concurrency) * cfg->prefetch_multiplier;
    if (c->prefetch <= 0)
        c->prefetch = 1 << 30; /* Celery: a multiplier of 0 means no limit */

    if (endpoint_from_url(cfg->broker_url, &c->broker_url, &c->broker_amqp, &c->broker_ep, &c->broker_display, err,
                          sizeof err) < 0)
        goto fail_config;
    if (cfg->result_backend &&
        endpoint_from_url(cfg->result_backend, &c->backend_url, NULL, &c->backend_ep, &c->backend_display, err,
                          sizeof err) < 0)
        goto fail_config;

    if (cfg->concurrency > POOL_MAX) {
        snprintf(err, sizeof err, "-c %d: at most %d processes", cfg->concurrency, POOL_MAX);
        goto fail_config;
    }
    if (cfg->tasks_path) {
        c->taskdir = taskdir_open(cfg->tasks_path, cfg->dev, err, sizeof err);
        if (!c->taskdir)
            goto fail_config;
        tasks_loaded(c, false);
    }
    install_signals();
    task_registry_enable_test_tasks(cfg->enable_test_tasks);
    /* Fork the pool first: no connection may cross a fork. */
    c->children = calloc((size_t)processes, sizeof *c->children);
    c->nchildren = processes;
    /* Children store results themselves, except with --track-started: the main process writes STARTED, and
     * a child's SUCCESS on another connection could then land before it and be overwritten. */
    struct pool_options popt = {processes,
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
    struct pool_handlers ph = {on_result, on_child_exit, on_wait_took, on_wait_end};
    c->lent_child = c->took_child = c->warm_child = -1;
    c->pool = pool_start(&popt, &ph, c, err, sizeof err);
    if (!c->pool) {
        log_critical("%s", err);
        goto out;
    }

    struct broker_options bopt = {(const char *const *)cfg->queues, cfg->nqueues, cfg->visibility_timeout,
                                 log_from_broker};
    struct broker_handlers bh = {on_deliver, lend_wait, recall_wait};
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

    /* Remote control and events: kombu's fanout exchanges are pub/sub channels named with the db (doc 3.7). */
    struct buf name = {0};
    buf_printf(&name, "/%d.celery.pidbox", c->broker_url.db);
    c->pidbox_channel = buf_steal(&name);
    buf_printf(&name, "\x06\x16\x06\x16%s.celery.pidbox", cfg->node_name); /* routing key "", pattern "" */
    c->pidbox_member = buf_steal(&name);
    buf_printf(&name, "/%d.celeryev/", c->broker_url.db);
    c->event_prefix = buf_steal(&name);
    struct bus_options busopt = {c->pidbox_channel, "_kombu.binding.celery.pidbox", c->pidbox_member, remote_on_control, c,
                                 log_from_broker};
    c->bus = bus_open(&c->broker_ep, &busopt, err, sizeof err);
    if (!c->bus) {
        log_critical("Cannot connect to %s: %s", c->broker_display, err);
        goto out;
    }
    c->revoked = revoked_new(REVOKED_MAX, REVOKED_TTL);
    c->totals = json_object();
    c->utcoffset = control_utcoffset();
    c->started_at = epoch_now();
    c->task_events = cfg->send_events;
    c->metrics = metrics_new();
    c->broker_progress = c->started_at;
    c->broker_was_up = true;
    if (cfg->http_port) {
        c->http = http_open(cfg->http_bind, cfg->http_port, on_http, c, err, sizeof err);
        if (!c->http) {
            log_critical("%s", err);
            goto out;
        }
        log_info("Serving /healthz, /readyz and /metrics on http://%s:%d", cfg->http_bind, cfg->http_port);
    }
    long nrevoked = c->broker_ep.kind == BROKER_AMQP
                        ? c->backend ? backend_revoked_load(c->backend, REVOKED_KEY, c->started_at, REVOKED_TTL,
                                                            on_revoked_loaded, c)
                                     : 0
                        : bus_revoked_load(c->bus, REVOKED_KEY, c->started_at, REVOKED_TTL, on_revoked_loaded,
                                           c);
    if (nrevoked > 0)
        log_info("Loaded %ld revoked task id(s) from Redis", nrevoked);
    if (c->broker_ep.kind == BROKER_AMQP && !c->backend)
        log_warning("No Redis result backend: revoked task ids are kept in memory only (lost on restart)");

    log_info("Connected to %s", c->broker_display);
    struct buf qs = {0};
    for (size_t i = 0; i < cfg->nqueues; i++)
        buf_printf(&qs, "%s%s", i ? "," : "", cfg->queues[i]);
    log_info("celeriac %s: concurrency %d (prefork), prefetch %d, queues %s, %s ack", CELERIAC_VERSION,
             cfg->concurrency, c->prefetch, qs.data, cfg->acks_late ? "late" : "early");
    buf_free(&qs);
    log_info("%s ready.", cfg->node_name);
    log_flush();
    worker_event(c, "worker-online");
    c->next_heartbeat = c->started_at + HEARTBEAT_FREQ;

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
        gate_refresh(c);
        dispatch_and_fetch(c, now);
        notice_started(c);
        if (now >= c->next_heartbeat) {
            worker_event(c, "worker-heartbeat");
            c->next_heartbeat = now + HEARTBEAT_FREQ;
        }
        task_events_flush(c);
        bus_flush(c->bus);
        pool_flush(c->pool);
        broker_flush(c->broker);
        if (c->backend)
            backend_flush(c->backend);
        log_flush();

        struct pollfd fds[32 + POOL_MAX]; /* signal, broker 4, backend 2, bus 2, http 17, inotify 1, pool */
        int nfds = 0;
        fds[nfds++] = (struct pollfd){signal_pipe[0], POLLIN, 0};
        int bfirst = nfds;
        nfds += broker_pollfds(c->broker, fds + nfds, 4);
        int bcount = nfds - bfirst;
        int befirst = nfds;
        if (c->backend)
            nfds += backend_pollfds(c->backend, fds + nfds, 2);
        int becount = nfds - befirst;
        int busfirst = nfds;
        nfds += bus_pollfds(c->bus, fds + nfds, 2);
        int buscount = nfds - busfirst;
        int hfirst = nfds;
        if (c->http)
            nfds += http_pollfds(c->http, fds + nfds, 17);
        int hcount = nfds - hfirst;
        int tfirst = nfds;
        if (taskdir_fd(c->taskdir) >= 0)
            fds[nfds++] = (struct pollfd){taskdir_fd(c->taskdir), POLLIN, 0};
        int pfirst = nfds;
        nfds += pool_pollfds(c->pool, fds + nfds, POOL_MAX);
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
        int hb = (int)ceil((c->next_heartbeat - now) * 1000.0);
        hb = hb < 0 ? 0 : hb;
        timeout = hb < timeout ? hb : timeout;
        int bust = bus_next_tick_ms(c->bus, now);
        timeout = bust < timeout ? bust : timeout;
        int rate_ms = rate_wait_ms(c, now);
        if (rate_ms >= 0 && rate_ms < timeout)
            timeout = rate_ms;
        autoscale(c);
        int limit_ms = enforce_time_limits(c);
        if (limit_ms >= 0 && limit_ms < timeout)
            timeout = limit_ms;
        int rebuild_ms = taskdir_next_ms(c->taskdir, pool_clock());
        if (rebuild_ms >= 0 && rebuild_ms < timeout)
            timeout = rebuild_ms;
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
            /* Deliveries first, handed to the pool and their early acks sent at once: the broker's window moves
             * only when acks arrive, so results and the rest of the pass, handled before, kept it standing (on
             * AMQP, measured: half the time from a delivery to its ack). Not once the connection is lost: then
             * drop_lost_jobs, below, lets go of what was held. */
            broker_process(c->broker, fds + bfirst, bcount);
            if (broker_connected(c->broker)) {
                dispatch_and_fetch(c, epoch_now());
                /* The acks first: the next deliveries are then on their way while the pool processes wake
                 * (AMQP drain, 10 alternating runs: median 10,225 tasks/s against 9,478 sending them second;
                 * no change on Redis). A pool process dying meanwhile loses no more than before: early acks
                 * are for tasks already accepted by this worker. */
                broker_flush(c->broker);
                pool_flush(c->pool); /* the task reaches its process now: most of an idle worker's latency */
            }
            pool_process(c->pool, fds + pfirst, pcount);
            bus_process(c->bus, fds + busfirst, buscount);
            if (c->backend)
                backend_process(c->backend, fds + befirst, becount);
        }
        if (tfirst < pfirst && fds[tfirst].revents)
            taskdir_on_readable(c->taskdir, pool_clock());
        if (!c->stopping && taskdir_tick(c->taskdir, pool_clock()) == 1)
            tasks_loaded(c, true);
        now = epoch_now();
        if (c->http)
            http_process(c->http, fds + hfirst, n > 0 ? hcount : 0, now);
        /* On AMQP the window stays open while the queues are idle (the broker pushes): no fetch to stall. */
        if (broker_fetch_in_flight(c->broker) == broker_fetch_blocked(c->broker) || c->broker_ep.kind == BROKER_AMQP)
            c->broker_progress = now;
        broker_tick(c->broker, now);
        bool up = broker_connected(c->broker);
        if (up && !c->broker_was_up)
            c->broker_reconnects++;
        if (!up && c->broker_was_up)
            drop_lost_jobs(c);
        c->broker_was_up = up;
        bus_tick(c->bus, now);
        if (c->backend)
            backend_tick(c->backend, now);
    }

    task_events_flush(c);
    worker_event(c, "worker-offline"); /* receivers count the worker gone at once, not after 2 heartbeats */
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
    taskdir_close(c->taskdir);
    for (int i = 0; c->children && i < c->nchildren; i++) {
        struct job *j;
        while ((j = list_pop(&c->children[i].jobs)))
            job_free(j);
    }
    struct job *j;
    while ((j = list_pop(&c->ready)))
        job_free(j);
    while ((j = list_pop(&c->throttled)))
        job_free(j);
    for (size_t i = 0; i < c->nlimits; i++)
        free(c->limits[i].name);
    /* Cold shutdown: not requeued, so their unacked records stay for the visibility timeout. */
    for (size_t i = 0; i < c->eta.n; i++)
        job_free(c->eta.v[i]);
    free(c->eta.v);
    free(c->scan_mark);
    bus_close(c->bus); /* sends what is queued (the worker-offline event) and drops our pidbox binding */
    revoked_free(c->revoked);
    http_close(c->http);
    metrics_free(c->metrics);
    json_decref(c->totals);
    json_decref(c->task_batch);
    free(c->pidbox_channel);
    free(c->pidbox_member);
    free(c->event_prefix);
    backend_close(c->backend);
    broker_close(c->broker);
    free(c->children);
    for (size_t i = 0; i < COST_SLOTS; i++)
        free(c->costs[i].name);
    redis_url_clear(&c->broker_url);
    amqp_url_clear(&c->broker_amqp);
    redis_url_clear(&c->backend_url);
    free(c->broker_display);
    free(c->backend_display);
    return exit_code;
}
