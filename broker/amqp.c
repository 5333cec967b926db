/* amqp: the task transport over AMQP 0-9-1 (RabbitMQ), behind broker.h. Main process only.
 *
 * DESIGN. One connection; channel 1 consumes every queue (one consumer each, tagged with the queue's index)
 * and carries acks; channel 2 declares (wire_declare_task_queue). librabbitmq is blocking, so the loop polls
 * its socket and, when it is readable, drains it: one read, then zero-timeout calls of
 * amqp_simple_wait_frame_noblock until nothing is buffered (the next poll says when there is more); that same
 * call sends our heartbeats, so broker_tick also drains once a second (twice
 * with a 1 s heartbeat) whatever the socket says. The broker's missed heartbeats are noticed by the loop
 * itself (wire_heartbeat_lost): librabbitmq only checks them in a read that may wait.
 *
 * Flow control is the broker's: basic.qos bounds the unacked messages, and "fetching" moves that window.
 * The consumer asks for budget = prefetch - held - in flight, where in flight = window - unacked; with
 * unacked = held + the ETA tasks it keeps outside prefetch, a window moved by the budget settles at
 * prefetch + ETA tasks held: what stock Celery's qos.increment_eventually() does for each ETA task (and
 * decrement once it ran). The window is global to the channel (one limit across the queues, as prefetch is),
 * as Celery sets it (basic.qos global=true on RabbitMQ >= 3.3), with one exception that is the same bound: while
 * one queue is consumed and the window is still the one consuming started with, it is that one consumer's own
 * limit (basic.qos global=false before basic.consume). RabbitMQ then counts it inside the queue process, where a
 * channel-wide limit costs a synchronous call to the channel's limiter process for every delivery: measured on
 * the drain benchmark, ~15-25% less broker CPU per task and ~25% more tasks/s. RabbitMQ applies a per-consumer
 * limit only to consumers made after it, so the first move of the window (an ETA task held, a fetch pause) or a
 * second queue makes the window the channel's for the rest of the connection (go_global). The one consumer is
 * cancelled first, and only once its basic.cancel-ok is in (the queue sends it after every delivery it made to
 * that consumer, so none is still on its way) is the channel's limit set, at the window asked for by then, and
 * the consumers made again with no limit of their own. RabbitMQ's channel limit starts from the messages the
 * channel has unacked when it is set: a delivery still on its way at that moment would be missed by that count
 * and the channel's window would stay one wider for good (a fetch pause would leak deliveries). Until the
 * cancel-ok the window is what it was or narrower (no consumer), never wider.
 *
 * Acks are coalesced per pass: the longest run of acked tags from the oldest unacked one goes out as one
 * basic.ack(multiple), the others one by one. A lost connection bumps a generation number that is part of
 * every delivery's tag: acks of the old generation are dropped (the broker requeues those messages itself,
 * and acking their tags on the new channel would be a channel error). */
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>

#include "amqp_wire.h"
#include "transport.h"

#define BACKOFF_MIN 0.1
#define BACKOFF_MAX 5.0
#define CONNECT_TIMEOUT_MS 3000
#define DRAIN_MAX 4096 /* frames per drain: the loop gets round to the pool between bursts */
#define QOS_MAX 65535  /* prefetch_count is 16 bits; Celery's unlimited (0) becomes this */

/* A delivery not yet settled, in delivery order (tags grow). */
struct outstanding {
    uint64_t tag;
    bool acked; /* acked by the consumer, not yet sent */
};

struct amqp_broker {
    struct broker base;               /* first: see transport.h */
    const struct broker_endpoint *ep; /* borrowed */
    struct broker_handlers h;
    void *arg;
    broker_log_fn log;

    amqp_connection_state_t st; /* NULL while disconnected */
    unsigned gen;               /* connection generation, in delivery tags */
    double next_reconnect, backoff;
    char errstr[512];

    char **queues; /* owned; a queue keeps its index (its consumer tag) once known */
    bool *active;  /* consumed now */
    size_t nqueues;

