/* amqp: the pure parts of the AMQP transport: URL parsing and the conversion of a received message into the
 * kombu envelope the worker decodes. The transport itself runs against a real RabbitMQ node in
 * tests/integration/test_amqp.py. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "amqp_broker.h"
#include "amqp_wire.h"
#include "message.h"

static void test_url_defaults_as_kombu(void **state)
{
    (void)state;
    struct amqp_url u;
    char err[256];
    assert_int_equal(amqp_url_parse("amqp://", &u, err, sizeof err), 0);
    assert_string_equal(u.host, "localhost");
    assert_int_equal(u.port, 5672);
    assert_null(u.username);
    assert_string_equal(u.vhost, "/");
    assert_false(u.tls);
    assert_int_equal(u.heartbeat, 60);
    amqp_url_clear(&u);

    static const struct {
        const char *url, *vhost;
    } vh[] = {{"amqp://h//", "/"},   {"amqp://h/", "/"},          {"amqp://h", "/"},
              {"amqp://h/%2F", "/"}, {"pyamqp://h/prod", "prod"}, {"amqp://h/a%2Fb?heartbeat=0", "a/b"}};
    for (size_t i = 0; i < sizeof vh / sizeof *vh; i++) {
        assert_int_equal(amqp_url_parse(vh[i].url, &u, err, sizeof err), 0);
        assert_string_equal(u.vhost, vh[i].vhost);
        amqp_url_clear(&u);
    }
}

static void test_url_parts_and_tls_options(void **state)
{
    (void)state;
    struct amqp_url u;
    char err[256];
    assert_int_equal(amqp_url_parse("amqps://us%40r:p%3Ass@@[::1]:5999/v?ssl_ca_certs=/c%20a.pem&ssl_certfile=/c.pem"
                                    "&ssl_keyfile=/k.pem&heartbeat=5&queue_max_priority=10",
                                    &u, err, sizeof err),
                     0);
    assert_string_equal(u.username, "us@r");
    assert_string_equal(u.password, "p:ss@");
    assert_string_equal(u.host, "::1");
    assert_int_equal(u.port, 5999);
    assert_string_equal(u.vhost, "v");
    assert_true(u.tls);
    assert_true(u.ssl_verify); /* a CA given: verify, as Python's ssl does */
    assert_string_equal(u.ssl_ca_certs, "/c a.pem");
    assert_string_equal(u.ssl_certfile, "/c.pem");
    assert_string_equal(u.ssl_keyfile, "/k.pem");
    assert_int_equal(u.heartbeat, 5);
    assert_int_equal(u.queue_max_priority, 10);
    struct broker_endpoint ep;
    amqp_url_endpoint(&u, "shown", &ep);
    assert_int_equal(ep.kind, BROKER_AMQP);
    assert_int_equal(ep.port, 5999);
    assert_string_equal(ep.display, "shown");
    amqp_url_clear(&u);

    assert_int_equal(amqp_url_parse("amqps://h?ssl_cert_reqs=CERT_NONE&ssl_ca_certs=/a", &u, err, sizeof err), 0);
    assert_int_equal(u.port, 5671);
    assert_false(u.ssl_verify);
    amqp_url_clear(&u);
    assert_int_equal(amqp_url_parse("amqp://h?ssl=true", &u, err, sizeof err), 0);
    assert_true(u.tls);
    assert_int_equal(u.port, 5672);
    amqp_url_clear(&u);
}

static void test_url_errors_mask_the_password(void **state)
{
    (void)state;
    struct amqp_url u;
    char err[256];
    static const char *const bad[] = {
        "amqp://u:secret@h:0/",  "amqp://u:secret@h:x/", "amqp://u:secret@h/?nope=1", "amqp://u:secret@h/?heartbeat=-1",
        "amqp://u:secret@[::1/", "redis://u:secret@h/",  "amqp://u:secret@h/%zz"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        err[0] = '\0';
        assert_int_equal(amqp_url_parse(bad[i], &u, err, sizeof err), -1);
        assert_non_null(strstr(err, "invalid AMQP URL"));
        assert_null(strstr(err, "secret"));
        assert_null(u.host);
    }
    assert_true(amqp_url_is("AMQP://h"));
    assert_true(amqp_url_is("librabbitmq://h"));
    assert_false(amqp_url_is("redis://h"));
}

