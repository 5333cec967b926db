/* amqp_wire: what the AMQP transport (amqp.c), its bus (amqp_bus.c) and the producer share, private to broker/:
 * opening a connection (TCP or TLS, login, heartbeat), declaring Celery's exchanges and queues, and converting
 * between AMQP messages and the kombu envelope JSON that the rest of celeriac reads and writes (the Redis
 * transport's message format, protocol doc 3.2): the worker decodes one format whatever the broker. */
#ifndef CELERIAC_AMQP_WIRE_H
#define CELERIAC_AMQP_WIRE_H

#include <amqp.h>
#include <poll.h>
#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "broker.h"

/* Channel 1 carries the work (consume, publish, acks); channel 2 the declarations, since a failed passive
 * declare closes its channel and must not take the consumers down with it. */
enum { WIRE_CH = 1, WIRE_DECLARE_CH = 2 };

/* Connects, logs in and opens both channels, blocking up to timeout_ms per step. name: the connection_name
 * RabbitMQ's management shows. Returns the connection, or NULL with err filled. */
amqp_connection_state_t wire_open(const struct broker_endpoint *ep, const char *name, int timeout_ms, char *err,
                                  size_t errlen);
/* Closes politely when polite (channel and connection close, bounded by the rpc timeout), then frees. NULL ok. */
void wire_close(amqp_connection_state_t st, bool polite);
/* One line for an RPC's outcome; "" when it succeeded. */
void wire_reply_str(amqp_rpc_reply_t r, char *err, size_t errlen);

/* Declares a task queue as stock Celery does for a queue it consumes or routes to (doc 4): the direct, durable
 * exchange of the same name, the durable queue (x-max-priority when max_priority > 0) and the binding with the
 * queue's name as routing key. A queue that exists already is kept as it is (a passive declare first), so a
 * client's own queue arguments never make this fail with PRECONDITION_FAILED. Returns 0 or -1 with err. */
int wire_declare_task_queue(amqp_connection_state_t st, const char *queue, int max_priority, char *err, size_t errlen);
/* exchange.declare on the declare channel. Returns 0 or -1 with err. */
int wire_declare_exchange(amqp_connection_state_t st, const char *name, const char *type, bool durable, char *err,
                          size_t errlen);

/* A message being received: the basic.deliver fields, then the header, then the body frames. */
struct wire_incoming {
    bool active; /* a basic.deliver came and the message is not complete yet */
    bool have_header;
    uint64_t delivery_tag;
    bool redelivered;
    char *exchange, *routing_key, *consumer_tag; /* owned */
    char *correlation_id; /* owned; NULL when the message has none (or one that is not UTF-8) */
    char *head;           /* owned: the envelope's text from the header frame, up to the delivery fields */
    size_t head_len;
    int priority;
    size_t body_size;
    char *body; /* owned, body_size bytes */
    size_t body_len;
};
/* Feeds one frame of channel ch. Returns 1 when a message is complete (then wire_envelope it and
 * wire_incoming_clear), 0 when more frames are needed or the frame is not part of a message. */
int wire_incoming_feed(struct wire_incoming *in, const amqp_frame_t *f);
/* The kombu envelope JSON of the complete message in (caller frees with free()); *len its length. tag: the
 * envelope's delivery_tag. NULL when it cannot be encoded. */
char *wire_envelope(const struct wire_incoming *in, const char *tag, size_t *len);
void wire_incoming_clear(struct wire_incoming *in);

/* Publishes a kombu envelope (borrowed) on WIRE_CH: body decoded from base64 when body_encoding says so,
 * headers as an AMQP table, content type and encoding, delivery_mode, priority, correlation_id, reply_to and
 * expiration (the time to live, milliseconds in a string; one that is not a count of milliseconds is left out,
 * as the broker would close the channel over it), cut to max_ttl_ms when that is >= 0. exchange / routing_key:
 * NULL takes the envelope's delivery_info. Returns 0, -1 with err filled when the envelope is unusable (nothing
 * sent), or -2 on a connection error. */
int wire_publish_envelope(amqp_connection_state_t st, const char *exchange, const char *routing_key, const char *data,
                          size_t len, long long max_ttl_ms, char *err, size_t errlen);

/* Liveness of a connection the main loop polls (the transport and the bus alike). librabbitmq notices missed
 * heartbeats only while it waits to read, which the loop never does, and a send made after its deadline has
 * passed can block for good: so the loop keeps its own watch, through these. Times are wire_now() seconds. */
double wire_now(void);
/* Whether to read now: the socket polled readable (fds, n; NULL, 0 for none), or librabbitmq holds data or
 * frames already (read by an RPC, or left by a capped drain), for which the socket will not say. A readable
 * socket updates *last_rx: heartbeats are read without being handed out. */
bool wire_want_read(amqp_connection_state_t st, double *last_rx, const struct pollfd *fds, int n);
/* Nothing at all from the broker for 1.5 heartbeat intervals (RabbitMQ sends one every half interval). */
bool wire_heartbeat_missed(amqp_connection_state_t st, double last_rx, double now);
/* How often a connection needs a read (librabbitmq sends and checks heartbeats while it reads). */
double wire_housekeeping_interval(amqp_connection_state_t st);
/* Before concluding that heartbeats were missed: a socket readable now counts as a sign of life (the loop may
 * have been busy elsewhere for a while). */
void wire_note_readable(amqp_connection_state_t st, double *last_rx, double now);
/* The heartbeat check the transport and the bus make before using their connection (*st, NULL when down): once
 * the broker seems to have missed its heartbeats, what waits in the socket is read first (drain(arg), which may
 * drop the connection and so clear *st; the loop may have been busy elsewhere for a while), and only then is it
 * judged. Returns true when the connection is to be dropped, with why filled. */
bool wire_heartbeat_lost(amqp_connection_state_t *st, double *last_rx, double now, void (*drain)(void *arg), void *arg,
                         char *why, size_t whylen);

#endif
