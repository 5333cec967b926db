/* transport: the table of operations behind broker.h's `struct broker` and pubsub.h's `struct bus`, private to
 * broker/. Each implementation (redis.c and pubsub.c for Redis, amqp.c and amqp_bus.c for RabbitMQ) embeds the
 * base struct first and fills one static ops table; transport.c forwards the public functions to it and picks
 * the implementation from the endpoint's kind at open. Same threading rule as broker.h: main process only. */
#ifndef CELERIAC_TRANSPORT_H
#define CELERIAC_TRANSPORT_H

#include "broker.h"
#include "pubsub.h"

struct broker_ops {
    void (*close)(struct broker *b);
    int (*pollfds)(struct broker *b, struct pollfd *fds, int max);
    int (*process)(struct broker *b, const struct pollfd *fds, int n);
    int (*flush)(struct broker *b);
    bool (*connected)(const struct broker *b);
    void (*tick)(struct broker *b, double now);
    int (*next_tick_ms)(const struct broker *b, double now);
    bool (*should_fetch)(const struct broker *b);
    void (*fetch)(struct broker *b, int max);
    void (*pause)(struct broker *b);
    int (*fetch_in_flight)(const struct broker *b);
    size_t (*pending)(const struct broker *b);
    void (*ack)(struct broker *b, const char *tag);
    void (*requeue)(struct broker *b, const struct broker_delivery *d);
    void (*defer)(struct broker *b, const struct broker_delivery *d, double expires);
    int (*restore_visible)(struct broker *b, double now);
    const char *(*errstr)(const struct broker *b);
    int (*add_queue)(struct broker *b, const char *queue);
    int (*cancel_queue)(struct broker *b, const char *queue);
    size_t (*queue_count)(const struct broker *b);
    const char *(*queue_name)(const struct broker *b, size_t i, bool *consumed);
    bool (*delivery_lost)(const struct broker *b, const struct broker_delivery *d);
    void (*reject)(struct broker *b, const char *tag);
    int (*fetch_blocked)(const struct broker *b); /* optional: NULL means never */
    /* Optional (only a transport that calls lend_wait): */
    void (*wait_took)(struct broker *b, const char *raw, size_t len, int raw_fd, bool lend_over);
    void (*wait_ended)(struct broker *b);
};

/* The first member of every transport's own struct. */
struct broker {
    const struct broker_ops *ops;
};

struct broker *redis_broker_open(const struct broker_endpoint *ep, const struct broker_options *opt,
                                 const struct broker_handlers *h, void *arg, char *err, size_t errlen);
struct broker *amqp_broker_open(const struct broker_endpoint *ep, const struct broker_options *opt,
                                const struct broker_handlers *h, void *arg, char *err, size_t errlen);

struct bus_ops {
    void (*close)(struct bus *b);
    int (*pollfds)(struct bus *b, struct pollfd *fds, int max);
    void (*process)(struct bus *b, const struct pollfd *fds, int n);
    void (*flush)(struct bus *b);
    bool (*connected)(const struct bus *b);
    void (*tick)(struct bus *b, double now);
    int (*next_tick_ms)(const struct bus *b, double now);
    unsigned long (*reconnects)(const struct bus *b);
    void (*publish)(struct bus *b, const char *channel, const char *data, size_t len);
    void (*deliver_direct)(struct bus *b, const char *binding_key, const char *routing_key, const char *data,
                           size_t len);
    void (*revoked_add)(struct bus *b, const char *key, const char *id, double now, double ttl, long max);
    long (*revoked_load)(struct bus *b, const char *key, double now, double ttl, bus_revoked_fn fn, void *arg);
};

struct bus {
    const struct bus_ops *ops;
};

struct bus *redis_bus_open(const struct broker_endpoint *ep, const struct bus_options *opt, char *err, size_t errlen);
struct bus *amqp_bus_open(const struct broker_endpoint *ep, const struct bus_options *opt, char *err, size_t errlen);

#endif
