/* Unit tests for worker/control.c (pidbox and event envelopes), worker/revoked.c (the bounded, expiring
 * revoked set) and worker/metrics.c (Prometheus text). The envelopes are checked by decoding them as kombu
 * does: JSON, then the base64 body. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "control.h"
#include "metrics.h"
#include "revoked.h"

/* A pidbox request as kombu's Mailbox publishes it on Redis. body: the JSON text of the request body. */
static char *request_envelope(const char *body)
{
    size_t len = strlen(body);
    char *b64 = malloc(4 * ((len + 2) / 3) + 1);
    base64_encode((const unsigned char *)body, len, b64);
    json_t *env = json_pack("{s:s, s:s, s:s, s:{s:i, s:f}, s:{s:s}}", "body", b64, "content-encoding", "utf-8",
                            "content-type", "application/json", "headers", "clock", 41, "expires", 1e10,
                            "properties", "body_encoding", "base64");
    char *text = json_dumps(env, JSON_COMPACT);
    json_decref(env);
    free(b64);
    return text;
}

static int decode(const char *body, const char *node, struct control_request *req)
{
    char *env = request_envelope(body);
    int rc = control_decode(env, strlen(env), node, req);
    free(env);
    return rc;
}

static void test_decode_and_addressing(void **state)
{
    (void)state;
    struct control_request req;
    assert_int_equal(decode("{\"method\": \"ping\", \"arguments\": {}, \"destination\": [\"w1@h\"], \"pattern\": null,"
                            " \"matcher\": null, \"ticket\": \"t-1\", \"reply_to\": {\"exchange\": "
                            "\"reply.celery.pidbox\", \"routing_key\": \"oid-1\"}}",
                            "w1@h", &req),
                     1);
    assert_string_equal(req.method, "ping");
    assert_string_equal(req.ticket, "t-1");
    assert_string_equal(req.reply_key, "oid-1");
    assert_int_equal(req.clock, 41);
    control_request_clear(&req);
    /* Another node's destination; a glob that does not match; one that does; no reply_to. */
    assert_int_equal(decode("{\"method\": \"ping\", \"destination\": [\"w2@h\"]}", "w1@h", &req), 0);
    assert_int_equal(decode("{\"method\": \"ping\", \"pattern\": \"x*\", \"matcher\": \"glob\"}", "w1@h", &req), 0);
    assert_int_equal(decode("{\"method\": \"revoke\", \"arguments\": {\"task_id\": \"a\"}, \"pattern\": \"w*\", "
                            "\"matcher\": \"glob\"}",
                            "w1@h", &req),
                     1);
    assert_null(req.ticket);
    assert_null(req.reply_key);
    assert_string_equal(json_string_value(json_object_get(req.arguments, "task_id")), "a");
    control_request_clear(&req);
    assert_int_equal(control_decode("not json", 8, "w1@h", &req), -1);
}

/* The body of a kombu envelope, decoded: a new reference. */
static json_t *envelope_body(const struct buf *env, json_t **headers)
{
    json_t *e = json_loadb(env->data, env->len, 0, NULL);
    assert_non_null(e);
    assert_string_equal(json_string_value(json_object_get(json_object_get(e, "properties"), "body_encoding")),
                        "base64");
    const char *b64 = json_string_value(json_object_get(e, "body"));
    unsigned char *raw = malloc(base64_decoded_max(strlen(b64)) + 1);
    long n = base64_decode(b64, strlen(b64), raw);
    assert_true(n >= 0);
    json_t *body = json_loadb((const char *)raw, (size_t)n, 0, NULL);
    free(raw);
    *headers = json_incref(json_object_get(e, "headers"));
    json_decref(e);
    return body;
}

