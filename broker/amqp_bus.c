/* amqp_bus: remote control and events over AMQP, behind pubsub.h (protocol doc 4). Main process only.
 *
 * DESIGN. One connection of its own, declared as stock Celery declares these: the `celery.pidbox` fanout
 * exchange with our `<node>.celery.pidbox` queue bound to it (auto-delete, x-expires 10 s, x-message-ttl
 * 300 s), consumed without acks; the `celeryev` topic exchange (durable) that events are published to with
 * their type as routing key; the `reply.celery.pidbox` direct exchange that replies go to with the client's
 * oid as routing key. The Redis-shaped arguments of pubsub.h map over: a channel "/<db>.celeryev/<type>" is
 * routing key <type>; a binding key "_kombu.binding.<exchange>" names the exchange; the binding member
 * "<rk>SEP<pattern>SEP<queue>" names our queue. Events and replies are fire and forget, as with kombu: what is
 * published while the connection is down is dropped. Revoked ids are not kept on AMQP (no Redis here). */
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
#define DRAIN_MAX 256
#define BINDING_PREFIX "_kombu.binding."

struct amqp_bus {
    struct bus base;                  /* first: see transport.h */
    const struct broker_endpoint *ep; /* borrowed */
    struct bus_options opt;           /* strings borrowed */
    char *queue;                      /* owned: "<node>.celery.pidbox" */
    char *exchange;                   /* owned: "celery.pidbox" */
    amqp_connection_state_t st;       /* NULL while disconnected */
    double next_reconnect, backoff;
    unsigned long reconnects;
    struct wire_incoming in;
    double next_housekeeping; /* epoch seconds: the next drain whether or not the socket is readable */
    double last_rx;           /* epoch seconds anything (a heartbeat at least) last came from the broker */
};

static const struct bus_ops amqp_bus_ops;

static void bus_log(struct amqp_bus *b, int level, const char *what, const char *why)
{
    if (!b->opt.log)
        return;
    char line[700];
    snprintf(line, sizeof line, "pubsub: %s (%s)", what, why);
    b->opt.log(level, line);
}

static void lost(struct amqp_bus *b, const char *why)
{
    bus_log(b, BROKER_LOG_ERROR, "connection lost; reconnecting", why);
    wire_close(b->st, false);
    b->st = NULL;
    wire_incoming_clear(&b->in);
    b->backoff = b->backoff ? b->backoff : BACKOFF_MIN;
    b->next_reconnect = wire_now() + b->backoff;
}

static int rpc(struct amqp_bus *b, const char *what, char *err, size_t errlen)
{
    amqp_rpc_reply_t r = amqp_get_rpc_reply(b->st);
    if (r.reply_type == AMQP_RESPONSE_NORMAL)
        return 0;
    char why[300];
    wire_reply_str(r, why, sizeof why);
    snprintf(err, errlen, "%s: %s", what, why);
    return -1;
}

static int connect_bus(struct amqp_bus *b, char *err, size_t errlen)
{
    b->st = wire_open(b->ep, "celeriac control", CONNECT_TIMEOUT_MS, err, errlen);
    if (!b->st)
        return -1;
    if (wire_declare_exchange(b->st, b->exchange, "fanout", false, err, errlen) < 0 ||
        wire_declare_exchange(b->st, "reply.celery.pidbox", "direct", false, err, errlen) < 0 ||
        wire_declare_exchange(b->st, "celeryev", "topic", true, err, errlen) < 0)
        goto fail;
    amqp_table_entry_t args[2] = {
        {amqp_cstring_bytes("x-expires"), {AMQP_FIELD_KIND_I32, {.i32 = 10000}}},
        {amqp_cstring_bytes("x-message-ttl"), {AMQP_FIELD_KIND_I32, {.i32 = 300000}}},
    };
    amqp_bytes_t q = amqp_cstring_bytes(b->queue);
    amqp_queue_declare(b->st, WIRE_CH, q, 0, 0, 0, 1, (amqp_table_t){2, args});
    if (rpc(b, "queue.declare (pidbox)", err, errlen) < 0)
        goto fail;
    amqp_queue_bind(b->st, WIRE_CH, q, amqp_cstring_bytes(b->exchange), amqp_empty_bytes, amqp_empty_table);
    if (rpc(b, "queue.bind (pidbox)", err, errlen) < 0)
        goto fail;
    amqp_basic_consume(b->st, WIRE_CH, q, amqp_empty_bytes, 0, 1, 0, amqp_empty_table);
    if (rpc(b, "basic.consume (pidbox)", err, errlen) < 0)
        goto fail;
    b->last_rx = wire_now();
    b->next_housekeeping = 0;
    return 0;
fail:
    wire_close(b->st, false);
    b->st = NULL;
    return -1;
}

