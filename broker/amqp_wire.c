/* amqp_wire: see amqp_wire.h (and amqp_broker.h for the URL parser and the producer, which live here too). Runs in
 * the main process (transport, bus) and in pool children (producer), each on its own connections. */
#include "amqp_wire.h"

#include <amqp_ssl_socket.h>
#include <amqp_tcp_socket.h>
#include <ctype.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/time.h>

#include "amqp_broker.h"

/* ------------------------------------------------------------------ base64 (kombu's body_encoding) */

static const char b64chars[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

static char *b64_encode(const unsigned char *src, size_t n, size_t *outlen)
{
    char *out = malloc(4 * ((n + 2) / 3) + 1), *p = out;
    if (!out)
        abort();
    size_t i = 0;
    for (; i + 2 < n; i += 3) {
        uint32_t v = (uint32_t)src[i] << 16 | (uint32_t)src[i + 1] << 8 | src[i + 2];
        *p++ = b64chars[v >> 18];
        *p++ = b64chars[(v >> 12) & 63];
        *p++ = b64chars[(v >> 6) & 63];
        *p++ = b64chars[v & 63];
    }
    if (i < n) {
        uint32_t v = (uint32_t)src[i] << 16 | (i + 1 < n ? (uint32_t)src[i + 1] << 8 : 0);
        *p++ = b64chars[v >> 18];
        *p++ = b64chars[(v >> 12) & 63];
        *p++ = i + 1 < n ? b64chars[(v >> 6) & 63] : '=';
        *p++ = '=';
    }
    *p = '\0';
    *outlen = (size_t)(p - out);
    return out;
}

static int b64_value(unsigned char c)
{
    const char *p = c ? strchr(b64chars, c) : NULL;
    return p ? (int)(p - b64chars) : -1;
}

/* Decodes into a malloc'd buffer (caller frees); NULL when src is not base64. Whitespace is not allowed, as
 * kombu never writes any. */
static unsigned char *b64_decode(const char *src, size_t n, size_t *outlen)
{
    while (n && src[n - 1] == '=')
        n--;
    unsigned char *out = malloc(n * 3 / 4 + 3), *p = out;
    if (!out)
        abort();
    uint32_t acc = 0;
    int bits = 0;
    for (size_t i = 0; i < n; i++) {
        int v = b64_value((unsigned char)src[i]);
        if (v < 0) {
            free(out);
            return NULL;
        }
        acc = acc << 6 | (uint32_t)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            *p++ = (unsigned char)(acc >> bits);
        }
    }
    *outlen = (size_t)(p - out);
    return out;
}

/* ------------------------------------------------------------------ connections */

static void tv_from_ms(struct timeval *tv, int ms)
{
    tv->tv_sec = ms / 1000;
    tv->tv_usec = (ms % 1000) * 1000;
}

void wire_reply_str(amqp_rpc_reply_t r, char *err, size_t errlen)
{
    switch (r.reply_type) {
    case AMQP_RESPONSE_NORMAL: snprintf(err, errlen, "%s", ""); break;
    case AMQP_RESPONSE_NONE: snprintf(err, errlen, "no reply from the broker"); break;
    case AMQP_RESPONSE_LIBRARY_EXCEPTION: snprintf(err, errlen, "%s", amqp_error_string2(r.library_error)); break;
    case AMQP_RESPONSE_SERVER_EXCEPTION:
        if (r.reply.id == AMQP_CONNECTION_CLOSE_METHOD) {
            const amqp_connection_close_t *m = r.reply.decoded;
            snprintf(err, errlen, "connection closed by the broker: %u %.*s", m->reply_code, (int)m->reply_text.len,
                     (const char *)m->reply_text.bytes);
        } else if (r.reply.id == AMQP_CHANNEL_CLOSE_METHOD) {
            const amqp_channel_close_t *m = r.reply.decoded;
            snprintf(err, errlen, "channel closed by the broker: %u %.*s", m->reply_code, (int)m->reply_text.len,
                     (const char *)m->reply_text.bytes);
        } else {
            snprintf(err, errlen, "unexpected method 0x%08x from the broker", r.reply.id);
        }
        break;
    }
}

static int rpc_ok(amqp_connection_state_t st, const char *what, char *err, size_t errlen)
{
    amqp_rpc_reply_t r = amqp_get_rpc_reply(st);
    if (r.reply_type == AMQP_RESPONSE_NORMAL)
        return 0;
    char why[256];
    wire_reply_str(r, why, sizeof why);
    snprintf(err, errlen, "%s: %s", what, why);
    return -1;
}