    int qos;         /* the window asked for; 0: not consuming yet (AMQP's 0 would mean no limit) */
    bool global;     /* the window is the channel's, not the one consumer's (see DESIGN); per connection */
    bool switching;  /* go_global: the one consumer's cancel sent, its cancel-ok not in yet */
    size_t switch_q; /* while switching: the queue whose consumer is being cancelled */
    bool consuming;  /* basic.consume sent on this connection */
    bool paused;     /* warm shutdown: never consume again */
    int unacked;     /* delivered on this connection and not settled */
    struct outstanding *out;
    size_t nout, capout, nacked;

    struct wire_incoming in;
    double next_housekeeping; /* epoch seconds: the next drain whether or not the socket is readable */
    double last_rx;           /* epoch seconds anything (a heartbeat at least) last came from the broker */
};

static const struct broker_ops amqp_ops;

/* Logs "<what><detail><after>". */
static void log3(struct amqp_broker *b, int level, const char *what, const char *detail, const char *after)
{
    if (!b->log)
        return;
    char line[700];
    snprintf(line, sizeof line, "%s%s%s", what, detail, after);
    b->log(level, line);
}

/* Drops the connection; broker_tick reconnects with backoff. Unacked messages go back to their queues on
 * the broker's side. */
static void lost(struct amqp_broker *b, const char *why)
{
    if (why != b->errstr)
        snprintf(b->errstr, sizeof b->errstr, "%s", why);
    log3(b, BROKER_LOG_ERROR, "consumer: Connection to broker lost (", b->errstr,
         "). Trying to re-establish the connection...");
    wire_close(b->st, false);
    b->st = NULL;
    b->gen++;
    b->consuming = false;
    b->global = b->switching = false;
    b->unacked = 0;
    b->nout = b->nacked = 0;
    wire_incoming_clear(&b->in);
    b->backoff = b->backoff ? b->backoff : BACKOFF_MIN;
    b->next_reconnect = wire_now() + b->backoff;
}

/* basic.qos: global, the channel's window; else the limit of each consumer made after it (RabbitMQ >= 3.3). */
static int send_qos_as(struct amqp_broker *b, int count, bool global)
{
    amqp_basic_qos_t m = {0, (uint16_t)count, global};
    int rc = amqp_send_method(b->st, WIRE_CH, AMQP_BASIC_QOS_METHOD, &m);
    if (rc != AMQP_STATUS_OK) {
        lost(b, amqp_error_string2(rc));
        return -1;
    }
    return 0;
}

static int consume_one(struct amqp_broker *b, size_t q)
{
    char tag[32];
    snprintf(tag, sizeof tag, "%zu", q);
    amqp_basic_consume_t m = {
        0, amqp_cstring_bytes(b->queues[q]), amqp_cstring_bytes(tag), 0, 0, 0, 1, amqp_empty_table};
    int rc = amqp_send_method(b->st, WIRE_CH, AMQP_BASIC_CONSUME_METHOD, &m); /* nowait: no consume-ok */
    if (rc != AMQP_STATUS_OK) {
        lost(b, amqp_error_string2(rc));
        return -1;
    }
    return 0;
}

static int start_consuming(struct amqp_broker *b)
{
    size_t consumed = 0;
    for (size_t q = 0; q < b->nqueues; q++)
        consumed += b->active[q];
    b->global = consumed != 1;
    if (send_qos_as(b, b->qos, b->global) < 0)
        return -1;
    for (size_t q = 0; q < b->nqueues; q++)
        if (b->active[q] && consume_one(b, q) < 0)
            return -1;
    b->consuming = true;
    return 0;
}

/* Starts the window's move to the channel (see DESIGN): the one consumer is cancelled, waiting for its cancel-ok
 * (finish_global). */
static void go_global(struct amqp_broker *b)
{
    b->global = true;
    for (size_t q = 0; q < b->nqueues; q++) {
        if (!b->active[q])
            continue;
        char tag[32];
        snprintf(tag, sizeof tag, "%zu", q);
        amqp_basic_cancel_t m = {amqp_cstring_bytes(tag), 0}; /* not nowait: the cancel-ok is the signal */
        int rc = amqp_send_method(b->st, WIRE_CH, AMQP_BASIC_CANCEL_METHOD, &m);
        if (rc != AMQP_STATUS_OK) {
            lost(b, amqp_error_string2(rc));
            return;
        }
        b->switching = true;
        b->switch_q = q;
        return; /* the window is the consumer's only while there is exactly one */
    }
}

