/* http: a minimal HTTP/1.x server for health checks and metrics (--http-port), run by the main loop.
 *
 * DESIGN. Main process only, non-blocking: the loop polls its sockets like the broker's. GET only, one
 * request per connection (Connection: close), small requests (8 KiB at most), answers built synchronously by
 * the handler. A slow or silent client is dropped after HTTP_IDLE_S; at most HTTP_CONNS at once (the oldest
 * is dropped). Because it is answered from the loop itself, a loop that stops turning stops answering: that
 * is what makes /healthz a liveness check. */
#ifndef CELERIAC_HTTP_H
#define CELERIAC_HTTP_H

#include <poll.h>

#include "buf.h"

struct http_server;

/* Fills body and sets *status (200, 404, 503) and *content_type (a static string) for path (borrowed). */
typedef void (*http_handler_fn)(void *arg, const char *path, struct buf *body, int *status,
                                const char **content_type);

/* Listens on bind_addr:port (IPv4 dotted quad). Returns NULL with err filled. Free with http_close. */
struct http_server *http_open(const char *bind_addr, int port, http_handler_fn fn, void *arg, char *err,
                              size_t errlen);
void http_close(struct http_server *s); /* NULL ok */
int http_pollfds(struct http_server *s, struct pollfd *fds, int max);
/* Accepts, reads, answers, writes. now: epoch seconds (for idle timeouts). */
void http_process(struct http_server *s, const struct pollfd *fds, int n, double now);

#endif