amqp_connection_state_t wire_open(const struct broker_endpoint *ep, const char *name, int timeout_ms, char *err,
                                  size_t errlen)
{
    amqp_connection_state_t st = amqp_new_connection();
    if (!st)
        abort();
    amqp_socket_t *sock = ep->tls ? amqp_ssl_socket_new(st) : amqp_tcp_socket_new(st);
    if (!sock) {
        snprintf(err, errlen, "cannot create a%s socket", ep->tls ? " TLS" : "");
        goto fail;
    }
    if (ep->tls) {
        amqp_ssl_socket_set_verify_peer(sock, ep->ssl_verify);
        amqp_ssl_socket_set_verify_hostname(sock, ep->ssl_verify);
        if (ep->ssl_ca_certs && amqp_ssl_socket_set_cacert(sock, ep->ssl_ca_certs) != AMQP_STATUS_OK) {
            snprintf(err, errlen, "cannot load ssl_ca_certs %s", ep->ssl_ca_certs);
            goto fail;
        }
        if (ep->ssl_certfile &&
            amqp_ssl_socket_set_key(sock, ep->ssl_certfile, ep->ssl_keyfile ? ep->ssl_keyfile : ep->ssl_certfile) !=
                AMQP_STATUS_OK) {
            snprintf(err, errlen, "cannot load ssl_certfile %s / ssl_keyfile %s", ep->ssl_certfile,
                     ep->ssl_keyfile ? ep->ssl_keyfile : ep->ssl_certfile);
            goto fail;
        }
    }
    struct timeval tv;
    tv_from_ms(&tv, timeout_ms);
    int rc = amqp_socket_open_noblock(sock, ep->host, ep->port, &tv);
    if (rc != AMQP_STATUS_OK) {
        snprintf(err, errlen, "cannot connect to %s:%d: %s", ep->host, ep->port, amqp_error_string2(rc));
        goto fail;
    }
    amqp_set_handshake_timeout(st, &tv);
    amqp_set_rpc_timeout(st, &tv);
    amqp_table_entry_t props[3] = {
        {amqp_cstring_bytes("product"), {AMQP_FIELD_KIND_UTF8, {.bytes = amqp_cstring_bytes("celeriac")}}},
        {amqp_cstring_bytes("version"), {AMQP_FIELD_KIND_UTF8, {.bytes = amqp_cstring_bytes(CELERIAC_VERSION)}}},
        {amqp_cstring_bytes("connection_name"), {AMQP_FIELD_KIND_UTF8, {.bytes = amqp_cstring_bytes(name)}}},
    };
    amqp_table_t ptable = {3, props};
    amqp_rpc_reply_t r = amqp_login_with_properties(
        st, ep->vhost ? ep->vhost : "/", 0, AMQP_DEFAULT_FRAME_SIZE, ep->heartbeat, &ptable, AMQP_SASL_METHOD_PLAIN,
        ep->username ? ep->username : "guest", ep->password ? ep->password : "guest");
    if (r.reply_type != AMQP_RESPONSE_NORMAL) {
        char why[256];
        wire_reply_str(r, why, sizeof why);
        snprintf(err, errlen, "login to %s:%d failed: %s", ep->host, ep->port, why);
        goto fail;
    }
    amqp_channel_open(st, WIRE_CH);
    if (rpc_ok(st, "channel.open", err, errlen) < 0)
        goto fail;
    amqp_channel_open(st, WIRE_DECLARE_CH);
    if (rpc_ok(st, "channel.open", err, errlen) < 0)
        goto fail;
    return st;
fail:
    amqp_destroy_connection(st);
    return NULL;
}

void wire_close(amqp_connection_state_t st, bool polite)
{
    if (!st)
        return;
    if (polite) {
        amqp_channel_close(st, WIRE_CH, AMQP_REPLY_SUCCESS);
        amqp_connection_close(st, AMQP_REPLY_SUCCESS);
    }
    amqp_destroy_connection(st);
}

/* After a failed RPC on the declare channel: the broker closed it (404 on a passive declare, 406 on a
 * mismatch); confirm and open it again. Returns 0, or -1 when the connection itself is gone. */
static int reopen_declare_channel(amqp_connection_state_t st, char *err, size_t errlen)
{
    amqp_rpc_reply_t r = amqp_get_rpc_reply(st);
    if (r.reply_type != AMQP_RESPONSE_SERVER_EXCEPTION || r.reply.id != AMQP_CHANNEL_CLOSE_METHOD)
        return -1;
    amqp_channel_close_ok_t ok = {0};
    if (amqp_send_method(st, WIRE_DECLARE_CH, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok) != AMQP_STATUS_OK)
        return -1;
    amqp_channel_open(st, WIRE_DECLARE_CH);
    return rpc_ok(st, "channel.open", err, errlen);
}

int wire_declare_exchange(amqp_connection_state_t st, const char *name, const char *type, bool durable, char *err,
                          size_t errlen)
{
    amqp_exchange_declare(st, WIRE_DECLARE_CH, amqp_cstring_bytes(name), amqp_cstring_bytes(type), 0, durable, 0, 0,
                          amqp_empty_table);
    char what[300];
    snprintf(what, sizeof what, "exchange.declare %s", name);
    if (rpc_ok(st, what, err, errlen) == 0)
        return 0;
    reopen_declare_channel(st, err + strlen(err), errlen - strlen(err));
    return -1;
}

int wire_declare_task_queue(amqp_connection_state_t st, const char *queue, int max_priority, char *err, size_t errlen)
{
    amqp_bytes_t q = amqp_cstring_bytes(queue);
    amqp_queue_declare(st, WIRE_DECLARE_CH, q, 1, 0, 0, 0, amqp_empty_table);
    if (amqp_get_rpc_reply(st).reply_type == AMQP_RESPONSE_NORMAL)
        return 0; /* there already, with whatever arguments its creator chose */
    if (reopen_declare_channel(st, err, errlen) < 0) {
        rpc_ok(st, "queue.declare", err, errlen);
        return -1;
    }
    /* Celery's Queue(name, Exchange(name), routing_key=name) for a queue it is told to consume. */
    if (wire_declare_exchange(st, queue, "direct", true, err, errlen) < 0)
        return -1;
    amqp_table_entry_t prio = {amqp_cstring_bytes("x-max-priority"), {AMQP_FIELD_KIND_I32, {.i32 = max_priority}}};
    amqp_table_t args = {max_priority > 0 ? 1 : 0, &prio};
    amqp_queue_declare(st, WIRE_DECLARE_CH, q, 0, 1, 0, 0, args);
    char what[300];
    snprintf(what, sizeof what, "queue.declare %s", queue);
    if (rpc_ok(st, what, err, errlen) < 0) {
        reopen_declare_channel(st, err + strlen(err), errlen - strlen(err));
        return -1;
    }
    amqp_queue_bind(st, WIRE_DECLARE_CH, q, q, q, amqp_empty_table);
    snprintf(what, sizeof what, "queue.bind %s", queue);
    return rpc_ok(st, what, err, errlen);
}

/* ------------------------------------------------------------------ AMQP tables <-> JSON */