/* The cancel-ok of go_global's consumer: nothing of it is on its way any more. The channel's limit, at the window
 * asked for meanwhile, then the consumers made again (none during a warm shutdown: they are gone for good). */
static void finish_global(struct amqp_broker *b)
{
    b->switching = false;
    if (send_qos_as(b, 0, false) < 0 || send_qos_as(b, b->qos, true) < 0)
        return;
    for (size_t q = 0; q < b->nqueues && b->st && !b->paused; q++)
        if (b->active[q])
            consume_one(b, q);
}

/* Connects and declares every consumed queue; consumes at once when a window is set already (a reconnect). */
static int connect_broker(struct amqp_broker *b)
{
    char err[512];
    b->st = wire_open(b->ep, "celeriac consumer", CONNECT_TIMEOUT_MS, err, sizeof err);
    if (!b->st) {
        snprintf(b->errstr, sizeof b->errstr, "%s", err);
        return -1;
    }
    for (size_t q = 0; q < b->nqueues; q++) {
        if (b->active[q] &&
            wire_declare_task_queue(b->st, b->queues[q], b->ep->queue_max_priority, err, sizeof err) < 0) {
            snprintf(b->errstr, sizeof b->errstr, "%s", err);
            wire_close(b->st, false);
            b->st = NULL;
            return -1;
        }
    }
    b->last_rx = wire_now();
    b->next_housekeeping = 0;
    if (b->qos > 0 && !b->paused && start_consuming(b) < 0)
        return -1;
    return 0;
}

struct broker *amqp_broker_open(const struct broker_endpoint *ep, const struct broker_options *opt,
                                const struct broker_handlers *h, void *arg, char *err, size_t errlen)
{
    struct amqp_broker *b = calloc(1, sizeof *b);
    if (!b)
        abort();
    b->base.ops = &amqp_ops;
    b->ep = ep;
    b->h = *h;
    b->arg = arg;
    b->log = opt->log;
    b->nqueues = opt->nqueues;
    b->queues = calloc(opt->nqueues, sizeof *b->queues);
    b->active = calloc(opt->nqueues, sizeof *b->active);
    if (!b->queues || !b->active)
        abort();
    for (size_t q = 0; q < opt->nqueues; q++) {
        b->queues[q] = strdup(opt->queues[q]);
        b->active[q] = true;
    }
    if (connect_broker(b) < 0) {
        snprintf(err, errlen, "%s", b->errstr);
        amqp_ops.close(&b->base);
        return NULL;
    }
    return &b->base;
}

static void send_acks(struct amqp_broker *b);

static void amqp_close(struct broker *base)
{
    struct amqp_broker *b = (struct amqp_broker *)base;
    if (b->st)
        send_acks(b);
    wire_close(b->st, b->st != NULL);
    wire_incoming_clear(&b->in);
    for (size_t q = 0; q < b->nqueues; q++)
        free(b->queues[q]);
    free(b->queues);
    free(b->active);
    free(b->out);
    free(b);
}

static int amqp_pollfds(struct broker *base, struct pollfd *fds, int max)
{
    struct amqp_broker *b = (struct amqp_broker *)base;
    if (!b->st || max < 1)
        return 0;
    fds[0] = (struct pollfd){amqp_get_sockfd(b->st), POLLIN, 0};
    return 1;
}

static void deliver(struct amqp_broker *b)
{
    size_t q = (size_t)strtoul(b->in.consumer_tag, NULL, 10);
    if (q >= b->nqueues) {
        wire_incoming_clear(&b->in);
        return; /* not one of our consumers: cannot happen on our own channel */
    }
    char tag[48];
    snprintf(tag, sizeof tag, "%u.%llu", b->gen, (unsigned long long)b->in.delivery_tag);
    size_t len = 0;
    char *raw = wire_envelope(&b->in, tag, &len);
    struct broker_delivery *d = calloc(1, sizeof *d);
    if (!d || !raw)
        abort();
    d->tag = strdup(tag);
    d->raw = raw;
    d->len = len;
    d->queue = (int)q;
    d->priority = b->in.priority;
    d->msg_id = b->in.correlation_id ? strdup(b->in.correlation_id) : NULL;
    if (b->nout == b->capout) {
        b->capout = b->capout ? b->capout * 2 : 256;
        b->out = realloc(b->out, b->capout * sizeof *b->out);
        if (!b->out)
            abort();
    }
    b->out[b->nout++] = (struct outstanding){b->in.delivery_tag, false};
    b->unacked++;
    wire_incoming_clear(&b->in);
    b->h.on_deliver(b->arg, d);
}