static void amqp_bus_close(struct bus *base)
{
    struct amqp_bus *b = (struct amqp_bus *)base;
    wire_close(b->st, b->st != NULL); /* the auto-delete pidbox queue goes with the connection */
    wire_incoming_clear(&b->in);
    free(b->queue);
    free(b->exchange);
    free(b);
}

struct bus *amqp_bus_open(const struct broker_endpoint *ep, const struct bus_options *opt, char *err, size_t errlen)
{
    struct amqp_bus *b = calloc(1, sizeof *b);
    if (!b)
        abort();
    b->base.ops = &amqp_bus_ops;
    b->ep = ep;
    b->opt = *opt;
    const char *member = opt->binding_member ? opt->binding_member : "";
    const char *last = strrchr(member, '\x16');
    b->queue = strdup(last ? last + 1 : member);
    const char *key = opt->binding_key ? opt->binding_key : "celery.pidbox";
    b->exchange =
        strdup(strncmp(key, BINDING_PREFIX, strlen(BINDING_PREFIX)) == 0 ? key + strlen(BINDING_PREFIX) : key);
    if (connect_bus(b, err, errlen) < 0) {
        amqp_bus_close(&b->base);
        return NULL;
    }
    return &b->base;
}

static int amqp_bus_pollfds(struct bus *base, struct pollfd *fds, int max)
{
    struct amqp_bus *b = (struct amqp_bus *)base;
    if (!b->st || max < 1)
        return 0;
    fds[0] = (struct pollfd){amqp_get_sockfd(b->st), POLLIN, 0};
    return 1;
}

static bool want_drain(struct amqp_bus *b, const struct pollfd *fds, int n)
{
    return wire_want_read(b->st, &b->last_rx, fds, n);
}

static void drain(struct amqp_bus *b)
{
    struct timeval zero = {0, 0};
    for (int i = 0; i < DRAIN_MAX && b->st; i++) {
        amqp_frame_t f;
        int rc = amqp_simple_wait_frame_noblock(b->st, &f, &zero);
        if (rc == AMQP_STATUS_TIMEOUT)
            break;
        if (rc != AMQP_STATUS_OK) {
            lost(b, amqp_error_string2(rc));
            return;
        }
        b->last_rx = wire_now();
        if (f.frame_type == AMQP_FRAME_METHOD &&
            (f.payload.method.id == AMQP_CONNECTION_CLOSE_METHOD || f.payload.method.id == AMQP_CHANNEL_CLOSE_METHOD)) {
            lost(b, "closed by the broker");
            return;
        }
        if (f.channel == WIRE_CH && wire_incoming_feed(&b->in, &f) == 1) {
            size_t len = 0;
            char *env = wire_envelope(&b->in, "", &len);
            char exchange[256];
            snprintf(exchange, sizeof exchange, "%s", b->in.exchange);
            wire_incoming_clear(&b->in);
            if (env)
                b->opt.on_message(b->opt.arg, exchange, env, len);
            free(env);
        }
        if (b->st)
            amqp_maybe_release_buffers(b->st);
    }
}

static void drain_arg(void *b)
{
    drain(b);
}