/* Received messages are written as envelope text directly: building a jansson tree and dumping it cost a third of
 * the main process's time when draining (measured with perf). The text is what jansson would have written for
 * the same values: a string that is not UTF-8 becomes null (py-amqp would not have decoded it as a str either),
 * a float that is not finite is left out, as json_real refuses it. */

/* A growing string; p is owned, NUL-terminated once anything was written. */
struct text {
    char *p;
    size_t len, cap;
};

static void text_put(struct text *t, const char *s, size_t n)
{
    if (n >= SIZE_MAX / 4 - t->len)
        abort(); /* no message is this big; also tells the compiler the sum below cannot wrap */
    if (t->len + n + 1 > t->cap) {
        size_t cap = t->cap ? t->cap : 1024;
        while (cap < t->len + n + 1)
            cap *= 2;
        t->p = realloc(t->p, cap);
        if (!t->p)
            abort();
        t->cap = cap;
    }
    memcpy(t->p + t->len, s, n);
    t->len += n;
    t->p[t->len] = '\0';
}

static void text_lit(struct text *t, const char *s)
{
    text_put(t, s, strlen(s));
}

/* Strict UTF-8, as jansson checks it: no overlong forms, no surrogates, nothing above U+10FFFF. */
static bool utf8_valid(const unsigned char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        unsigned char c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t k;
        uint32_t cp;
        if (c >= 0xc2 && c <= 0xdf)
            k = 1, cp = c & 0x1f;
        else if (c >= 0xe0 && c <= 0xef)
            k = 2, cp = c & 0x0f;
        else if (c >= 0xf0 && c <= 0xf4)
            k = 3, cp = c & 0x07;
        else
            return false;
        if (n - i <= k)
            return false;
        for (size_t j = 1; j <= k; j++) {
            if ((s[i + j] & 0xc0) != 0x80)
                return false;
            cp = cp << 6 | (s[i + j] & 0x3f);
        }
        if ((k == 2 && cp < 0x800) || (k == 3 && cp < 0x10000) || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
            return false;
        i += k + 1;
    }
    return true;
}

/* A JSON string, escaped as JSON requires (non-ASCII stays UTF-8, as jansson writes it), or null. */
static void text_str(struct text *t, const char *s, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    if (!utf8_valid((const unsigned char *)s, n)) {
        text_lit(t, "null");
        return;
    }
    text_put(t, "\"", 1);
    size_t run = 0; /* start of the pending run of bytes that need no escaping */
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x20 && c != '"' && c != '\\')
            continue;
        text_put(t, s + run, i - run);
        run = i + 1;
        switch (c) {
        case '"': text_lit(t, "\\\""); break;
        case '\\': text_lit(t, "\\\\"); break;
        case '\n': text_lit(t, "\\n"); break;
        case '\r': text_lit(t, "\\r"); break;
        case '\t': text_lit(t, "\\t"); break;
        case '\b': text_lit(t, "\\b"); break;
        case '\f': text_lit(t, "\\f"); break;
        default: {
            char esc[6] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 15]};
            text_put(t, esc, 6);
        }
        }
    }
    text_put(t, s + run, n - run);
    text_put(t, "\"", 1);
}

static void text_bytes(struct text *t, amqp_bytes_t b)
{
    text_str(t, b.bytes ? b.bytes : "", b.len);
}

static void text_int(struct text *t, long long v)
{
    char num[24];
    text_put(t, num, (size_t)snprintf(num, sizeof num, "%lld", v));
}

/* A float as jansson writes it (17 significant digits, always with a '.' or an exponent, so it reads back as a
 * real). Returns false, writing nothing, when it is not finite. */
static bool text_real(struct text *t, double d)
{
    if (!isfinite(d))
        return false;
    char num[40];
    int n = snprintf(num, sizeof num, "%.17g", d);
    for (char *c = num; *c; c++)
        if (*c == ',')
            *c = '.'; /* a locale's decimal comma */
    if (!strpbrk(num, ".eE"))
        n += snprintf(num + n, sizeof num - (size_t)n, ".0");
    text_put(t, num, (size_t)n);
    return true;
}

static bool text_value(struct text *t, const amqp_field_value_t *v);

static void text_table(struct text *t, const amqp_table_t *tb)
{
    text_put(t, "{", 1);
    bool first = true;
    for (int i = 0; i < tb->num_entries; i++) {
        /* Keys as the tree had them: up to a NUL, at most 255 bytes, and UTF-8 (or the entry is left out). */
        const amqp_bytes_t *k = &tb->entries[i].key;
        size_t klen = k->len > 255 ? 255 : k->len;
        const char *nul = klen ? memchr(k->bytes, '\0', klen) : NULL;
        if (nul)
            klen = (size_t)(nul - (const char *)k->bytes);
        if (!utf8_valid(k->bytes, klen))
            continue;
        size_t mark = t->len;
        if (!first)
            text_put(t, ",", 1);
        text_str(t, klen ? k->bytes : "", klen);
        text_put(t, ":", 1);
        if (text_value(t, &tb->entries[i].value))
            first = false;
        else
            t->len = mark; /* a value jansson would not hold: the entry goes */
    }
    text_put(t, "}", 1);
}

