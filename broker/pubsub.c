/* pubsub: see pubsub.h. Main process only. */
#include "pubsub.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "rconn.h"
#include "transport.h"

#define BACKOFF_MIN 0.1
#define BACKOFF_MAX 5.0


/* kombu's direct-exchange delivery: the binding records are "routing_key SEP pattern SEP queue"; every queue
 * whose routing key matches gets the message at the head of its list (priority 0 is the queue name itself). */
static const char deliver_script[] =
    "local n = 0\n"
    "for _, m in ipairs(redis.call('SMEMBERS', KEYS[1])) do\n"
    "  local a = string.find(m, '\\6\\22', 1, true)\n"
    "  if a and string.sub(m, 1, a - 1) == ARGV[1] then\n"
    "    local rest = string.sub(m, a + 2)\n"
    "    local b = string.find(rest, '\\6\\22', 1, true)\n"
    "    if b then redis.call('LPUSH', string.sub(rest, b + 2), ARGV[2]); n = n + 1 end\n"
    "  end\n"
    "end\n"
    "return n\n";

struct redis_bus {
    struct bus base;                  /* first: see transport.h */
    const struct broker_endpoint *ep; /* borrowed */
    struct bus_options opt;           /* strings borrowed */
    struct rconn sub, cmd;
    double next_reconnect, backoff;
    unsigned long reconnects;
};

static void on_push(struct rconn *c, redisReply *r, void *arg, bool *steal)
{
    (void)c;
    (void)steal;
    struct redis_bus *b = arg;
    /* ["pmessage", pattern, channel, data]; subscription confirmations are ignored. */
    if (!r || r->type != REDIS_REPLY_ARRAY || r->elements != 4 || r->element[0]->type != REDIS_REPLY_STRING ||
        strcmp(r->element[0]->str, "pmessage") != 0 || r->element[2]->type != REDIS_REPLY_STRING ||
        r->element[3]->type != REDIS_REPLY_STRING)
        return;
    b->opt.on_message(b->opt.arg, r->element[2]->str, r->element[3]->str, r->element[3]->len);
}

static int connect_bus(struct redis_bus *b, int timeout_ms)
{
    if (rconn_open(&b->cmd, "pubsub", b->ep, timeout_ms) < 0)
        return -1;
    if (rconn_open(&b->sub, "pubsub-sub", b->ep, timeout_ms) < 0) {
        snprintf(b->cmd.errstr, sizeof b->cmd.errstr, "%s", b->sub.errstr);
        rconn_close(&b->cmd);
        return -1;
    }
    b->sub.push_cb = on_push;
    b->sub.push_arg = b;
    rconn_send(&b->sub, "PSUBSCRIBE %s", b->opt.pattern);
    if (b->opt.binding_key && b->opt.binding_member)
        rconn_command(&b->cmd, NULL, NULL, "SADD %s %s", b->opt.binding_key, b->opt.binding_member);
    rconn_flush(&b->sub);
    rconn_flush(&b->cmd);
    b->backoff = 0;
    return 0;
}

static void lost(struct redis_bus *b, const char *why)
{
    rconn_log(&b->cmd, BROKER_LOG_ERROR, "pubsub: connection lost (%s); reconnecting", why);
    rconn_close(&b->sub);
    rconn_close(&b->cmd);
    b->backoff = BACKOFF_MIN;
    b->next_reconnect = rconn_epoch() + b->backoff;
}

static const struct bus_ops redis_bus_ops;
static void redis_bus_close(struct bus *base);

struct bus *redis_bus_open(const struct broker_endpoint *ep, const struct bus_options *opt, char *err,
                           size_t errlen)
{
    struct redis_bus *b = calloc(1, sizeof *b);
    if (!b)
        abort();
    b->base.ops = &redis_bus_ops;
    b->ep = ep;
    b->opt = *opt;
    b->sub.log = b->cmd.log = opt->log;
    if (connect_bus(b, 5000) < 0) {
        snprintf(err, errlen, "%s", b->cmd.errstr);
        redis_bus_close(&b->base);
        return NULL;
    }
    return &b->base;
}

static void redis_bus_close(struct bus *base)
{
    struct redis_bus *b = (struct redis_bus *)base;
    if (!b)
        return;
    if (rconn_connected(&b->cmd) && b->opt.binding_key && b->opt.binding_member) {
        /* Blocking, once, at exit: flushes what is queued (a worker-offline event) and drops our binding. */
        redisReply *r = rconn_call(&b->cmd, "SREM %s %s", b->opt.binding_key, b->opt.binding_member);
        if (r)
            freeReplyObject(r);
    } else if (rconn_connected(&b->cmd)) {
        redisReply *r = rconn_call(&b->cmd, "PING");
        if (r)
            freeReplyObject(r);
    }
    rconn_close(&b->sub);
    rconn_close(&b->cmd);
    free(b->sub.q);
    free(b->cmd.q);
    free(b);
}