/* False once the broker missed its heartbeats (wire_heartbeat_lost), and then the connection is dropped. */
static bool alive(struct amqp_bus *b, double now)
{
    char why[96];
    if (wire_heartbeat_lost(&b->st, &b->last_rx, now, drain_arg, b, why, sizeof why))
        lost(b, why);
    return b->st != NULL;
}

static void amqp_bus_process(struct bus *base, const struct pollfd *fds, int n)
{
    struct amqp_bus *b = (struct amqp_bus *)base;
    if (want_drain(b, fds, n))
        drain(b);
}

static void amqp_bus_flush(struct bus *base)
{
    (void)base; /* publishes are written when issued */
}

static bool amqp_bus_connected(const struct bus *base)
{
    return ((const struct amqp_bus *)base)->st != NULL;
}

static void amqp_bus_tick(struct bus *base, double now)
{
    struct amqp_bus *b = (struct amqp_bus *)base;
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
    char err[512];
    if (connect_bus(b, err, sizeof err) < 0) {
        b->backoff = b->backoff * 2 > BACKOFF_MAX ? BACKOFF_MAX : b->backoff * 2;
        b->next_reconnect = wire_now() + b->backoff;
        return;
    }
    b->backoff = 0;
    b->reconnects++;
}

static int amqp_bus_next_tick_ms(const struct bus *base, double now)
{
    const struct amqp_bus *b = (const struct amqp_bus *)base;
    if (!b->st) {
        double ms = (b->next_reconnect - now) * 1000.0;
        return ms <= 0 ? 0 : (int)ms + 1;
    }
    if (amqp_data_in_buffer(b->st) || amqp_frames_enqueued(b->st))
        return 0;
    double ms = (b->next_housekeeping - now) * 1000.0;
    return ms <= 0 ? 0 : (int)ms + 1;
}

static unsigned long amqp_bus_reconnects(const struct bus *base)
{
    return ((const struct amqp_bus *)base)->reconnects;
}

static void publish(struct amqp_bus *b, const char *exchange, const char *routing_key, const char *data, size_t len)
{
    if (!alive(b, wire_now()))
        return;
    char err[256];
    if (wire_publish_envelope(b->st, exchange, routing_key, data, len, -1, err, sizeof err) == -2)
        lost(b, err);
}

static void amqp_bus_publish(struct bus *base, const char *channel, const char *data, size_t len)
{
    const char *slash = strrchr(channel, '/');
    publish((struct amqp_bus *)base, "celeryev", slash ? slash + 1 : channel, data, len);
}

static void amqp_bus_deliver_direct(struct bus *base, const char *binding_key, const char *routing_key,
                                    const char *data, size_t len)
{
    const char *exchange = strncmp(binding_key, BINDING_PREFIX, strlen(BINDING_PREFIX)) == 0
                               ? binding_key + strlen(BINDING_PREFIX)
                               : binding_key;
    publish((struct amqp_bus *)base, exchange, routing_key, data, len);
}

/* RabbitMQ has nowhere to keep the revoked set: on AMQP the consumer keeps it in the result backend's Redis
 * (backend_revoked_add), so these two are never asked for anything. */
static void amqp_bus_revoked_add(struct bus *base, const char *key, const char *id, double now, double ttl, long max)
{
    (void)base, (void)key, (void)id, (void)now, (void)ttl, (void)max;
}

static long amqp_bus_revoked_load(struct bus *base, const char *key, double now, double ttl, bus_revoked_fn fn,
                                  void *arg)
{
    (void)base, (void)key, (void)now, (void)ttl, (void)fn, (void)arg;
    return 0;
}

static const struct bus_ops amqp_bus_ops = {
    amqp_bus_close,     amqp_bus_pollfds,        amqp_bus_process,      amqp_bus_flush,
    amqp_bus_connected, amqp_bus_tick,           amqp_bus_next_tick_ms, amqp_bus_reconnects,
    amqp_bus_publish,   amqp_bus_deliver_direct, amqp_bus_revoked_add,  amqp_bus_revoked_load,
};