/* Writes one value; false (with the caller to undo what it wrote for the entry) for a float that is not finite. */
static bool text_value(struct text *t, const amqp_field_value_t *v)
{
    switch (v->kind) {
    case AMQP_FIELD_KIND_BOOLEAN: text_lit(t, v->value.boolean ? "true" : "false"); return true;
    case AMQP_FIELD_KIND_I8: text_int(t, v->value.i8); return true;
    case AMQP_FIELD_KIND_U8: text_int(t, v->value.u8); return true;
    case AMQP_FIELD_KIND_I16: text_int(t, v->value.i16); return true;
    case AMQP_FIELD_KIND_U16: text_int(t, v->value.u16); return true;
    case AMQP_FIELD_KIND_I32: text_int(t, v->value.i32); return true;
    case AMQP_FIELD_KIND_U32: text_int(t, v->value.u32); return true;
    case AMQP_FIELD_KIND_I64: text_int(t, v->value.i64); return true;
    case AMQP_FIELD_KIND_U64:
    case AMQP_FIELD_KIND_TIMESTAMP: text_int(t, (long long)v->value.u64); return true;
    case AMQP_FIELD_KIND_F32: return text_real(t, v->value.f32);
    case AMQP_FIELD_KIND_F64: return text_real(t, v->value.f64);
    case AMQP_FIELD_KIND_DECIMAL: {
        double d = v->value.decimal.value;
        for (int i = 0; i < v->value.decimal.decimals; i++)
            d /= 10;
        return text_real(t, d);
    }
    case AMQP_FIELD_KIND_UTF8:
    case AMQP_FIELD_KIND_BYTES: text_bytes(t, v->value.bytes); return true;
    case AMQP_FIELD_KIND_TABLE: text_table(t, &v->value.table); return true;
    case AMQP_FIELD_KIND_ARRAY: {
        text_put(t, "[", 1);
        bool first = true;
        for (int i = 0; i < v->value.array.num_entries; i++) {
            size_t mark = t->len;
            if (!first)
                text_put(t, ",", 1);
            if (text_value(t, &v->value.array.entries[i]))
                first = false;
            else
                t->len = mark;
        }
        text_put(t, "]", 1);
        return true;
    }
    default: text_lit(t, "null"); return true; /* 'V' (None) and anything unknown */
    }
}

static amqp_bytes_t pool_string(amqp_pool_t *pool, const char *s, size_t n)
{
    amqp_bytes_t b = {n, NULL};
    if (n) {
        b.bytes = amqp_pool_alloc(pool, n);
        if (!b.bytes)
            abort();
        memcpy(b.bytes, s, n);
    }
    return b;
}

/* The value py-amqp would write for a JSON value: None as void, ints as 32 or 64 bits, floats as doubles. */
static void json_value(amqp_pool_t *pool, const json_t *j, amqp_field_value_t *v)
{
    switch (json_typeof(j)) {
    case JSON_TRUE:
    case JSON_FALSE:
        v->kind = AMQP_FIELD_KIND_BOOLEAN;
        v->value.boolean = json_is_true(j);
        break;
    case JSON_INTEGER: {
        json_int_t n = json_integer_value(j);
        if (n >= INT32_MIN && n <= INT32_MAX) {
            v->kind = AMQP_FIELD_KIND_I32;
            v->value.i32 = (int32_t)n;
        } else {
            v->kind = AMQP_FIELD_KIND_I64;
            v->value.i64 = n;
        }
        break;
    }
    case JSON_REAL:
        v->kind = AMQP_FIELD_KIND_F64;
        v->value.f64 = json_real_value(j);
        break;
    case JSON_STRING:
        v->kind = AMQP_FIELD_KIND_UTF8;
        v->value.bytes = pool_string(pool, json_string_value(j), json_string_length(j));
        break;
    case JSON_ARRAY: {
        size_t n = json_array_size(j);
        v->kind = AMQP_FIELD_KIND_ARRAY;
        v->value.array.num_entries = (int)n;
        v->value.array.entries = n ? amqp_pool_alloc(pool, n * sizeof(amqp_field_value_t)) : NULL;
        for (size_t i = 0; i < n; i++)
            json_value(pool, json_array_get(j, i), &v->value.array.entries[i]);
        break;
    }
    case JSON_OBJECT: {
        size_t n = json_object_size(j), i = 0;
        v->kind = AMQP_FIELD_KIND_TABLE;
        v->value.table.num_entries = (int)n;
        v->value.table.entries = n ? amqp_pool_alloc(pool, n * sizeof(amqp_table_entry_t)) : NULL;
        const char *k;
        json_t *e;
        json_object_foreach((json_t *)j, k, e)
        {
            v->value.table.entries[i].key = pool_string(pool, k, strlen(k));
            json_value(pool, e, &v->value.table.entries[i].value);
            i++;
        }
        break;
    }
    default: v->kind = AMQP_FIELD_KIND_VOID; break;
    }
}

/* ------------------------------------------------------------------ receiving */

static char *bytes_dup(amqp_bytes_t b)
{
    char *s = malloc(b.len + 1);
    if (!s)
        abort();
    if (b.len)
        memcpy(s, b.bytes, b.len);
    s[b.len] = '\0';
    return s;
}

void wire_incoming_clear(struct wire_incoming *in)
{
    free(in->exchange);
    free(in->routing_key);
    free(in->consumer_tag);
    free(in->correlation_id);
    free(in->body);
    free(in->head);
    *in = (struct wire_incoming){0};
}

static void head_str_prop(struct text *t, const char *key, uint32_t flags, uint32_t flag, amqp_bytes_t b)
{
    if (!(flags & flag))
        return;
    text_lit(t, key);
    text_bytes(t, b);
    text_put(t, ",", 1);
}