static void test_reply_and_event_envelopes(void **state)
{
    (void)state;
    struct control_request req = {.ticket = "t-9", .reply_key = "oid", .reply_exchange = "reply.celery.pidbox"};
    json_t *value = json_pack("{s:s}", "ok", "pong"), *headers = NULL;
    struct buf env = {0};
    control_reply_envelope(&env, "w1@h", &req, 7, value);
    json_t *body = envelope_body(&env, &headers);
    assert_string_equal(json_string_value(json_object_get(json_object_get(body, "w1@h"), "ok")), "pong");
    assert_string_equal(json_string_value(json_object_get(headers, "ticket")), "t-9");
    assert_int_equal(json_integer_value(json_object_get(headers, "clock")), 7);
    json_decref(body);
    json_decref(headers);
    json_decref(value);
    buf_reset(&env);

    json_t *events = json_pack("[{s:s}]", "type", "task-started");
    control_event_envelope(&env, "w1@h", "task.multi", events);
    body = envelope_body(&env, &headers);
    assert_true(json_equal(body, events));
    assert_string_equal(json_string_value(json_object_get(headers, "hostname")), "w1@h");
    json_decref(body);
    json_decref(headers);
    json_decref(events);
    buf_free(&env);
}

static void test_revoked_set_is_bounded_and_expires(void **state)
{
    (void)state;
    struct revoked *r = revoked_new(3, 100.0);
    assert_true(revoked_add(r, "a", 10));
    assert_false(revoked_add(r, "a", 11)); /* kept with its first time */
    assert_true(revoked_add(r, "b", 20));
    assert_true(revoked_add(r, "c", 30));
    assert_true(revoked_add(r, "d", 40)); /* full: the oldest, a, goes */
    assert_false(revoked_has(r, "a", 50));
    assert_true(revoked_has(r, "b", 50));
    assert_false(revoked_has(r, NULL, 50));
    json_t *list = revoked_list(r, 50), *want = json_pack("[s, s, s]", "b", "c", "d");
    assert_true(json_equal(list, want));
    json_decref(list);
    json_decref(want);
    assert_false(revoked_has(r, "b", 125)); /* 20 + 100 < 125 */
    assert_true(revoked_has(r, "c", 125));
    json_t *map = revoked_map(r, 125);
    assert_int_equal(json_object_size(map), 2);
    assert_true(json_is_real(json_array_get(json_object_get(map, "c"), 0))); /* mingle needs a float */
    json_decref(map);
    revoked_free(r);
}

static void test_metrics_text(void **state)
{
    (void)state;
    struct metrics *m = metrics_new();
    metrics_count(m, "native.add", METRICS_RECEIVED);
    metrics_count(m, "native.add", METRICS_SUCCEEDED);
    metrics_runtime(m, "native.add", 0.003);
    metrics_count(m, "we\"ird", METRICS_FAILED);
    metrics_queue_latency(m, 0.2);
    struct metrics_gauges g = {.pool_busy = 1, .pool_idle = 3, .ready = 1};
    struct buf out = {0};
    metrics_render(m, &g, &out);
    assert_non_null(strstr(out.data, "celeriac_tasks_succeeded_total{task=\"native.add\"} 1\n"));
    assert_non_null(strstr(out.data, "celeriac_tasks_failed_total{task=\"we\\\"ird\"} 1\n"));
    assert_non_null(strstr(out.data, "celeriac_task_runtime_seconds_bucket{task=\"native.add\",le=\"0.001\"} 0\n"));
    assert_non_null(strstr(out.data, "celeriac_task_runtime_seconds_bucket{task=\"native.add\",le=\"0.005\"} 1\n"));
    assert_non_null(strstr(out.data, "celeriac_task_runtime_seconds_bucket{task=\"native.add\",le=\"+Inf\"} 1\n"));
    assert_non_null(strstr(out.data, "celeriac_queue_latency_seconds_count 1\n"));
    assert_non_null(strstr(out.data, "celeriac_pool_processes{state=\"idle\"} 3\n"));
    buf_free(&out);
    metrics_free(m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_decode_and_addressing),
        cmocka_unit_test(test_reply_and_event_envelopes),
        cmocka_unit_test(test_revoked_set_is_bounded_and_expires),
        cmocka_unit_test(test_metrics_text),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