static void handle_frame(struct amqp_broker *b, const amqp_frame_t *f)
{
    if (f->frame_type == AMQP_FRAME_METHOD) {
        switch (f->payload.method.id) {
        case AMQP_BASIC_DELIVER_METHOD: break;
        case AMQP_CONNECTION_CLOSE_METHOD: {
            const amqp_connection_close_t *m = f->payload.method.decoded;
            char why[300];
            snprintf(why, sizeof why, "connection closed by the broker: %u %.*s", m->reply_code, (int)m->reply_text.len,
                     (const char *)m->reply_text.bytes);
            amqp_connection_close_ok_t ok = {0};
            amqp_send_method(b->st, 0, AMQP_CONNECTION_CLOSE_OK_METHOD, &ok);
            lost(b, why);
            return;
        }
        case AMQP_CHANNEL_CLOSE_METHOD: {
            const amqp_channel_close_t *m = f->payload.method.decoded;
            char why[300];
            snprintf(why, sizeof why, "channel %u closed by the broker: %u %.*s", f->channel, m->reply_code,
                     (int)m->reply_text.len, (const char *)m->reply_text.bytes);
            lost(b, why); /* start over on a fresh connection: the consumers were on it */
            return;
        }
        case AMQP_BASIC_CANCEL_METHOD: lost(b, "the broker cancelled a consumer (queue deleted?)"); return;
        case AMQP_BASIC_CANCEL_OK_METHOD: {
            const amqp_basic_cancel_ok_t *m = f->payload.method.decoded;
            char tag[32];
            snprintf(tag, sizeof tag, "%zu", b->switch_q);
            if (b->switching && m->consumer_tag.len == strlen(tag) &&
                memcmp(m->consumer_tag.bytes, tag, m->consumer_tag.len) == 0)
                finish_global(b);
            return;
        }
        default: return; /* qos-ok, ... */
        }
    }
    if (f->channel == WIRE_CH && wire_incoming_feed(&b->in, f) == 1)
        deliver(b);
}

static bool want_drain(struct amqp_broker *b, const struct pollfd *fds, int n)
{
    return wire_want_read(b->st, &b->last_rx, fds, n);
}

/* Reads every frame librabbitmq can hand out without blocking (this also keeps the heartbeats going). One read
 * from the socket per call: once what it brought is used up, asking again would cost a recv that fails and a
 * poll (librabbitmq's), on every wake-up; the loop's poll says when there is more. */
static void drain(struct amqp_broker *b)
{
    struct timeval zero = {0, 0};
    for (int i = 0; i < DRAIN_MAX && b->st; i++) {
        if (i > 0 && !amqp_data_in_buffer(b->st) && !amqp_frames_enqueued(b->st))
            break;
        amqp_frame_t f;
        int rc = amqp_simple_wait_frame_noblock(b->st, &f, &zero);
        if (rc == AMQP_STATUS_TIMEOUT)
            break;
        if (rc != AMQP_STATUS_OK) {
            lost(b, amqp_error_string2(rc));
            return;
        }
        b->last_rx = wire_now();
        handle_frame(b, &f);
        if (b->st)
            amqp_maybe_release_buffers(b->st);
    }
}

static void drain_arg(void *b)
{
    drain(b);
}

/* False once the broker missed its heartbeats (wire_heartbeat_lost), and then the connection is dropped. */
static bool alive(struct amqp_broker *b, double now)
{
    char why[96];
    if (wire_heartbeat_lost(&b->st, &b->last_rx, now, drain_arg, b, why, sizeof why))
        lost(b, why);
    return b->st != NULL;
}