static amqp_frame_t method_frame(amqp_method_number_t id, void *decoded)
{
    amqp_frame_t f;
    memset(&f, 0, sizeof f);
    f.frame_type = AMQP_FRAME_METHOD;
    f.channel = WIRE_CH;
    f.payload.method.id = id;
    f.payload.method.decoded = decoded;
    return f;
}

/* A message as the stock client publishes it over pyamqp, split over two body frames, comes out as the
 * envelope message.c decodes: every header (None, lists, ints, floats, bools, nested tables) and property. */
static void test_received_message_becomes_a_kombu_envelope(void **state)
{
    (void)state;
    const char *body = "[[2, 3], {}, {\"callbacks\": null, \"errbacks\": null, \"chain\": null, \"chord\": null}]";
    amqp_basic_deliver_t d = {amqp_cstring_bytes("0"), 42, 1, amqp_cstring_bytes(""), amqp_cstring_bytes("celery")};
    amqp_field_value_t limits[2] = {{AMQP_FIELD_KIND_VOID, {0}}, {AMQP_FIELD_KIND_F64, {.f64 = 2.5}}};
    amqp_table_entry_t inner = {amqp_cstring_bytes("k"), {AMQP_FIELD_KIND_I64, {.i64 = 1LL << 40}}};
    amqp_table_entry_t h[] = {
        {amqp_cstring_bytes("lang"), {AMQP_FIELD_KIND_UTF8, {.bytes = amqp_cstring_bytes("py")}}},
        {amqp_cstring_bytes("task"), {AMQP_FIELD_KIND_UTF8, {.bytes = amqp_cstring_bytes("native.add")}}},
        {amqp_cstring_bytes("id"), {AMQP_FIELD_KIND_UTF8, {.bytes = amqp_cstring_bytes("abc-1")}}},
        {amqp_cstring_bytes("eta"), {AMQP_FIELD_KIND_VOID, {0}}},
        {amqp_cstring_bytes("retries"), {AMQP_FIELD_KIND_I32, {.i32 = 3}}},
        {amqp_cstring_bytes("ignore_result"), {AMQP_FIELD_KIND_BOOLEAN, {.boolean = 0}}},
        {amqp_cstring_bytes("timelimit"), {AMQP_FIELD_KIND_ARRAY, {.array = {2, limits}}}},
        {amqp_cstring_bytes("extra"), {AMQP_FIELD_KIND_TABLE, {.table = {1, &inner}}}},
    };
    amqp_basic_properties_t p;
    memset(&p, 0, sizeof p);
    p._flags = AMQP_BASIC_CONTENT_TYPE_FLAG | AMQP_BASIC_CONTENT_ENCODING_FLAG | AMQP_BASIC_HEADERS_FLAG |
               AMQP_BASIC_DELIVERY_MODE_FLAG | AMQP_BASIC_PRIORITY_FLAG | AMQP_BASIC_CORRELATION_ID_FLAG |
               AMQP_BASIC_REPLY_TO_FLAG | AMQP_BASIC_EXPIRATION_FLAG;
    p.content_type = amqp_cstring_bytes("application/json");
    p.content_encoding = amqp_cstring_bytes("utf-8");
    p.headers = (amqp_table_t){sizeof h / sizeof *h, h};
    p.delivery_mode = 2;
    p.priority = 7;
    p.correlation_id = amqp_cstring_bytes("abc-1");
    p.reply_to = amqp_cstring_bytes("r-1");
    p.expiration = amqp_cstring_bytes("60000");

    struct wire_incoming in = {0};
    amqp_frame_t f = method_frame(AMQP_BASIC_DELIVER_METHOD, &d);
    assert_int_equal(wire_incoming_feed(&in, &f), 0);
    memset(&f, 0, sizeof f);
    f.frame_type = AMQP_FRAME_HEADER;
    f.channel = WIRE_CH;
    f.payload.properties.body_size = strlen(body);
    f.payload.properties.decoded = &p;
    assert_int_equal(wire_incoming_feed(&in, &f), 0);
    size_t half = strlen(body) / 2;
    memset(&f, 0, sizeof f);
    f.frame_type = AMQP_FRAME_BODY;
    f.channel = WIRE_CH;
    f.payload.body_fragment = (amqp_bytes_t){half, (void *)body};
    assert_int_equal(wire_incoming_feed(&in, &f), 0);
    f.payload.body_fragment = (amqp_bytes_t){strlen(body) - half, (void *)(body + half)};
    assert_int_equal(wire_incoming_feed(&in, &f), 1);
    assert_int_equal(in.priority, 7);

    size_t len = 0;
    char *env = wire_envelope(&in, "3.42", &len);
    wire_incoming_clear(&in);
    assert_non_null(env);
    json_t *j = json_loadb(env, len, 0, NULL);
    assert_non_null(j);
    json_t *hd = json_object_get(j, "headers"), *pr = json_object_get(j, "properties");
    assert_string_equal(json_string_value(json_object_get(hd, "task")), "native.add");
    assert_true(json_is_null(json_object_get(hd, "eta")));
    assert_int_equal(json_integer_value(json_object_get(hd, "retries")), 3);
    assert_true(json_is_false(json_object_get(hd, "ignore_result")));
    assert_true(json_is_null(json_array_get(json_object_get(hd, "timelimit"), 0)));
    assert_true(json_real_value(json_array_get(json_object_get(hd, "timelimit"), 1)) == 2.5);
    assert_int_equal(json_integer_value(json_object_get(json_object_get(hd, "extra"), "k")), 1LL << 40);
    assert_string_equal(json_string_value(json_object_get(pr, "delivery_tag")), "3.42");
    assert_string_equal(json_string_value(json_object_get(pr, "body_encoding")), "base64");
    assert_string_equal(json_string_value(json_object_get(pr, "reply_to")), "r-1");
    assert_string_equal(json_string_value(json_object_get(pr, "expiration")), "60000"); /* kept for a republish */
    assert_int_equal(json_integer_value(json_object_get(pr, "priority")), 7);
    json_t *di = json_object_get(pr, "delivery_info");
    assert_string_equal(json_string_value(json_object_get(di, "routing_key")), "celery");
    assert_true(json_is_true(json_object_get(di, "redelivered")));
    json_decref(j);

    /* And the worker's own decoder takes it as a task request. */
    struct msg_request req;
    char why[256] = "";
    assert_int_equal(msg_decode(env, len, 1 << 20, &req, why, sizeof why), MSG_OK);
    assert_string_equal(req.task.s, "native.add");
    assert_string_equal(req.id.s, "abc-1");
    assert_int_equal(req.retries, 3);
    assert_int_equal(req.priority, 7);
    msg_request_clear(&req);
    free(env);
}

