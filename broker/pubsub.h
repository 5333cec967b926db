/* pubsub: kombu's fanout exchanges on Redis (protocol doc 3.7, 9.1): the remote-control channel
 * (`celery.pidbox`) and events (`celeryev`), plus the replies to control commands. On an AMQP endpoint the
 * same interface is served by amqp_bus.c with real exchanges (protocol doc 4); its DESIGN says how the
 * Redis-shaped arguments map over. What follows describes the Redis implementation (pubsub.c).
 *
 * DESIGN. Main process only, driven by its poll loop like the rest of broker/. Two connections: one
 * PSUBSCRIBEd (a subscribed Redis connection can run nothing else) and one for commands (PUBLISH of events,
 * binding registration, replies). Lost connections are reopened by bus_tick with backoff; pub/sub is fire and
 * forget, so what is published or broadcast while disconnected is lost, as with kombu. */
#ifndef CELERIAC_PUBSUB_H
#define CELERIAC_PUBSUB_H

#include <poll.h>
#include <stdbool.h>
#include <stddef.h>

#include "broker.h"

struct bus;

/* One message from a subscribed pattern: channel and data borrowed for the call. */
typedef void (*bus_message_fn)(void *arg, const char *channel, const char *data, size_t len);

struct bus_options {
    const char *pattern;         /* borrowed: PSUBSCRIBEd on every (re)connect, e.g. "/0.celery.pidbox" */
    const char *binding_key;     /* borrowed: SADDed with binding_member on every connect (kombu's queue_bind */
    const char *binding_member;  /* record, so clients see the node as bound); NULL: none */
    bus_message_fn on_message;
    void *arg;
    broker_log_fn log;
};

/* Connects (blocking, with a timeout). Returns NULL with err filled. ep and opt strings must outlive the bus. */
struct bus *bus_open(const struct broker_endpoint *ep, const struct bus_options *opt, char *err, size_t errlen);
/* Sends what is queued (best effort, blocking up to a short timeout), removes the binding, closes. NULL ok. */
void bus_close(struct bus *b);
int bus_pollfds(struct bus *b, struct pollfd *fds, int max);
void bus_process(struct bus *b, const struct pollfd *fds, int n);
void bus_flush(struct bus *b);
bool bus_connected(const struct bus *b);
void bus_tick(struct bus *b, double now);
int bus_next_tick_ms(const struct bus *b, double now);
/* Counts connections re-established after a loss (for metrics). */
unsigned long bus_reconnects(const struct bus *b);

/* PUBLISH channel data. Both borrowed (copied). Dropped while disconnected. */
void bus_publish(struct bus *b, const char *channel, const char *data, size_t len);
/* Delivers data to the queues bound to `binding_key` (a kombu direct exchange's binding set) with routing key
 * `routing_key`, as kombu's DirectExchange.deliver does (LPUSH to each), in one server-side step; nothing when
 * none is bound (the client has gone). All borrowed (copied). */
void bus_deliver_direct(struct bus *b, const char *binding_key, const char *routing_key, const char *data,
                        size_t len);


/* Revoked task ids kept in Redis so that they outlive a worker (stock Celery needs a per-worker state file):
 * the sorted set `key` of ids scored by revoke time, trimmed to `max` members and `ttl` seconds, the key
 * itself expiring ttl after the last revoke. Non-blocking; dropped while disconnected. Strings borrowed. */
void bus_revoked_add(struct bus *b, const char *key, const char *id, double now, double ttl, long max);
/* Blocking (start-up only): calls fn for every id revoked within ttl, oldest first. Returns how many, or -1. */
typedef void (*bus_revoked_fn)(void *arg, const char *id, double when);
long bus_revoked_load(struct bus *b, const char *key, double now, double ttl, bus_revoked_fn fn, void *arg);

#endif