int wire_incoming_feed(struct wire_incoming *in, const amqp_frame_t *f)
{
    if (f->frame_type == AMQP_FRAME_METHOD && f->payload.method.id == AMQP_BASIC_DELIVER_METHOD) {
        const amqp_basic_deliver_t *d = f->payload.method.decoded;
        wire_incoming_clear(in);
        in->active = true;
        in->delivery_tag = d->delivery_tag;
        in->redelivered = d->redelivered;
        in->exchange = bytes_dup(d->exchange);
        in->routing_key = bytes_dup(d->routing_key);
        in->consumer_tag = bytes_dup(d->consumer_tag);
        return 0;
    }
    if (!in->active)
        return 0;
    if (f->frame_type == AMQP_FRAME_HEADER) {
        const amqp_basic_properties_t *p = f->payload.properties.decoded;
        in->have_header = true;
        in->body_size = (size_t)f->payload.properties.body_size;
        in->body = malloc(in->body_size + 1);
        if (!in->body)
            abort();
        in->priority = p->_flags & AMQP_BASIC_PRIORITY_FLAG ? p->priority : 0;
        if ((p->_flags & AMQP_BASIC_CORRELATION_ID_FLAG) && utf8_valid(p->correlation_id.bytes, p->correlation_id.len))
            in->correlation_id = bytes_dup(p->correlation_id);
        struct text t = {0};
        text_lit(&t, "{\"content-type\":");
        if (p->_flags & AMQP_BASIC_CONTENT_TYPE_FLAG)
            text_bytes(&t, p->content_type);
        else
            text_lit(&t, "\"application/json\"");
        text_lit(&t, ",\"content-encoding\":");
        if (p->_flags & AMQP_BASIC_CONTENT_ENCODING_FLAG)
            text_bytes(&t, p->content_encoding);
        else
            text_lit(&t, "\"utf-8\"");
        text_lit(&t, ",\"headers\":");
        if (p->_flags & AMQP_BASIC_HEADERS_FLAG)
            text_table(&t, &p->headers);
        else
            text_lit(&t, "{}");
        text_lit(&t, ",\"properties\":{");
        head_str_prop(&t, "\"correlation_id\":", p->_flags, AMQP_BASIC_CORRELATION_ID_FLAG, p->correlation_id);
        head_str_prop(&t, "\"reply_to\":", p->_flags, AMQP_BASIC_REPLY_TO_FLAG, p->reply_to);
        head_str_prop(&t, "\"expiration\":", p->_flags, AMQP_BASIC_EXPIRATION_FLAG, p->expiration);
        if (p->_flags & AMQP_BASIC_DELIVERY_MODE_FLAG) {
            text_lit(&t, "\"delivery_mode\":");
            text_int(&t, p->delivery_mode);
            text_put(&t, ",", 1);
        }
        text_lit(&t, "\"priority\":");
        text_int(&t, in->priority);
        text_lit(&t, ",\"body_encoding\":\"base64\"");
        in->head = t.p;
        in->head_len = t.len;
    } else if (f->frame_type == AMQP_FRAME_BODY && in->have_header) {
        amqp_bytes_t b = f->payload.body_fragment;
        if (b.len > in->body_size - in->body_len)
            b.len = in->body_size - in->body_len; /* a broker never sends more; stay in bounds if one did */
        memcpy(in->body + in->body_len, b.bytes, b.len);
        in->body_len += b.len;
    } else {
        return 0;
    }
    return in->have_header && in->body_len == in->body_size;
}

char *wire_envelope(const struct wire_incoming *in, const char *tag, size_t *len)
{
    if (!in->head)
        return NULL;
    struct text t = {0};
    size_t blen;
    char *b64 = b64_encode((const unsigned char *)in->body, in->body_len, &blen);
    text_put(&t, in->head, in->head_len);
    text_lit(&t, ",\"delivery_info\":{\"exchange\":");
    text_str(&t, in->exchange, strlen(in->exchange));
    text_lit(&t, ",\"routing_key\":");
    text_str(&t, in->routing_key, strlen(in->routing_key));
    text_lit(&t, in->redelivered ? ",\"redelivered\":true},\"delivery_tag\":" : ",\"redelivered\":false},\"delivery_tag\":");
    text_str(&t, tag, strlen(tag));
    text_lit(&t, "},\"body\":\"");
    text_put(&t, b64, blen);
    text_lit(&t, "\"}");
    free(b64);
    *len = t.len;
    return t.p;
}

/* ------------------------------------------------------------------ publishing */

static amqp_bytes_t str_bytes(const json_t *o, const char *key, bool *found)
{
    const char *s = json_string_value(json_object_get(o, key));
    *found = s != NULL;
    return s ? amqp_cstring_bytes(s) : amqp_empty_bytes;
}

/* The envelope's expiration as the broker accepts it (a count of milliseconds), cut to max_ttl_ms when that is
 * >= 0, written into buf; NULL when there is none to send. */
static const char *ttl_property(const json_t *props, long long max_ttl_ms, char *buf, size_t buflen)
{
    const char *s = json_string_value(json_object_get(props, "expiration"));
    if (!s || !*s || strspn(s, "0123456789") != strlen(s) || strlen(s) > 18)
        return NULL;
    long long ttl = strtoll(s, NULL, 10);
    if (max_ttl_ms >= 0 && ttl > max_ttl_ms)
        ttl = max_ttl_ms;
    snprintf(buf, buflen, "%lld", ttl);
    return buf;
}