static int amqp_process(struct broker *base, const struct pollfd *fds, int n)
{
    struct amqp_broker *b = (struct amqp_broker *)base;
    if (want_drain(b, fds, n))
        drain(b);
    return 0;
}

static void ack_tag(struct amqp_broker *b, uint64_t tag, bool multiple)
{
    int rc = amqp_basic_ack(b->st, WIRE_CH, tag, multiple);
    if (rc != AMQP_STATUS_OK)
        lost(b, amqp_error_string2(rc));
}

/* Sends the acks recorded since the last flush (see DESIGN). */
static void send_acks(struct amqp_broker *b)
{
    if (!b->nacked || !b->st)
        return;
    size_t run = 0;
    while (run < b->nout && b->out[run].acked)
        run++;
    if (run)
        ack_tag(b, b->out[run - 1].tag, true);
    size_t w = 0;
    for (size_t i = run; i < b->nout && b->st; i++) {
        if (b->out[i].acked)
            ack_tag(b, b->out[i].tag, false);
        else
            b->out[w++] = b->out[i];
    }
    if (b->st)
        b->nout = w;
    b->nacked = 0;
}

static int amqp_flush(struct broker *base)
{
    struct amqp_broker *b = (struct amqp_broker *)base;
    if (b->nacked && alive(b, wire_now()))
        send_acks(b);
    return 0;
}

static bool amqp_connected(const struct broker *base)
{
    const struct amqp_broker *b = (const struct amqp_broker *)base;
    return b->st != NULL;
}

static void amqp_tick(struct broker *base, double now)
{
    struct amqp_broker *b = (struct amqp_broker *)base;
    if (b->st && !alive(b, now))
        return;
    if (b->st) {
        if (now >= b->next_housekeeping || want_drain(b, NULL, 0)) {
            drain(b);
            b->next_housekeeping = now + (b->st ? wire_housekeeping_interval(b->st) : 0);
        }
        return;
    }
    if (now < b->next_reconnect)
        return;
    if (connect_broker(b) < 0) {
        b->backoff = b->backoff * 2 > BACKOFF_MAX ? BACKOFF_MAX : b->backoff * 2;
        b->next_reconnect = wire_now() + b->backoff;
        log3(b, BROKER_LOG_ERROR, "consumer: Cannot connect to broker: ", b->errstr, ". Trying again...");
        return;
    }
    b->backoff = 0;
    b->errstr[0] = '\0';
    log3(b, BROKER_LOG_INFO, "Connected to ", b->ep->display, "");
}

static int amqp_next_tick_ms(const struct broker *base, double now)
{
    const struct amqp_broker *b = (const struct amqp_broker *)base;
    if (!b->st) {
        double ms = (b->next_reconnect - now) * 1000.0;
        return ms <= 0 ? 0 : (int)ms + 1;
    }
    if (amqp_data_in_buffer(b->st) || amqp_frames_enqueued(b->st))
        return 0;
    double ms = (b->next_housekeeping - now) * 1000.0;
    return ms <= 0 ? 0 : (int)ms + 1;
}

static bool amqp_should_fetch(const struct broker *base)
{
    const struct amqp_broker *b = (const struct amqp_broker *)base;
    return b->st && !b->paused;
}

static void amqp_fetch(struct broker *base, int max)
{
    struct amqp_broker *b = (struct amqp_broker *)base;
    if (!b->st || b->paused)
        return;
    long want = (long)b->qos + max;
    want = want < 1 ? 1 : want > QOS_MAX ? QOS_MAX : want;
    if (want == b->qos && b->consuming)
        return;
    b->qos = (int)want;
    if (!b->consuming)
        start_consuming(b);
    else if (!b->global)
        go_global(b);
    else if (!b->switching) /* else finish_global sets the window asked for by then */
        send_qos_as(b, b->qos, true);
}

/* basic.cancel of queue q's consumer (its tag is the queue's index). */
static void cancel_consumer(struct amqp_broker *b, size_t q)
{
    char tag[32];
    snprintf(tag, sizeof tag, "%zu", q);
    amqp_basic_cancel_t m = {amqp_cstring_bytes(tag), 1};
    int rc = amqp_send_method(b->st, WIRE_CH, AMQP_BASIC_CANCEL_METHOD, &m);
    if (rc != AMQP_STATUS_OK)
        lost(b, amqp_error_string2(rc));
}

