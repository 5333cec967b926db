/* control: remote control ("pidbox") and event messages as kombu carries them on Redis (protocol doc 8, 9):
 * request envelopes -> requests, and replies / events -> envelopes. Also the pieces of inspect replies that do
 * not depend on the consumer's state (queue dicts, rusage, broker info, request info).
 *
 * Pure apart from getrusage/getloadavg/uuid; main process only. The consumer (consumer.c) decides what each
 * command does. */
#ifndef CELERIAC_CONTROL_H
#define CELERIAC_CONTROL_H

#include <jansson.h>
#include <stdbool.h>

#include "buf.h"
#include "message.h"

struct control_request {
    char *method;       /* owned */
    json_t *arguments;  /* owned (an object, {} when absent) */
    char *ticket;       /* owned; NULL when no reply is expected */
    char *reply_key;    /* owned: reply_to.routing_key; NULL when no reply is expected */
    char *reply_exchange; /* owned: reply_to.exchange */
    long long clock;    /* the sender's Lamport clock (headers.clock), 0 when absent */
};

/* Decodes a message from the pidbox channel (data borrowed). Returns 1 when it is addressed to `node` (the
 * dispatch rule of doc 9.2), 0 when it is for other nodes, -1 when it cannot be read. *out is filled for 1
 * only; the caller frees it with control_request_clear. */
int control_decode(const char *data, size_t len, const char *node, struct control_request *out);
void control_request_clear(struct control_request *r);

/* The reply envelope for kombu's reply queue: body {node: value} (value borrowed; NULL is null), headers
 * {"ticket", "clock"}, appended to out. */
void control_reply_envelope(struct buf *out, const char *node, const struct control_request *req, long long clock,
                            const json_t *value);

/* The event envelope (doc 8.1) for body (an event object, or a list of them for task.multi; borrowed),
 * published with routing key routing_key ("worker.heartbeat", "task.multi"), appended to out. */
void control_event_envelope(struct buf *out, const char *node, const char *routing_key, const json_t *body);

/* kombu Queue.as_dict for a queue consumed the default way (direct exchange named as the queue). New ref. */
json_t *control_queue_dict(const char *name);
/* getrusage(RUSAGE_SELF) in the shape stats' "rusage" has. New reference. */
json_t *control_rusage(void);
/* [1m, 5m, 15m] load averages rounded up to 2 decimals, as Celery's heartbeat has them. New reference. */
json_t *control_loadavg(void);
/* Python's time.timezone // 3600 (or altzone under DST): hours west of UTC, rounded down. */
int control_utcoffset(void);

/* Request info (doc 9.3) for a decoded task message. worker_pid 0 and time_start < 0 give null. New ref. */
json_t *control_request_info(const struct msg_request *req, const char *node, bool acknowledged, int worker_pid,
                             double time_start);

#endif
