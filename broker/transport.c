/* transport: broker.h's and pubsub.h's public functions, forwarded to the implementation chosen at open
 * (see transport.h). */
#include "transport.h"

#include <stddef.h>
#include <sys/mman.h>
#include <unistd.h>

struct broker *broker_open(const struct broker_endpoint *ep, const struct broker_options *opt,
                           const struct broker_handlers *h, void *arg, char *err, size_t errlen)
{
    return ep->kind == BROKER_AMQP ? amqp_broker_open(ep, opt, h, arg, err, errlen)
                                   : redis_broker_open(ep, opt, h, arg, err, errlen);
}

void broker_close(struct broker *b)
{
    if (b)
        b->ops->close(b);
}

int broker_pollfds(struct broker *b, struct pollfd *fds, int max)
{
    return b->ops->pollfds(b, fds, max);
}

int broker_process(struct broker *b, const struct pollfd *fds, int n)
{
    return b->ops->process(b, fds, n);
}

int broker_flush(struct broker *b)
{
    return b->ops->flush(b);
}

bool broker_connected(const struct broker *b)
{
    return b->ops->connected(b);
}

void broker_tick(struct broker *b, double now)
{
    b->ops->tick(b, now);
}

int broker_next_tick_ms(const struct broker *b, double now)
{
    return b->ops->next_tick_ms(b, now);
}

bool broker_should_fetch(const struct broker *b)
{
    return b->ops->should_fetch(b);
}

void broker_fetch(struct broker *b, int max)
{
    b->ops->fetch(b, max);
}

void broker_pause(struct broker *b)
{
    b->ops->pause(b);
}

int broker_fetch_in_flight(const struct broker *b)
{
    return b->ops->fetch_in_flight(b);
}

int broker_fetch_blocked(const struct broker *b)
{
    return b->ops->fetch_blocked ? b->ops->fetch_blocked(b) : 0;
}

void broker_wait_took(struct broker *b, const char *raw, size_t len, int raw_fd, bool lend_over)
{
    if (b->ops->wait_took) {
        b->ops->wait_took(b, raw, len, raw_fd, lend_over);
    } else if (raw_fd >= 0) { /* nothing is lent on this transport; still ours to release */
        munmap((void *)raw, len + 2);
        close(raw_fd);
    }
}

void broker_wait_ended(struct broker *b)
{
    if (b->ops->wait_ended)
        b->ops->wait_ended(b);
}

size_t broker_pending(const struct broker *b)
{
    return b->ops->pending(b);
}

void broker_ack(struct broker *b, const char *tag)
{
    b->ops->ack(b, tag);
}

void broker_requeue(struct broker *b, const struct broker_delivery *d)
{
    b->ops->requeue(b, d);
}

void broker_defer(struct broker *b, const struct broker_delivery *d, double expires)
{
    b->ops->defer(b, d, expires);
}

int broker_restore_visible(struct broker *b, double now)
{
    return b->ops->restore_visible(b, now);
}

const char *broker_errstr(const struct broker *b)
{
    return b->ops->errstr(b);
}

int broker_add_queue(struct broker *b, const char *queue)
{
    return b->ops->add_queue(b, queue);
}

int broker_cancel_queue(struct broker *b, const char *queue)
{
    return b->ops->cancel_queue(b, queue);
}

size_t broker_queue_count(const struct broker *b)
{
    return b->ops->queue_count(b);
}

const char *broker_queue_name(const struct broker *b, size_t i, bool *consumed)
{
    return b->ops->queue_name(b, i, consumed);
}

void broker_reject(struct broker *b, const char *tag)
{
    b->ops->reject(b, tag);
}

bool broker_delivery_lost(const struct broker *b, const struct broker_delivery *d)
{
    return b->ops->delivery_lost(b, d);
}

struct bus *bus_open(const struct broker_endpoint *ep, const struct bus_options *opt, char *err, size_t errlen)
{
    return ep->kind == BROKER_AMQP ? amqp_bus_open(ep, opt, err, errlen) : redis_bus_open(ep, opt, err, errlen);
}

void bus_close(struct bus *b)
{
    if (b)
        b->ops->close(b);
}

int bus_pollfds(struct bus *b, struct pollfd *fds, int max)
{
    return b->ops->pollfds(b, fds, max);
}

void bus_process(struct bus *b, const struct pollfd *fds, int n)
{
    b->ops->process(b, fds, n);
}

void bus_flush(struct bus *b)
{
    b->ops->flush(b);
}

bool bus_connected(const struct bus *b)
{
    return b->ops->connected(b);
}

void bus_tick(struct bus *b, double now)
{
    b->ops->tick(b, now);
}

int bus_next_tick_ms(const struct bus *b, double now)
{
    return b->ops->next_tick_ms(b, now);
}

unsigned long bus_reconnects(const struct bus *b)
{
    return b->ops->reconnects(b);
}

void bus_publish(struct bus *b, const char *channel, const char *data, size_t len)
{
    b->ops->publish(b, channel, data, len);
}

void bus_deliver_direct(struct bus *b, const char *binding_key, const char *routing_key, const char *data, size_t len)
{
    b->ops->deliver_direct(b, binding_key, routing_key, data, len);
}

void bus_revoked_add(struct bus *b, const char *key, const char *id, double now, double ttl, long max)
{
    b->ops->revoked_add(b, key, id, now, ttl, max);
}

long bus_revoked_load(struct bus *b, const char *key, double now, double ttl, bus_revoked_fn fn, void *arg)
{
    return b->ops->revoked_load(b, key, now, ttl, fn, arg);
}
