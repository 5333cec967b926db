/* rconn_read: replies reach their callbacks whole and in order, whether a big bulk string goes past hiredis's
 * reader (read straight into its own buffer) or through it, however the bytes are split across reads. */
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <cmocka.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include "rconn.h"

struct slot {
    redisReply *reply;
};

static void keep(struct rconn *c, redisReply *r, void *arg, bool *steal)
{
    (void)c;
    ((struct slot *)arg)->reply = r;
    *steal = r != NULL;
}

struct pair {
    struct rconn c;
    int peer;
};

static void open_pair(struct pair *p)
{
    int sv[2];
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
    memset(&p->c, 0, sizeof p->c);
    p->c.name = "test";
    p->c.ctx = redisConnectFd(sv[0]);
    p->c.direct_fd = -1; /* as rconn_open sets it */
    assert_non_null(p->c.ctx);
    fcntl(sv[0], F_SETFL, fcntl(sv[0], F_GETFL) | O_NONBLOCK);
    p->peer = sv[1];
    fcntl(sv[1], F_SETFL, fcntl(sv[1], F_GETFL) | O_NONBLOCK);
}

static void close_pair(struct pair *p)
{
    rconn_close(&p->c);
    free(p->c.q);
    close(p->peer);
}

/* Writes data in pieces of `piece` bytes, the first one `first` bytes, reading after each. */
static void feed(struct pair *p, const char *data, size_t len, size_t first, size_t piece)
{
    size_t off = 0;
    while (off < len) {
        size_t n = off == 0 ? first : piece;
        if (n > len - off)
            n = len - off;
        /* The peer is non-blocking: a piece bigger than the socket holds goes in parts, read in between. */
        for (size_t done = 0; done < n;) {
            ssize_t w = write(p->peer, data + off + done, n - done);
            if (w > 0)
                done += (size_t)w;
            assert_int_equal(rconn_read(&p->c), 0);
        }
        off += n;
    }
}

static char *stream_with_big_bulk(size_t big, const char *before, const char *after, size_t *len)
{
    char header[32];
    int h = snprintf(header, sizeof header, "$%zu\r\n", big);
    size_t total = strlen(before) + (size_t)h + big + 2 + strlen(after);
    char *s = malloc(total), *q = s;
    memcpy(q, before, strlen(before));
    q += strlen(before);
    memcpy(q, header, (size_t)h);
    q += h;
    for (size_t i = 0; i < big; i++)
        *q++ = (char)('a' + i % 26);
    memcpy(q, "\r\n", 2);
    q += 2;
    memcpy(q, after, strlen(after));
    *len = total;
    return s;
}

static void assert_big(const redisReply *r, size_t big)
{
    assert_non_null(r);
    assert_int_equal(r->type, REDIS_REPLY_STRING);
    assert_int_equal(r->len, big);
    for (size_t i = 0; i < big; i += 4099)
        assert_int_equal(r->str[i], 'a' + i % 26);
    assert_int_equal(r->str[big - 1], 'a' + (big - 1) % 26);
    assert_int_equal(r->str[big], '\0');
}

static void test_big_bulk_between_replies_any_split(void **state)
{
    (void)state;
    const size_t big = (3u << 19) + 7; /* 1.5 MiB and a bit: read directly */
    size_t len;
    char *s = stream_with_big_bulk(big, "+OK\r\n", ":7\r\n", &len);
    /* Splits: inside the header, right after it, between the payload's CR and LF, in one go. */
    const size_t firsts[] = {5 + 3, 5 + 11, len - 5, len};
    for (size_t k = 0; k < sizeof firsts / sizeof *firsts; k++) {
        struct pair p;
        open_pair(&p);
        struct slot slots[3] = {{0}};
        for (int i = 0; i < 3; i++)
            rconn_command(&p.c, keep, &slots[i], "PING");
        feed(&p, s, len, firsts[k], 65536 + k);
        assert_non_null(slots[0].reply);
        assert_int_equal(slots[0].reply->type, REDIS_REPLY_STATUS);
        assert_big(slots[1].reply, big);
        assert_non_null(slots[2].reply);
        assert_int_equal(slots[2].reply->integer, 7);
        for (int i = 0; i < 3; i++)
            freeReplyObject(slots[i].reply);
        close_pair(&p);
    }
    free(s);
}