static void amqp_pause(struct broker *base)
{
    struct amqp_broker *b = (struct amqp_broker *)base;
    b->paused = true;
    if (!b->st || !b->consuming || b->switching) /* switching: no consumer now, and none is made again */
        return;
    for (size_t q = 0; q < b->nqueues && b->st; q++) {
        if (!b->active[q])
            continue;
        cancel_consumer(b, q);
    }
}

static int amqp_fetch_in_flight(const struct broker *base)
{
    const struct amqp_broker *b = (const struct amqp_broker *)base;
    if (!b->st || !b->consuming || b->paused)
        return 0;
    return b->qos > b->unacked ? b->qos - b->unacked : 0;
}

static size_t amqp_pending(const struct broker *base)
{
    const struct amqp_broker *b = (const struct amqp_broker *)base;
    return b->st ? b->nacked : 0;
}

/* The outstanding entry for a tag of this connection, or NULL (an older connection's, or unknown). */
static struct outstanding *find_tag(struct amqp_broker *b, const char *tag)
{
    char *end;
    unsigned long gen = strtoul(tag, &end, 10);
    if (*end != '.' || gen != b->gen || !b->st)
        return NULL;
    uint64_t t = strtoull(end + 1, NULL, 10);
    size_t lo = 0, hi = b->nout; /* tags grow: binary search */
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (b->out[mid].tag < t)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < b->nout && b->out[lo].tag == t ? &b->out[lo] : NULL;
}

static void amqp_ack(struct broker *base, const char *tag)
{
    struct amqp_broker *b = (struct amqp_broker *)base;
    struct outstanding *o = find_tag(b, tag);
    if (!o || o->acked)
        return;
    o->acked = true;
    b->nacked++;
    b->unacked--;
}

/* Settles an entry now (reject, or the ack after a defer): removed so no multiple ack covers it again. */
static void forget(struct amqp_broker *b, struct outstanding *o)
{
    size_t i = (size_t)(o - b->out);
    memmove(&b->out[i], &b->out[i + 1], (b->nout - i - 1) * sizeof *b->out);
    b->nout--;
    b->unacked--;
}

static void amqp_requeue(struct broker *base, const struct broker_delivery *d)
{
    struct amqp_broker *b = (struct amqp_broker *)base;
    struct outstanding *o = find_tag(b, d->tag);
    if (!o || o->acked)
        return; /* an older connection's: the broker has put it back already */
    uint64_t tag = o->tag;
    forget(b, o);
    int rc = amqp_basic_reject(b->st, WIRE_CH, tag, 1);
    if (rc != AMQP_STATUS_OK)
        lost(b, amqp_error_string2(rc));
}

/* basic.reject without requeue: the queue's dead-letter exchange, if it has one, gets the message. */
static void amqp_reject(struct broker *base, const char *tag)
{
    struct amqp_broker *b = (struct amqp_broker *)base;
    struct outstanding *o = find_tag(b, tag);
    if (!o || o->acked)
        return; /* an older connection's: the broker delivers it again, and it is refused again */
    uint64_t t = o->tag;
    forget(b, o);
    int rc = amqp_basic_reject(b->st, WIRE_CH, t, 0);
    if (rc != AMQP_STATUS_OK)
        lost(b, amqp_error_string2(rc));
}

/* Back to the far end of its queue: published again (default exchange, the queue's name), then acked. If the
 * connection breaks in between, the broker requeues the original too: a duplicate, never a loss. */
