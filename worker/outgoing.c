/* outgoing: see outgoing.h. Field order follows what a Python producer writes, so captures diff cleanly. */
#include "outgoing.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/time.h>

#include "message.h"
#include "result.h"

#define REPR_MAX 1024 /* Celery's argsrepr/kwargsrepr limit */

void outgoing_uuid(char dst[37])
{
    unsigned char b[16];
    size_t got = 0;
    while (got < sizeof b) {
        ssize_t n = getrandom(b + got, sizeof b - got, 0);
        if (n > 0)
            got += (size_t)n;
    }
    b[6] = (unsigned char)((b[6] & 0x0f) | 0x40);
    b[8] = (unsigned char)((b[8] & 0x3f) | 0x80);
    snprintf(dst, 37, "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0], b[1], b[2], b[3],
             b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]);
}

void outgoing_eta(double seconds, char *dst, size_t dstlen)
{
    struct timeval tv;
    gettimeofday(&tv, NULL);
    char iso[32];
    result_isoformat((double)tv.tv_sec + tv.tv_usec / 1e6 + seconds, iso, sizeof iso);
    snprintf(dst, dstlen, "%s+00:00", iso);
}

void outgoing_argsrepr(struct buf *out, const json_t *args)
{
    size_t start = out->len, n = json_is_array(args) ? json_array_size(args) : 0;
    buf_append_char(out, '(');
    for (size_t i = 0; i < n; i++) {
        if (i)
            buf_append_str(out, ", ");
        result_pyrepr(out, json_array_get(args, i), REPR_MAX);
    }
    if (n == 1)
        buf_append_char(out, ',');
    buf_append_char(out, ')');
    if (out->len - start > REPR_MAX)
        out->len = start + REPR_MAX; /* a byte cut; the text is informational only */
    out->data[out->len] = '\0';
}

static json_t *str_or_null(const char *s)
{
    return s ? json_string(s) : json_null();
}

static json_t *copy_or(const json_t *v, json_t *dflt)
{
    if (!v) 
        return dflt;
    json_decref(dflt);
    return json_deep_copy(v);
}

static json_t *limit_or_null(double v)
{
    return v > 0 ? json_real(v) : json_null();
}

int outgoing_encode(struct buf *out, const struct outgoing_task *t)
{
    if (!t->task || !t->id || !t->routing_key)
        return -1;
    int rc = -1;
    char tag[37];
    outgoing_uuid(tag);
    struct buf argsrepr = {0}, kwargsrepr = {0};
    outgoing_argsrepr(&argsrepr, t->args);
    if (t->kwargs)
        result_pyrepr(&kwargsrepr, t->kwargs, REPR_MAX);
    else
        buf_append_str(&kwargsrepr, "{}");

    json_t *embed = json_pack("{s:o, s:o, s:o, s:o}", "callbacks", copy_or(t->callbacks, json_null()), "errbacks",
                              copy_or(t->errbacks, json_null()), "chain", copy_or(t->chain, json_null()), "chord",
                              copy_or(t->chord, json_null()));
    json_t *body = json_pack("[o, o, o]", copy_or(t->args, json_array()), copy_or(t->kwargs, json_object()), embed);
    char *body_text = body ? json_dumps(body, JSON_REAL_PRECISION(17) | JSON_ENCODE_ANY) : NULL;
    json_decref(body);
    if (!body_text)
        goto out;
    size_t body_len = strlen(body_text);
    char *b64 = malloc(4 * ((body_len + 2) / 3) + 1);
    if (!b64)
        abort();
    base64_encode((const unsigned char *)body_text, body_len, b64);
    free(body_text);

    json_t *headers = json_object();
    json_object_set_new(headers, "lang", json_string("c"));
    json_object_set_new(headers, "task", json_string(t->task));
    json_object_set_new(headers, "id", json_string(t->id));
    json_object_set_new(headers, "shadow", json_null());
    json_object_set_new(headers, "eta", str_or_null(t->eta));
    json_object_set_new(headers, "expires", str_or_null(t->expires));
    json_object_set_new(headers, "group", str_or_null(t->group));
    json_object_set_new(headers, "group_index", t->has_group_index ? json_integer(t->group_index) : json_null());
    json_object_set_new(headers, "retries", json_integer(t->retries));
    json_object_set_new(headers, "timelimit",
                        json_pack("[o, o]", limit_or_null(t->time_limit), limit_or_null(t->soft_time_limit)));
    json_object_set_new(headers, "root_id", json_string(t->root_id ? t->root_id : t->id));
    json_object_set_new(headers, "parent_id", str_or_null(t->parent_id));
    json_object_set_new(headers, "argsrepr", json_stringn(argsrepr.data, argsrepr.len));
    json_object_set_new(headers, "kwargsrepr", json_stringn(kwargsrepr.data, kwargsrepr.len));
    json_object_set_new(headers, "origin", str_or_null(t->origin));
    json_object_set_new(headers, "ignore_result", json_boolean(t->ignore_result));

    json_t *msg = json_pack("{s:s, s:s, s:s, s:o, s:{s:s, s:s, s:i, s:{s:s, s:s}, s:i, s:s, s:s}}", "body", b64,
                            "content-encoding", "utf-8", "content-type", "application/json", "headers", headers,
                            "properties", "correlation_id", t->id, "reply_to", t->reply_to ? t->reply_to : "",
                            "delivery_mode", 2, "delivery_info", "exchange", t->exchange ? t->exchange : "",
                            "routing_key", t->routing_key, "priority", t->priority, "body_encoding", "base64",
                            "delivery_tag", tag);
    free(b64);
    char *text = msg ? json_dumps(msg, JSON_REAL_PRECISION(17)) : NULL;
    json_decref(msg);
    if (text) {
        buf_append_str(out, text);
        free(text);
        rc = 0;
    }
out:
    buf_free(&argsrepr);
    buf_free(&kwargsrepr);
    return rc;
}