static void test_non_utf8_header_becomes_null(void **state)
{
    (void)state;
    amqp_basic_deliver_t d = {amqp_cstring_bytes("0"), 1, 0, amqp_cstring_bytes("x"), amqp_cstring_bytes("q")};
    amqp_table_entry_t h = {amqp_cstring_bytes("bad"), {AMQP_FIELD_KIND_UTF8, {.bytes = {2, "\xff\xfe"}}}};
    amqp_basic_properties_t p;
    memset(&p, 0, sizeof p);
    p._flags = AMQP_BASIC_HEADERS_FLAG;
    p.headers = (amqp_table_t){1, &h};
    struct wire_incoming in = {0};
    amqp_frame_t f = method_frame(AMQP_BASIC_DELIVER_METHOD, &d);
    wire_incoming_feed(&in, &f);
    memset(&f, 0, sizeof f);
    f.frame_type = AMQP_FRAME_HEADER;
    f.channel = WIRE_CH;
    f.payload.properties.decoded = &p;
    assert_int_equal(wire_incoming_feed(&in, &f), 1); /* an empty body is complete at its header */
    size_t len;
    char *env = wire_envelope(&in, "0.1", &len);
    wire_incoming_clear(&in);
    json_t *j = json_loads(env, 0, NULL);
    assert_true(json_is_null(json_object_get(json_object_get(j, "headers"), "bad")));
    assert_string_equal(json_string_value(json_object_get(j, "body")), "");
    assert_string_equal(json_string_value(json_object_get(j, "content-type")), "application/json");
    json_decref(j);
    free(env);
}

