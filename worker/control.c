/* control: see control.h. */
#include "control.h"

#include <fnmatch.h>
#include <math.h>
#include <regex.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include "outgoing.h"

static char *dup_str(const json_t *v)
{
    if (!json_is_string(v))
        return NULL;
    char *s = strdup(json_string_value(v));
    if (!s)
        abort();
    return s;
}

void control_request_clear(struct control_request *r)
{
    free(r->method);
    json_decref(r->arguments);
    free(r->ticket);
    free(r->reply_key);
    free(r->reply_exchange);
    memset(r, 0, sizeof *r);
}

static bool node_matches(const json_t *body, const char *node)
{
    const json_t *dest = json_object_get(body, "destination");
    if (json_is_array(dest) && json_array_size(dest)) {
        size_t i;
        const json_t *d;
        json_array_foreach(dest, i, d)
            if (json_is_string(d) && strcmp(json_string_value(d), node) == 0)
                return true;
        return false;
    }
    const char *pattern = json_string_value(json_object_get(body, "pattern"));
    const char *matcher = json_string_value(json_object_get(body, "matcher"));
    if (!pattern || !matcher)
        return true;
    if (strcmp(matcher, "glob") == 0)
        return fnmatch(pattern, node, 0) == 0;
    if (strcmp(matcher, "pcre") == 0) {
        /* Python's re.match: anchored at the start only. POSIX ERE covers the patterns operators write. */
        regex_t re;
        regmatch_t m;
        if (regcomp(&re, pattern, REG_EXTENDED) != 0)
            return false;
        bool ok = regexec(&re, node, 1, &m, 0) == 0 && m.rm_so == 0;
        regfree(&re);
        return ok;
    }
    return false;
}

int control_decode(const char *data, size_t len, const char *node, struct control_request *out)
{
    int rc = -1;
    json_t *env = json_loadb(data, len, 0, NULL), *body = NULL;
    unsigned char *raw = NULL;
    const char *b64 = json_string_value(json_object_get(env, "body"));
    if (!b64)
        goto out;
    const char *enc = json_string_value(json_object_get(json_object_get(env, "properties"), "body_encoding"));
    size_t blen = strlen(b64);
    if (enc && strcmp(enc, "base64") == 0) {
        raw = malloc(base64_decoded_max(blen) + 1);
        if (!raw)
            abort();
        long n = base64_decode(b64, blen, raw);
        if (n < 0)
            goto out;
        body = json_loadb((const char *)raw, (size_t)n, 0, NULL);
    } else {
        body = json_loadb(b64, blen, 0, NULL);
    }
    const char *method = json_string_value(json_object_get(body, "method"));
    if (!method)
        goto out;
    rc = node_matches(body, node) ? 1 : 0;
    if (rc != 1)
        goto out;
    memset(out, 0, sizeof *out);
    out->method = dup_str(json_object_get(body, "method"));
    json_t *args = json_object_get(body, "arguments");
    out->arguments = json_is_object(args) ? json_incref(args) : json_object();
    const json_t *reply_to = json_object_get(body, "reply_to");
    out->ticket = dup_str(json_object_get(body, "ticket"));
    out->reply_key = dup_str(json_object_get(reply_to, "routing_key"));
    out->reply_exchange = dup_str(json_object_get(reply_to, "exchange"));
    const json_t *clock = json_object_get(json_object_get(env, "headers"), "clock");
    out->clock = json_is_integer(clock) ? json_integer_value(clock) : 0;
out:
    free(raw);
    json_decref(body);
    json_decref(env);
    return rc;
}

/* kombu's Redis envelope around a JSON body (base64 encoded, as every kombu producer sends). Steals headers. */
static void envelope(struct buf *out, const json_t *body, json_t *headers, const char *exchange,
                     const char *routing_key)
{
    char *text = json_dumps(body ? body : json_null(), JSON_COMPACT | JSON_ENCODE_ANY);
    if (!text)
        abort();
    size_t tlen = strlen(text);
    char *b64 = malloc(4 * ((tlen + 2) / 3) + 1);
    if (!b64)
        abort();
    base64_encode((const unsigned char *)text, tlen, b64);
    char tag[37];
    outgoing_uuid(tag);
    json_t *env = json_pack("{s:s, s:s, s:s, s:o, s:{s:i, s:{s:s, s:s}, s:i, s:s, s:s}}", "body", b64,
                            "content-encoding", "utf-8", "content-type", "application/json", "headers", headers,
                            "properties", "delivery_mode", 1, "delivery_info", "exchange", exchange, "routing_key",
                            routing_key, "priority", 0, "body_encoding", "base64", "delivery_tag", tag);
    if (!env)
        abort();
    char *s = json_dumps(env, JSON_COMPACT);
    buf_append_str(out, s);
    free(s);
    json_decref(env);
    free(b64);
    free(text);
}

void control_reply_envelope(struct buf *out, const char *node, const struct control_request *req, long long clock,
                            const json_t *value)
{
    json_t *body = json_object();
    json_object_set(body, node, value ? (json_t *)value : json_null());
    envelope(out, body, json_pack("{s:s, s:I}", "ticket", req->ticket ? req->ticket : "", "clock", clock),
             req->reply_exchange ? req->reply_exchange : "reply.celery.pidbox", req->reply_key ? req->reply_key : "");
    json_decref(body);
}