static void amqp_defer(struct broker *base, const struct broker_delivery *d, double expires)
{
    struct amqp_broker *b = (struct amqp_broker *)base;
    struct outstanding *o = find_tag(b, d->tag);
    if (!o || o->acked)
        return;
    long long left_ms = -1; /* a message with a time to live keeps what is left of it (broker.h) */
    if (expires > 0) {
        struct timeval tv;
        gettimeofday(&tv, NULL);
        double left = expires - ((double)tv.tv_sec + tv.tv_usec / 1e6);
        left_ms = left <= 0 ? 0 : left > 1e15 ? (long long)1e15 : (long long)(left * 1000.0);
    }
    char err[256];
    int rc = wire_publish_envelope(b->st, "", b->queues[d->queue], d->raw, d->len, left_ms, err, sizeof err);
    if (rc == -2) {
        lost(b, err);
        return;
    }
    if (rc < 0) { /* cannot happen for an envelope we built; keep the message rather than lose it */
        amqp_requeue(base, d);
        return;
    }
    o->acked = true;
    b->nacked++;
    b->unacked--;
}

static int amqp_restore_visible(struct broker *base, double now)
{
    (void)base, (void)now;
    return 0; /* no visibility timeout on AMQP: the broker requeues what a lost connection held */
}

static const char *amqp_errstr(const struct broker *base)
{
    const struct amqp_broker *b = (const struct amqp_broker *)base;
    return b->errstr;
}

static int amqp_add_queue(struct broker *base, const char *queue)
{
    struct amqp_broker *b = (struct amqp_broker *)base;
    size_t q = 0;
    while (q < b->nqueues && strcmp(b->queues[q], queue) != 0)
        q++;
    if (q < b->nqueues && b->active[q])
        return 0;
    if (q == b->nqueues) {
        b->queues = realloc(b->queues, (q + 1) * sizeof *b->queues);
        b->active = realloc(b->active, (q + 1) * sizeof *b->active);
        if (!b->queues || !b->active)
            abort();
        b->queues[q] = strdup(queue);
        b->active[q] = false;
        b->nqueues++;
    }
    if (b->st) {
        char err[512];
        if (wire_declare_task_queue(b->st, queue, b->ep->queue_max_priority, err, sizeof err) < 0) {
            snprintf(b->errstr, sizeof b->errstr, "%s", err);
            return -1;
        }
        if (b->consuming && !b->global)
            go_global(b); /* before the second consumer exists */
        b->active[q] = true;
        if (b->consuming && b->st && !b->switching) /* else finish_global makes it */
            consume_one(b, q);
    } else {
        b->active[q] = true; /* consumed from the next connection on */
    }
    return 0;
}

static int amqp_cancel_queue(struct broker *base, const char *queue)
{
    struct amqp_broker *b = (struct amqp_broker *)base;
    for (size_t q = 0; q < b->nqueues; q++) {
        if (strcmp(b->queues[q], queue) != 0 || !b->active[q])
            continue;
        b->active[q] = false;
        if (b->st && b->consuming && !b->switching) /* switching: no consumer now; finish_global skips it */
            cancel_consumer(b, q);
        return 0;
    }
    return -1;
}

static size_t amqp_queue_count(const struct broker *base)
{
    return ((const struct amqp_broker *)base)->nqueues;
}

static const char *amqp_queue_name(const struct broker *base, size_t i, bool *consumed)
{
    const struct amqp_broker *b = (const struct amqp_broker *)base;
    *consumed = b->active[i];
    return b->queues[i];
}

static bool amqp_delivery_lost(const struct broker *base, const struct broker_delivery *d)
{
    const struct amqp_broker *b = (const struct amqp_broker *)base;
    return !b->st || strtoul(d->tag, NULL, 10) != b->gen; /* tags are "<generation>.<delivery tag>" */
}

static const struct broker_ops amqp_ops = {
    amqp_close,
    amqp_pollfds,
    amqp_process,
    amqp_flush,
    amqp_connected,
    amqp_tick,
    amqp_next_tick_ms,
    amqp_should_fetch,
    amqp_fetch,
    amqp_pause,
    amqp_fetch_in_flight,
    amqp_pending,
    amqp_ack,
    amqp_requeue,
    amqp_defer,
    amqp_restore_visible,
    amqp_errstr,
    amqp_add_queue,
    amqp_cancel_queue,
    amqp_queue_count,
    amqp_queue_name,
    amqp_delivery_lost,
    amqp_reject,
    NULL, /* fetch_blocked: the broker pushes, nothing waits */
    NULL, NULL, /* wait_took, wait_ended: nothing waits, nothing is lent */
};