/* Header values the envelope text must carry as jansson would: strings escaped, integral floats still floats,
 * a float that is not finite left out (json_real refuses it), a key that is not UTF-8 left out. */
static void test_header_values_are_escaped_and_typed(void **state)
{
    (void)state;
    amqp_basic_deliver_t d = {amqp_cstring_bytes("0"), 1, 0, amqp_cstring_bytes("x"), amqp_cstring_bytes("q")};
    amqp_field_value_t arr[3] = {{AMQP_FIELD_KIND_F64, {.f64 = INFINITY}},
                                 {AMQP_FIELD_KIND_F64, {.f64 = 3.0}},
                                 {AMQP_FIELD_KIND_UTF8, {.bytes = amqp_cstring_bytes("\xc3\xa9t\xc3\xa9")}}};
    amqp_table_entry_t h[] = {
        {amqp_cstring_bytes("quote"), {AMQP_FIELD_KIND_UTF8, {.bytes = amqp_cstring_bytes("a\"b\\c\n\x01")}}},
        {amqp_cstring_bytes("whole"), {AMQP_FIELD_KIND_F64, {.f64 = 2.0}}},
        {amqp_cstring_bytes("nan"), {AMQP_FIELD_KIND_F64, {.f64 = NAN}}},
        {{2, "\xff\xfe"}, {AMQP_FIELD_KIND_I32, {.i32 = 1}}},
        {amqp_cstring_bytes("list"), {AMQP_FIELD_KIND_ARRAY, {.array = {3, arr}}}},
        {amqp_cstring_bytes("big"), {AMQP_FIELD_KIND_U64, {.u64 = 1ULL << 62}}},
    };
    amqp_basic_properties_t p;
    memset(&p, 0, sizeof p);
    p._flags = AMQP_BASIC_HEADERS_FLAG | AMQP_BASIC_CORRELATION_ID_FLAG;
    p.headers = (amqp_table_t){sizeof h / sizeof *h, h};
    p.correlation_id = amqp_cstring_bytes("id-\"1\"");
    struct wire_incoming in = {0};
    amqp_frame_t f = method_frame(AMQP_BASIC_DELIVER_METHOD, &d);
    wire_incoming_feed(&in, &f);
    memset(&f, 0, sizeof f);
    f.frame_type = AMQP_FRAME_HEADER;
    f.channel = WIRE_CH;
    f.payload.properties.decoded = &p;
    assert_int_equal(wire_incoming_feed(&in, &f), 1);
    assert_string_equal(in.correlation_id, "id-\"1\"");
    size_t len;
    char *env = wire_envelope(&in, "0.1", &len);
    wire_incoming_clear(&in);
    assert_int_equal(len, strlen(env));
    json_t *j = json_loadb(env, len, JSON_REJECT_DUPLICATES, NULL);
    assert_non_null(j);
    json_t *hd = json_object_get(j, "headers");
    assert_string_equal(json_string_value(json_object_get(hd, "quote")), "a\"b\\c\n\x01");
    assert_true(json_is_real(json_object_get(hd, "whole")));
    assert_true(json_real_value(json_object_get(hd, "whole")) == 2.0);
    assert_null(json_object_get(hd, "nan"));
    assert_int_equal(json_object_size(hd), 4); /* quote, whole, list, big */
    json_t *list = json_object_get(hd, "list");
    assert_int_equal(json_array_size(list), 2);
    assert_true(json_real_value(json_array_get(list, 0)) == 3.0);
    assert_string_equal(json_string_value(json_array_get(list, 1)), "\xc3\xa9t\xc3\xa9");
    assert_int_equal(json_integer_value(json_object_get(hd, "big")), 1LL << 62);
    assert_string_equal(json_string_value(json_object_get(json_object_get(j, "properties"), "correlation_id")),
                        "id-\"1\"");
    json_decref(j);
    free(env);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_url_defaults_as_kombu),
        cmocka_unit_test(test_url_parts_and_tls_options),
        cmocka_unit_test(test_url_errors_mask_the_password),
        cmocka_unit_test(test_received_message_becomes_a_kombu_envelope),
        cmocka_unit_test(test_non_utf8_header_becomes_null),
        cmocka_unit_test(test_header_values_are_escaped_and_typed),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
