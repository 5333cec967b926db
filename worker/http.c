/* http: see http.h. */
#include "http.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#define HTTP_CONNS 16
#define HTTP_IDLE_S 5.0
#define HTTP_REQUEST_MAX 8192

struct http_conn {
    int fd;           /* -1: free slot */
    double since;     /* epoch seconds it was accepted */
    struct buf in;    /* request bytes so far */
    struct buf out;   /* response bytes not yet written */
    size_t out_off;
    bool answered;
};

struct http_server {
    int listen_fd;
    http_handler_fn fn;
    void *arg;
    struct http_conn conns[HTTP_CONNS];
};

static void conn_close(struct http_conn *c)
{
    if (c->fd >= 0)
        close(c->fd);
    c->fd = -1;
    buf_free(&c->in);
    buf_free(&c->out);
    c->out_off = 0;
    c->answered = false;
}

struct http_server *http_open(const char *bind_addr, int port, http_handler_fn fn, void *arg, char *err,
                              size_t errlen)
{
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (port <= 0 || port > 65535 || inet_pton(AF_INET, bind_addr, &sa.sin_addr) != 1) {
        snprintf(err, errlen, "invalid HTTP address %s:%d", bind_addr, port);
        return NULL;
    }
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0 ||
        bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(fd, 64) < 0) {
        snprintf(err, errlen, "cannot listen on %s:%d: %s", bind_addr, port, strerror(errno));
        if (fd >= 0)
            close(fd);
        return NULL;
    }
    struct http_server *s = calloc(1, sizeof *s);
    if (!s)
        abort();
    s->listen_fd = fd;
    s->fn = fn;
    s->arg = arg;
    for (int i = 0; i < HTTP_CONNS; i++)
        s->conns[i].fd = -1;
    return s;
}

void http_close(struct http_server *s)
{
    if (!s)
        return;
    for (int i = 0; i < HTTP_CONNS; i++)
        conn_close(&s->conns[i]);
    close(s->listen_fd);
    free(s);
}

int http_pollfds(struct http_server *s, struct pollfd *fds, int max)
{
    int n = 0;
    if (n < max)
        fds[n++] = (struct pollfd){s->listen_fd, POLLIN, 0};
    for (int i = 0; i < HTTP_CONNS && n < max; i++)
        if (s->conns[i].fd >= 0)
            fds[n++] = (struct pollfd){s->conns[i].fd, s->conns[i].answered ? POLLOUT : POLLIN, 0};
    return n;
}

static void respond(struct http_server *s, struct http_conn *c)
{
    int status = 400;
    const char *ctype = "text/plain; charset=utf-8";
    struct buf body = {0};
    char method[8] = "", path[256] = "";
    /* "GET /path HTTP/1.1": anything else is a 400 (or 405 for another method). */
    if (sscanf(c->in.data, "%7s %255s HTTP/", method, path) == 2 && strcmp(method, "GET") == 0) {
        char *q = strchr(path, '?');
        if (q)
            *q = '\0';
        s->fn(s->arg, path, &body, &status, &ctype);
    } else if (method[0]) {
        status = 405;
        buf_append_str(&body, "only GET\n");
    }
    const char *reason = status == 200 ? "OK" : status == 404 ? "Not Found" : status == 503 ? "Service Unavailable"
                         : status == 405 ? "Method Not Allowed" : "Bad Request";
    buf_printf(&c->out, "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\nConnection: close\r\n\r\n",
               status, reason, ctype, body.len);
    buf_append(&c->out, body.data ? body.data : "", body.len);
    buf_free(&body);
    c->answered = true;
}

static void accept_all(struct http_server *s, double now)
{
    for (;;) {
        int fd = accept4(s->listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0)
            return; /* EAGAIN, or an error on one connection attempt: nothing to keep */
        int slot = 0;
        for (int i = 0; i < HTTP_CONNS; i++) {
            if (s->conns[i].fd < 0) {
                slot = i;
                break;
            }
            if (s->conns[i].since < s->conns[slot].since)
                slot = i;
        }
        conn_close(&s->conns[slot]); /* all busy: the oldest goes */
        s->conns[slot].fd = fd;
        s->conns[slot].since = now;
    }
}

void http_process(struct http_server *s, const struct pollfd *fds, int n, double now)
{
    for (int k = 0; k < n; k++) {
        if (!fds[k].revents)
            continue;
        if (fds[k].fd == s->listen_fd) {
            accept_all(s, now);
            continue;
        }
        for (int i = 0; i < HTTP_CONNS; i++) {
            struct http_conn *c = &s->conns[i];
            if (c->fd != fds[k].fd)
                continue;
            if (!c->answered) {
                char tmp[2048];
                ssize_t r = read(c->fd, tmp, sizeof tmp);
                if (r <= 0) {
                    if (r == 0 || (errno != EAGAIN && errno != EINTR))
                        conn_close(c);
                    break;
                }
                buf_append(&c->in, tmp, (size_t)r);
                if (strstr(c->in.data, "\r\n\r\n") || strstr(c->in.data, "\n\n") || c->in.len > HTTP_REQUEST_MAX)
                    respond(s, c);
            }
            if (c->answered) {
                ssize_t w = send(c->fd, c->out.data + c->out_off, c->out.len - c->out_off, MSG_NOSIGNAL);
                if (w > 0)
                    c->out_off += (size_t)w;
                if ((w < 0 && errno != EAGAIN && errno != EINTR) || c->out_off >= c->out.len)
                    conn_close(c);
            }
            break;
        }
    }
    for (int i = 0; i < HTTP_CONNS; i++)
        if (s->conns[i].fd >= 0 && now - s->conns[i].since > HTTP_IDLE_S)
            conn_close(&s->conns[i]);
}