int wire_publish_envelope(amqp_connection_state_t st, const char *exchange, const char *routing_key, const char *data,
                          size_t len, long long max_ttl_ms, char *err, size_t errlen)
{
    int rc = -1;
    unsigned char *body = NULL;
    size_t body_len = 0;
    amqp_pool_t pool;
    init_amqp_pool(&pool, 4096);
    json_t *env = json_loadb(data, len, 0, NULL);
    const json_t *props = json_object_get(env, "properties");
    const json_t *info = json_object_get(props, "delivery_info");
    const char *b = json_string_value(json_object_get(env, "body"));
    if (!b) {
        snprintf(err, errlen, "not a kombu envelope (no body)");
        goto out;
    }
    const char *enc = json_string_value(json_object_get(props, "body_encoding"));
    if (enc && strcmp(enc, "base64") == 0) {
        body = b64_decode(b, json_string_length(json_object_get(env, "body")), &body_len);
        if (!body) {
            snprintf(err, errlen, "the envelope's body is not base64");
            goto out;
        }
    } else {
        body_len = json_string_length(json_object_get(env, "body"));
        body = malloc(body_len + 1);
        if (!body)
            abort();
        memcpy(body, b, body_len);
    }
    if (!exchange)
        exchange = json_string_value(json_object_get(info, "exchange"));
    if (!routing_key)
        routing_key = json_string_value(json_object_get(info, "routing_key"));
    amqp_basic_properties_t p = {0};
    bool found;
    p.content_type = str_bytes(env, "content-type", &found);
    p._flags |= found ? AMQP_BASIC_CONTENT_TYPE_FLAG : 0;
    p.content_encoding = str_bytes(env, "content-encoding", &found);
    p._flags |= found ? AMQP_BASIC_CONTENT_ENCODING_FLAG : 0;
    p.correlation_id = str_bytes(props, "correlation_id", &found);
    p._flags |= found ? AMQP_BASIC_CORRELATION_ID_FLAG : 0;
    p.reply_to = str_bytes(props, "reply_to", &found);
    p._flags |= found && p.reply_to.len ? AMQP_BASIC_REPLY_TO_FLAG : 0;
    char ttl_buf[24];
    const char *ttl = ttl_property(props, max_ttl_ms, ttl_buf, sizeof ttl_buf);
    if (ttl) {
        p.expiration = amqp_cstring_bytes(ttl);
        p._flags |= AMQP_BASIC_EXPIRATION_FLAG;
    }
    const json_t *dm = json_object_get(props, "delivery_mode");
    p.delivery_mode = json_is_integer(dm) ? (uint8_t)json_integer_value(dm) : 2;
    p._flags |= AMQP_BASIC_DELIVERY_MODE_FLAG;
    const json_t *prio = json_object_get(props, "priority");
    if (json_is_integer(prio)) {
        json_int_t v = json_integer_value(prio);
        p.priority = (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v);
        p._flags |= AMQP_BASIC_PRIORITY_FLAG;
    }
    const json_t *headers = json_object_get(env, "headers");
    if (json_is_object(headers)) {
        amqp_field_value_t v;
        json_value(&pool, headers, &v);
        p.headers = v.value.table;
        p._flags |= AMQP_BASIC_HEADERS_FLAG;
    }
    int st_rc = amqp_basic_publish(st, WIRE_CH, amqp_cstring_bytes(exchange ? exchange : ""),
                                   amqp_cstring_bytes(routing_key ? routing_key : ""), 0, 0, &p,
                                   (amqp_bytes_t){body_len, body});
    if (st_rc != AMQP_STATUS_OK) {
        snprintf(err, errlen, "basic.publish: %s", amqp_error_string2(st_rc));
        rc = -2;
        goto out;
    }
    rc = 0;
out:
    free(body);
    json_decref(env);
    empty_amqp_pool(&pool);
    return rc;
}

/* ------------------------------------------------------------------ URLs */

bool amqp_url_is(const char *url)
{
    static const char *const schemes[] = {"amqp://", "amqps://", "pyamqp://", "librabbitmq://"};
    for (size_t i = 0; i < sizeof schemes / sizeof *schemes; i++)
        if (strncasecmp(url, schemes[i], strlen(schemes[i])) == 0)
            return true;
    return false;
}

/* Percent-decodes s[0..n) into a new string. NULL on a bad escape. */
static char *pct_decode(const char *s, size_t n)
{
    char *out = malloc(n + 1), *p = out;
    if (!out)
        abort();
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '%') {
            if (i + 2 >= n + 0 || !isxdigit((unsigned char)s[i + 1]) || !isxdigit((unsigned char)s[i + 2])) {
                free(out);
                return NULL;
            }
            char hex[3] = {s[i + 1], s[i + 2], 0};
            *p++ = (char)strtol(hex, NULL, 16);
            i += 2;
        } else {
            *p++ = s[i];
        }
    }
    *p = '\0';
    return out;
}

void amqp_url_clear(struct amqp_url *u)
{
    free(u->host);
    free(u->username);
    free(u->password);
    free(u->vhost);
    free(u->ssl_ca_certs);
    free(u->ssl_certfile);
    free(u->ssl_keyfile);
    *u = (struct amqp_url){0};
}

static int parse_int(const char *s, int lo, int hi, int *out)
{
    char *end;
    long v = strtol(s, &end, 10);
    if (!*s || *end || v < lo || v > hi)
        return -1;
    *out = (int)v;
    return 0;
}

static int parse_query(struct amqp_url *u, const char *q, char *why, size_t whylen)
{
    bool verify_set = false;
    while (*q) {
        size_t n = strcspn(q, "&");
        const char *eq = memchr(q, '=', n);
        if (!eq) {
            snprintf(why, whylen, "query parameter '%.*s' has no value", (int)n, q);
            return -1;
        }
        char key[64];
        snprintf(key, sizeof key, "%.*s", (int)(eq - q), q);
        char *val = pct_decode(eq + 1, (size_t)(q + n - eq - 1));
        if (!val) {
            snprintf(why, whylen, "bad percent escape in %s", key);
            return -1;
        }
        int rc = 0;
        if (strcmp(key, "ssl_ca_certs") == 0) {
            free(u->ssl_ca_certs);
            u->ssl_ca_certs = val, val = NULL;
        } else if (strcmp(key, "ssl_certfile") == 0) {
            free(u->ssl_certfile);
            u->ssl_certfile = val, val = NULL;
        } else if (strcmp(key, "ssl_keyfile") == 0) {
            free(u->ssl_keyfile);
            u->ssl_keyfile = val, val = NULL;
        } else if (strcmp(key, "ssl_cert_reqs") == 0) {
            verify_set = true;
            if (strcasecmp(val, "CERT_NONE") == 0 || strcmp(val, "0") == 0)
                u->ssl_verify = false;
            else if (strcasecmp(val, "CERT_REQUIRED") == 0 || strcasecmp(val, "CERT_OPTIONAL") == 0 ||
                     strcmp(val, "1") == 0 || strcmp(val, "2") == 0)
                u->ssl_verify = true;
            else
                rc = -1;
        } else if (strcmp(key, "ssl") == 0) {
            u->tls = strcasecmp(val, "true") == 0 || strcmp(val, "1") == 0;
        } else if (strcmp(key, "heartbeat") == 0) {
            rc = parse_int(val, 0, 65535, &u->heartbeat);
        } else if (strcmp(key, "queue_max_priority") == 0) {
            rc = parse_int(val, 0, 255, &u->queue_max_priority);
        } else {
            snprintf(why, whylen,
                     "unknown query parameter '%s' (known: ssl_ca_certs, ssl_certfile, ssl_keyfile, "
                     "ssl_cert_reqs, ssl, heartbeat, queue_max_priority)",
                     key);
            free(val);
            return -1;
        }
        if (rc < 0) {
            snprintf(why, whylen, "bad value for %s: '%s'", key, val);
            free(val);
            return -1;
        }
        free(val);
        q += n;
        if (*q == '&')
            q++;
    }
    if (!verify_set)
        u->ssl_verify = u->ssl_ca_certs != NULL; /* Python's ssl default: verify when given a CA to verify with */
    return 0;
}

