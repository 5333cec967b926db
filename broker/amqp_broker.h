/* amqp_broker: the RabbitMQ side of broker/ that the rest of the worker sees. The transport itself (struct broker and
 * struct bus over AMQP 0-9-1, librabbitmq) is reached through broker.h and pubsub.h with an endpoint of kind
 * BROKER_AMQP; this header has the URL parser that makes such an endpoint and the blocking producer that pool
 * children publish task messages with (chain links, callbacks, retries: canvas.c). */
#ifndef CELERIAC_AMQP_BROKER_H
#define CELERIAC_AMQP_BROKER_H

#include <stdbool.h>
#include <stddef.h>

#include "broker.h"

/* A parsed amqp:// URL. Strings owned, freed by amqp_url_clear. */
struct amqp_url {
    char *host, *username, *password, *vhost;
    int port;
    bool tls;
    char *ssl_ca_certs, *ssl_certfile, *ssl_keyfile;
    bool ssl_verify;
    int heartbeat;
    int queue_max_priority;
};

/* Whether url names an AMQP broker: amqp://, amqps://, pyamqp:// or librabbitmq:// (Celery's spellings). */
bool amqp_url_is(const char *url);
/* Accepts [py]amqp[s]://[user[:password]@]host[:port][/vhost][?query], as kombu does: user and password default
 * to guest, the port to 5672 (5671 for amqps), the vhost to "/" ("//" and "/%2F" are "/" too); parts are
 * percent-decoded. Query: ssl_ca_certs, ssl_certfile, ssl_keyfile, ssl_cert_reqs (CERT_NONE, CERT_OPTIONAL,
 * CERT_REQUIRED; Celery's broker_use_ssl keys), ssl=true (TLS on an amqp:// URL), heartbeat (seconds, default
 * 60; 0 disables) and queue_max_priority (x-max-priority for the queues the worker creates, as Celery's
 * task_queue_max_priority). Returns 0, or -1 with one line in err. url borrowed; *out is overwritten and freed
 * by the caller with amqp_url_clear, even on failure. */
int amqp_url_parse(const char *url, struct amqp_url *out, char *err, size_t errlen);
void amqp_url_clear(struct amqp_url *u);
/* Fills ep from u (borrowed: u and display must outlive ep's users). */
void amqp_url_endpoint(const struct amqp_url *u, const char *display, struct broker_endpoint *ep);

/* A blocking connection for publishing kombu envelopes (the JSON that outgoing_encode writes), used in pool
 * children. The queue a message is routed to is declared first, once per producer, the way a stock client
 * declares it before publishing (a message sent to a queue that does not exist would be dropped). */
struct amqp_producer;
/* ep borrowed (must outlive the producer). NULL with err filled when the broker cannot be reached. */
struct amqp_producer *amqp_producer_open(const struct broker_endpoint *ep, char *err, size_t errlen);
/* Publishes the envelope (borrowed) to its delivery_info exchange and routing key, with publisher confirms:
 * returns 0 once the broker has taken it, or -1 with err filled (the producer is then unusable: close it). */
int amqp_producer_publish(struct amqp_producer *p, const char *envelope, size_t len, char *err, size_t errlen);
void amqp_producer_close(struct amqp_producer *p); /* NULL ok */

#endif