void control_event_envelope(struct buf *out, const char *node, const char *routing_key, const json_t *body)
{
    envelope(out, body, json_pack("{s:s}", "hostname", node), "celeryev", routing_key);
}

json_t *control_queue_dict(const char *name)
{
    return json_pack("{s:s, s:{s:s, s:s, s:n, s:b, s:b, s:b, s:n, s:b}, s:s, s:n, s:n, s:n, s:b, s:b, s:b, s:b, "
                     "s:n, s:o, s:n, s:n, s:n, s:n, s:n, s:n}",
                     "name", name, "exchange", "name", name, "type", "direct", "arguments", "durable", 1, "passive",
                     0, "auto_delete", 0, "delivery_mode", "no_declare", 0, "routing_key", name, "queue_arguments",
                     "binding_arguments", "consumer_arguments", "durable", 1, "exclusive", 0, "auto_delete", 0,
                     "no_ack", 0, "alias", "bindings", json_array(), "no_declare", "expires", "message_ttl",
                     "max_length", "max_length_bytes", "max_priority");
}

static double tv_sec(struct timeval tv)
{
    return (double)tv.tv_sec + tv.tv_usec / 1e6;
}

json_t *control_rusage(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return json_pack("{s:f, s:f, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I}", "utime",
                     tv_sec(ru.ru_utime), "stime", tv_sec(ru.ru_stime), "maxrss", (json_int_t)ru.ru_maxrss, "ixrss",
                     (json_int_t)ru.ru_ixrss, "idrss", (json_int_t)ru.ru_idrss, "isrss", (json_int_t)ru.ru_isrss,
                     "minflt", (json_int_t)ru.ru_minflt, "majflt", (json_int_t)ru.ru_majflt, "nswap",
                     (json_int_t)ru.ru_nswap, "inblock", (json_int_t)ru.ru_inblock, "oublock",
                     (json_int_t)ru.ru_oublock, "msgsnd", (json_int_t)ru.ru_msgsnd, "msgrcv",
                     (json_int_t)ru.ru_msgrcv, "nsignals", (json_int_t)ru.ru_nsignals, "nvcsw",
                     (json_int_t)ru.ru_nvcsw, "nivcsw", (json_int_t)ru.ru_nivcsw);
}

json_t *control_loadavg(void)
{
    double l[3] = {0, 0, 0};
    if (getloadavg(l, 3) < 0)
        l[0] = l[1] = l[2] = 0;
    json_t *a = json_array();
    for (int i = 0; i < 3; i++)
        json_array_append_new(a, json_real(ceil(l[i] * 100.0) / 100.0));
    return a;
}

int control_utcoffset(void)
{
    tzset();
    time_t now = time(NULL);
    struct tm lt;
    localtime_r(&now, &lt);
    long west = lt.tm_isdst > 0 ? timezone - 3600 : timezone; /* altzone: one hour less west under DST */
    return (int)floor((double)west / 3600.0);
}

/* The args and kwargs of a request's body: [args, kwargs, embed] (v2) or {"args", "kwargs"} (v1). */
static void body_args(const struct msg_request *req, json_t **args, json_t **kwargs)
{
    size_t len = 0;
    char *text = msg_body_copy(req, &len);
    json_t *body = text ? json_loadb(text, len, 0, NULL) : NULL;
    free(text);
    json_t *a = NULL, *k = NULL;
    if (json_is_array(body)) {
        a = json_array_get(body, 0);
        k = json_array_get(body, 1);
    } else if (json_is_object(body)) {
        a = json_object_get(body, "args");
        k = json_object_get(body, "kwargs");
    }
    *args = json_is_array(a) ? json_incref(a) : json_array();
    *kwargs = json_is_object(k) ? json_incref(k) : json_object();
    json_decref(body);
}

json_t *control_request_info(const struct msg_request *req, const char *node, bool acknowledged, int worker_pid,
                             double time_start)
{
    json_t *args, *kwargs;
    body_args(req, &args, &kwargs);
    const char *name = req->task.s ? req->task.s : "";
    json_t *info = json_pack("{s:s?, s:s, s:o, s:o, s:s, s:s, s:o, s:b, s:{s:s?, s:s?, s:i, s:b}, s:o}", "id",
                             req->id.s, "name", name, "args", args, "kwargs", kwargs, "type", name, "hostname", node,
                             "time_start", time_start >= 0 ? json_real(time_start) : json_null(), "acknowledged",
                             acknowledged, "delivery_info", "exchange", req->exchange.s ? req->exchange.s : "",
                             "routing_key", req->routing_key.s, "priority", req->priority, "redelivered",
                             req->redelivered, "worker_pid", worker_pid > 0 ? json_integer(worker_pid) : json_null());
    /* Only a string that is not valid UTF-8 makes json_pack fail: show the task without its fields rather
     * than fail the whole reply. */
    return info ? info : json_pack("{s:s, s:[], s:{}}", "name", "<unprintable>", "args", "kwargs");
}