int amqp_url_parse(const char *url, struct amqp_url *out, char *err, size_t errlen)
{
    *out = (struct amqp_url){0};
    char why[300] = "";
    const char *sep = strstr(url, "://");
    if (!amqp_url_is(url) || !sep) {
        snprintf(why, sizeof why, "expected amqp://, amqps:// or pyamqp://");
        goto fail;
    }
    out->tls = strncasecmp(url, "amqps://", 8) == 0;
    out->heartbeat = 60;
    const char *p = sep + 3;
    const char *end = p + strcspn(p, "/?#");
    const char *at = NULL;
    for (const char *s = p; s < end; s++)
        if (*s == '@')
            at = s; /* the last one: a password may hold an escaped or even a bare '@' */
    const char *hostpart = p;
    if (at) {
        const char *colon = memchr(p, ':', (size_t)(at - p));
        out->username = pct_decode(p, (size_t)((colon ? colon : at) - p));
        out->password = colon ? pct_decode(colon + 1, (size_t)(at - colon - 1)) : NULL;
        if (!out->username || (colon && !out->password)) {
            snprintf(why, sizeof why, "bad percent escape in the user or password");
            goto fail;
        }
        hostpart = at + 1;
    }
    const char *portsep = NULL;
    if (*hostpart == '[') {
        const char *close = memchr(hostpart, ']', (size_t)(end - hostpart));
        if (!close) {
            snprintf(why, sizeof why, "unterminated [IPv6 address]");
            goto fail;
        }
        out->host = pct_decode(hostpart + 1, (size_t)(close - hostpart - 1));
        portsep = close + 1 < end && close[1] == ':' ? close + 1 : NULL;
    } else {
        portsep = memchr(hostpart, ':', (size_t)(end - hostpart));
        out->host = pct_decode(hostpart, (size_t)((portsep ? portsep : end) - hostpart));
    }
    if (!out->host) {
        snprintf(why, sizeof why, "bad percent escape in the host");
        goto fail;
    }
    if (!*out->host) {
        free(out->host);
        out->host = strdup("localhost");
    }
    out->port = out->tls ? 5671 : 5672;
    if (portsep) {
        char port[16];
        snprintf(port, sizeof port, "%.*s", (int)(end - portsep - 1), portsep + 1);
        if (parse_int(port, 1, 65535, &out->port) < 0) {
            snprintf(why, sizeof why, "port is not a number from 1 to 65535");
            goto fail;
        }
    }
    const char *path = end, *query = NULL;
    size_t plen = strcspn(path, "?#");
    if (path[plen] == '?')
        query = path + plen + 1;
    /* kombu: the path minus its leading '/' is the vhost; empty means "/" (so "//" is "/" too). */
    const char *vh = plen ? path + 1 : path;
    size_t vlen = plen ? plen - 1 : 0;
    out->vhost = vlen ? pct_decode(vh, vlen) : strdup("/");
    if (!out->vhost) {
        snprintf(why, sizeof why, "bad percent escape in the virtual host");
        goto fail;
    }
    if (query) {
        char *q = strndup(query, strcspn(query, "#"));
        int rc = parse_query(out, q, why, sizeof why);
        free(q);
        if (rc < 0)
            goto fail;
    } else {
        out->ssl_verify = false;
    }
    return 0;
fail:;
    /* The URL echoed with its password masked, like the Redis URL errors. */
    const char *m1 = sep ? strchr(sep + 3, ':') : NULL, *m2 = strrchr(url, '@');
    if (m1 && m2 && m1 < m2)
        snprintf(err, errlen, "invalid AMQP URL '%.*s:**%s': %s", (int)(m1 - url), url, m2, why);
    else
        snprintf(err, errlen, "invalid AMQP URL '%s': %s", url, why);
    amqp_url_clear(out);
    return -1;
}

void amqp_url_endpoint(const struct amqp_url *u, const char *display, struct broker_endpoint *ep)
{
    *ep = (struct broker_endpoint){0};
    ep->kind = BROKER_AMQP;
    ep->host = u->host;
    ep->port = u->port;
    ep->username = u->username;
    ep->password = u->password;
    ep->display = display;
    ep->vhost = u->vhost;
    ep->tls = u->tls;
    ep->ssl_ca_certs = u->ssl_ca_certs;
    ep->ssl_certfile = u->ssl_certfile;
    ep->ssl_keyfile = u->ssl_keyfile;
    ep->ssl_verify = u->ssl_verify;
    ep->heartbeat = u->heartbeat;
    ep->queue_max_priority = u->queue_max_priority;
}

/* ------------------------------------------------------------------ the producer (pool children) */

#define PRODUCER_DECLARED_MAX 64
#define PRODUCER_CONFIRM_MS 10000