static void test_big_bulk_inside_an_array_goes_through_hiredis(void **state)
{
    (void)state;
    const size_t big = (1u << 20) + 3;
    size_t len;
    char *s = stream_with_big_bulk(big, "*2\r\n$3\r\nabc\r\n", "", &len);
    struct pair p;
    open_pair(&p);
    struct slot slot = {0};
    rconn_command(&p.c, keep, &slot, "PING");
    feed(&p, s, 200000, 13, 50000); /* the array's second element starts a read: not at a reply boundary */
    assert_null(p.c.direct);
    feed(&p, s + 200000, len - 200000, 50000, 50000);
    assert_non_null(slot.reply);
    assert_int_equal(slot.reply->type, REDIS_REPLY_ARRAY);
    assert_int_equal(slot.reply->elements, 2);
    assert_string_equal(slot.reply->element[0]->str, "abc");
    assert_big(slot.reply->element[1], big);
    freeReplyObject(slot.reply);
    close_pair(&p);
    free(s);
}

static void test_closing_in_the_middle_of_a_big_bulk(void **state)
{
    (void)state;
    size_t len;
    char *s = stream_with_big_bulk(2u << 20, "+OK\r\n", "", &len);
    struct pair p;
    open_pair(&p);
    struct slot first = {0}, slot = {0};
    rconn_command(&p.c, keep, &first, "PING");
    rconn_command(&p.c, keep, &slot, "PING");
    feed(&p, s, 5, 5, 5); /* "+OK\r\n" alone, as the one reply a BLMOVE connection has in flight */
    assert_non_null(first.reply);
    freeReplyObject(first.reply);
    feed(&p, s + 5, (1u << 20) - 5, 1u << 16, 1u << 16);
    assert_null(slot.reply);
    /* A big bulk that starts a read after a reply hiredis handed out is read past hiredis, into its own
     * buffer (one that starts in the middle of a read stays hiredis's: see the test above). */
    assert_non_null(p.c.direct);
    assert_int_equal(p.c.direct_have, (1u << 20) - 5 - 10); /* after "+OK\r\n" and the header "$2097152\r\n" */
    close_pair(&p); /* the half-read buffer is freed (ASan would say otherwise), the callback gets NULL */
    assert_null(slot.reply);
    free(s);
}

struct taken {
    char *map;
    size_t len;
    int fd;
};

/* As the block connection's callback does: takes the mapping and its memfd. */
static void take_mapping(struct rconn *c, redisReply *r, void *arg, bool *steal)
{
    (void)steal;
    struct taken *t = arg;
    t->map = r->str;
    t->len = r->len;
    r->str = NULL;
    t->fd = c->direct_fd;
    c->direct_fd = -1;
}

static void look_only(struct rconn *c, redisReply *r, void *arg, bool *steal)
{
    (void)c, (void)steal;
    assert_int_equal(r->type, REDIS_REPLY_STRING);
    ++*(int *)arg;
}

static void test_big_bulk_into_a_memfd(void **state)
{
    (void)state;
    const size_t big = (1u << 20) + 11;
    size_t len;
    char *s = stream_with_big_bulk(big, "", ":1\r\n", &len);
    struct pair p;
    open_pair(&p);
    p.c.direct_memfd = true;
    struct taken t = {NULL, 0, -1};
    struct slot after = {0};
    rconn_command(&p.c, take_mapping, &t, "PING");
    rconn_command(&p.c, keep, &after, "PING");
    feed(&p, s, len, 100, 70000);
    assert_non_null(t.map);
    assert_true(t.fd >= 0);
    struct redisReply view = {.type = REDIS_REPLY_STRING, .len = t.len, .str = t.map};
    assert_big(&view, big);
    /* The memfd holds the message itself: what another process maps is what was read. */
    char head[8];
    assert_int_equal(pread(t.fd, head, sizeof head, 0), (ssize_t)sizeof head);
    assert_memory_equal(head, "abcdefgh", sizeof head);
    assert_int_equal(after.reply->integer, 1);
    freeReplyObject(after.reply);
    munmap(t.map, t.len + 2);
    close(t.fd);
    /* A callback that takes nothing: rconn unmaps the buffer and closes the memfd itself. */
    int seen = 0;
    rconn_command(&p.c, look_only, &seen, "PING");
    feed(&p, s, len - 4, 100, 70000);
    assert_int_equal(seen, 1);
    assert_int_equal(p.c.direct_fd, -1);
    close_pair(&p);
    free(s);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_big_bulk_between_replies_any_split),
        cmocka_unit_test(test_big_bulk_inside_an_array_goes_through_hiredis),
        cmocka_unit_test(test_closing_in_the_middle_of_a_big_bulk),
        cmocka_unit_test(test_big_bulk_into_a_memfd),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