static bool redis_bus_connected(const struct bus *base)
{
    const struct redis_bus *b = (const struct redis_bus *)base;
    return rconn_connected(&b->sub) && rconn_connected(&b->cmd);
}

static unsigned long redis_bus_reconnects(const struct bus *base)
{
    const struct redis_bus *b = (const struct redis_bus *)base;
    return b->reconnects;
}

static int redis_bus_pollfds(struct bus *base, struct pollfd *fds, int max)
{
    struct redis_bus *b = (struct redis_bus *)base;
    int n = 0;
    struct rconn *cs[] = {&b->sub, &b->cmd};
    for (size_t i = 0; i < 2 && n < max; i++)
        if (rconn_connected(cs[i]))
            fds[n++] = (struct pollfd){rconn_fd(cs[i]), POLLIN | (rconn_wants_write(cs[i]) ? POLLOUT : 0), 0};
    return n;
}

static void redis_bus_process(struct bus *base, const struct pollfd *fds, int n)
{
    struct redis_bus *b = (struct redis_bus *)base;
    struct rconn *cs[] = {&b->sub, &b->cmd};
    for (size_t k = 0; k < 2; k++) {
        struct rconn *c = cs[k];
        for (int i = 0; i < n && rconn_connected(c); i++) {
            if (fds[i].fd != rconn_fd(c) || !fds[i].revents)
                continue;
            if (((fds[i].revents & POLLOUT) && rconn_flush(c) < 0) ||
                ((fds[i].revents & (POLLIN | POLLHUP | POLLERR)) && rconn_read(c) < 0)) {
                char why[256];
                snprintf(why, sizeof why, "%s", c->errstr);
                lost(b, why);
                return;
            }
        }
    }
}

static void redis_bus_flush(struct bus *base)
{
    struct redis_bus *b = (struct redis_bus *)base;
    struct rconn *cs[] = {&b->sub, &b->cmd};
    for (size_t k = 0; k < 2; k++) {
        if (rconn_connected(cs[k]) && rconn_flush(cs[k]) < 0) {
            char why[256];
            snprintf(why, sizeof why, "%s", cs[k]->errstr);
            lost(b, why);
            return;
        }
    }
}

static void redis_bus_tick(struct bus *base, double now)
{
    struct redis_bus *b = (struct redis_bus *)base;
    if (redis_bus_connected(&b->base) || now < b->next_reconnect)
        return;
    rconn_close(&b->sub);
    rconn_close(&b->cmd);
    if (connect_bus(b, 1000) == 0) {
        b->reconnects++;
        rconn_log(&b->cmd, BROKER_LOG_WARNING, "pubsub: reconnected to %s", b->ep->display);
        return;
    }
    b->backoff = b->backoff < BACKOFF_MIN ? BACKOFF_MIN : b->backoff * 2;
    if (b->backoff > BACKOFF_MAX)
        b->backoff = BACKOFF_MAX;
    b->next_reconnect = now + b->backoff;
}

static int redis_bus_next_tick_ms(const struct bus *base, double now)
{
    const struct redis_bus *b = (const struct redis_bus *)base;
    if (redis_bus_connected(&b->base))
        return 1000;
    double ms = (b->next_reconnect - now) * 1000.0;
    return ms < 0 ? 0 : ms > 1000 ? 1000 : (int)ms + 1;
}

static void redis_bus_publish(struct bus *base, const char *channel, const char *data, size_t len)
{
    struct redis_bus *b = (struct redis_bus *)base;
    if (rconn_connected(&b->cmd))
        rconn_command(&b->cmd, NULL, NULL, "PUBLISH %s %b", channel, data, len);
}

static void redis_bus_deliver_direct(struct bus *base, const char *binding_key, const char *routing_key,
                                     const char *data, size_t len)
{
    struct redis_bus *b = (struct redis_bus *)base;
    if (rconn_connected(&b->cmd))
        rconn_command(&b->cmd, NULL, NULL, "EVAL %s 1 %s %s %b", deliver_script, binding_key, routing_key, data,
                      len);
}

static void redis_bus_revoked_add(struct bus *base, const char *key, const char *id, double now, double ttl,
                                  long max)
{
    struct redis_bus *b = (struct redis_bus *)base;
    rconn_revoked_add(&b->cmd, key, id, now, ttl, max);
}

static long redis_bus_revoked_load(struct bus *base, const char *key, double now, double ttl, bus_revoked_fn fn,
                                   void *arg)
{
    struct redis_bus *b = (struct redis_bus *)base;
    return rconn_revoked_load(&b->cmd, key, now, ttl, fn, arg);
}

static const struct bus_ops redis_bus_ops = {
    redis_bus_close, redis_bus_pollfds, redis_bus_process, redis_bus_flush, redis_bus_connected,
    redis_bus_tick, redis_bus_next_tick_ms, redis_bus_reconnects, redis_bus_publish, redis_bus_deliver_direct,
    redis_bus_revoked_add, redis_bus_revoked_load,
};