struct amqp_producer {
    const struct broker_endpoint *ep; /* borrowed */
    amqp_connection_state_t st;
    uint64_t published;                    /* publishes on this channel: the confirm sequence numbers */
    char *declared[PRODUCER_DECLARED_MAX]; /* owned: queues declared already */
    size_t ndeclared;
};

struct amqp_producer *amqp_producer_open(const struct broker_endpoint *ep, char *err, size_t errlen)
{
    /* No heartbeat: a child only talks when it publishes, and cannot answer the broker's heartbeats between. */
    struct broker_endpoint quiet = *ep;
    quiet.heartbeat = 0;
    amqp_connection_state_t st = wire_open(&quiet, "celeriac producer", 5000, err, errlen);
    if (!st)
        return NULL;
    amqp_confirm_select(st, WIRE_CH);
    if (rpc_ok(st, "confirm.select", err, errlen) < 0) {
        wire_close(st, false);
        return NULL;
    }
    struct amqp_producer *p = calloc(1, sizeof *p);
    if (!p)
        abort();
    p->ep = ep;
    p->st = st;
    return p;
}

void amqp_producer_close(struct amqp_producer *p)
{
    if (!p)
        return;
    wire_close(p->st, true);
    for (size_t i = 0; i < p->ndeclared; i++)
        free(p->declared[i]);
    free(p);
}

static int producer_ensure_queue(struct amqp_producer *p, const char *queue, char *err, size_t errlen)
{
    for (size_t i = 0; i < p->ndeclared; i++)
        if (strcmp(p->declared[i], queue) == 0)
            return 0;
    if (wire_declare_task_queue(p->st, queue, p->ep->queue_max_priority, err, errlen) < 0)
        return -1;
    if (p->ndeclared < PRODUCER_DECLARED_MAX)
        p->declared[p->ndeclared++] = strdup(queue);
    return 0;
}

/* Waits for the broker's basic.ack of everything published so far. */
static int producer_wait_confirm(struct amqp_producer *p, char *err, size_t errlen)
{
    struct timeval tv;
    tv_from_ms(&tv, PRODUCER_CONFIRM_MS);
    for (;;) {
        amqp_frame_t f;
        int rc = amqp_simple_wait_frame_noblock(p->st, &f, &tv);
        if (rc != AMQP_STATUS_OK) {
            snprintf(err, errlen, "waiting for the publish confirm: %s", amqp_error_string2(rc));
            return -1;
        }
        if (f.frame_type != AMQP_FRAME_METHOD)
            continue;
        amqp_method_number_t id = f.payload.method.id;
        if (id == AMQP_BASIC_ACK_METHOD) {
            const amqp_basic_ack_t *a = f.payload.method.decoded;
            if (a->delivery_tag == p->published || (a->multiple && a->delivery_tag >= p->published))
                return 0;
        } else if (id == AMQP_BASIC_NACK_METHOD) {
            snprintf(err, errlen, "the broker refused the message (basic.nack)");
            return -1;
        } else if (id == AMQP_CHANNEL_CLOSE_METHOD || id == AMQP_CONNECTION_CLOSE_METHOD) {
            snprintf(err, errlen, "the broker closed the %s",
                     id == AMQP_CHANNEL_CLOSE_METHOD ? "channel" : "connection");
            return -1;
        }
    }
}

int amqp_producer_publish(struct amqp_producer *p, const char *envelope, size_t len, char *err, size_t errlen)
{
    json_t *env = json_loadb(envelope, len, 0, NULL);
    const json_t *info = json_object_get(json_object_get(env, "properties"), "delivery_info");
    const char *exchange = json_string_value(json_object_get(info, "exchange"));
    const char *rk = json_string_value(json_object_get(info, "routing_key"));
    int rc = 0;
    if (rk && (!exchange || !*exchange))
        rc = producer_ensure_queue(p, rk, err, errlen);
    json_decref(env);
    if (rc < 0)
        return -1;
    if (wire_publish_envelope(p->st, NULL, NULL, envelope, len, -1, err, errlen) < 0)
        return -1;
    p->published++;
    return producer_wait_confirm(p, err, errlen);
}

double wire_now(void)
{
    struct timeval tv;
    gettimeofday(&tv, NULL);
    return (double)tv.tv_sec + tv.tv_usec / 1e6;
}

bool wire_want_read(amqp_connection_state_t st, double *last_rx, const struct pollfd *fds, int n)
{
    if (!st)
        return false;
    if (amqp_data_in_buffer(st) || amqp_frames_enqueued(st))
        return true;
    int fd = amqp_get_sockfd(st);
    for (int i = 0; i < n; i++) {
        if (fds[i].fd == fd && fds[i].revents) {
            *last_rx = wire_now();
            return true;
        }
    }
    return false;
}

bool wire_heartbeat_missed(amqp_connection_state_t st, double last_rx, double now)
{
    int hb = st ? amqp_get_heartbeat(st) : 0;
    return hb > 0 && now - last_rx > 1.5 * hb;
}

double wire_housekeeping_interval(amqp_connection_state_t st)
{
    int hb = amqp_get_heartbeat(st);
    return hb > 0 && hb < 2 ? hb / 2.0 : 1.0;
}

bool wire_heartbeat_lost(amqp_connection_state_t *st, double *last_rx, double now, void (*drain)(void *arg), void *arg,
                         char *why, size_t whylen)
{
    if (!*st || !wire_heartbeat_missed(*st, *last_rx, now))
        return false;
    wire_note_readable(*st, last_rx, now);
    drain(arg);
    if (!*st || !wire_heartbeat_missed(*st, *last_rx, wire_now()))
        return false;
    snprintf(why, whylen, "missed heartbeats: nothing from the broker for %.1f s", wire_now() - *last_rx);
    return true;
}

void wire_note_readable(amqp_connection_state_t st, double *last_rx, double now)
{
    struct pollfd pfd = {amqp_get_sockfd(st), POLLIN, 0};
    if (poll(&pfd, 1, 0) > 0)
        *last_rx = now;
}
