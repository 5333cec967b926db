/* Unit tests for worker/outgoing.c: what celeriac sends must decode (with our own decoder, which was checked
 * against stock Celery's captures) into exactly the fields it was given, with an embed a Python worker reads. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "message.h"
#include "outgoing.h"
#include "result.h"

static void test_encode_round_trips_through_the_decoder(void **state)
{
    (void)state;
    json_t *args = json_pack("[i, s]", 2, "x\"y");
    json_t *kwargs = json_pack("{s:f}", "k", 1.5);
    json_t *chain = json_pack("[{s:s}]", "task", "native.add");
    struct outgoing_task t = {
        .task = "native.add",
        .id = "11111111-2222-4333-8444-555555555555",
        .root_id = "root-1",
        .parent_id = "parent-1",
        .group = "group-1",
        .group_index = 3,
        .has_group_index = true,
        .eta = "2026-11-22T17:03:03.489598+00:00",
        .retries = 2,
        .time_limit = 10,
        .soft_time_limit = 5,
        .origin = "celeriac@test",
        .routing_key = "native",
        .priority = 6,
        .args = args,
        .kwargs = kwargs,
        .chain = chain,
    };
    struct buf out = {0};
    assert_int_equal(outgoing_encode(&out, &t), 0);
    struct msg_request r = {0};
    char err[256];
    assert_int_equal(msg_decode(out.data, out.len, 0, &r, err, sizeof err), MSG_OK);
    assert_int_equal(r.protocol, 2);
    assert_string_equal(r.task.s, "native.add");
    assert_string_equal(r.id.s, t.id);
    assert_string_equal(r.correlation_id.s, t.id);
    assert_string_equal(r.root_id.s, "root-1");
    assert_string_equal(r.parent_id.s, "parent-1");
    assert_string_equal(r.group.s, "group-1");
    assert_true(r.has_group_index);
    assert_int_equal(r.group_index, 3);
    assert_string_equal(r.eta.s, t.eta);
    assert_null(r.expires.s);
    assert_int_equal(r.retries, 2);
    assert_true(r.has_time_limit && r.has_soft_time_limit);
    assert_true(r.time_limit == 10 && r.soft_time_limit == 5);
    assert_string_equal(r.routing_key.s, "native");
    assert_string_equal(r.exchange.s, "");
    assert_int_equal(r.priority, 6);
    assert_string_equal(r.argsrepr.s, "(2, 'x\"y')");
    assert_string_equal(r.kwargsrepr.s, "{'k': 1.5}");
    assert_string_equal(r.origin.s, "celeriac@test");

    json_t *body = json_loadb(r.body, r.body_len, 0, NULL);
    assert_non_null(body);
    assert_true(json_equal(json_array_get(body, 0), args));
    assert_true(json_equal(json_array_get(body, 1), kwargs));
    json_t *embed = json_array_get(body, 2);
    /* All four keys always present (a Python worker needs them), null when not given. */
    assert_true(json_is_null(json_object_get(embed, "callbacks")));
    assert_true(json_is_null(json_object_get(embed, "errbacks")));
    assert_true(json_is_null(json_object_get(embed, "chord")));
    assert_true(json_equal(json_object_get(embed, "chain"), chain));
    json_decref(body);
    msg_request_clear(&r);
    buf_free(&out);
    json_decref(args);
    json_decref(kwargs);
    json_decref(chain);
}

static void test_defaults(void **state)
{
    (void)state;
    struct outgoing_task t = {.task = "py.mul", .id = "id-1", .routing_key = "celery"};
    struct buf out = {0};
    assert_int_equal(outgoing_encode(&out, &t), 0);
    struct msg_request r = {0};
    char err[256];
    assert_int_equal(msg_decode(out.data, out.len, 0, &r, err, sizeof err), MSG_OK);
    assert_string_equal(r.root_id.s, "id-1"); /* a first task is its own root */
    assert_null(r.parent_id.s);
    assert_null(r.group.s);
    assert_false(r.has_group_index);
    assert_false(r.has_time_limit);
    assert_string_equal(r.argsrepr.s, "()");
    assert_string_equal(r.kwargsrepr.s, "{}");
    assert_string_equal(r.body, "[[], {}, {\"callbacks\": null, \"errbacks\": null, \"chain\": null, \"chord\": null}]");
    msg_request_clear(&r);
    buf_free(&out);
}

static void test_refuses_incomplete(void **state)
{
    (void)state;
    struct buf out = {0};
    struct outgoing_task no_queue = {.task = "a", .id = "b"};
    assert_int_equal(outgoing_encode(&out, &no_queue), -1);
    struct outgoing_task no_id = {.task = "a", .routing_key = "q"};
    assert_int_equal(outgoing_encode(&out, &no_id), -1);
    assert_int_equal(out.len, 0);
    buf_free(&out);
}

static void test_argsrepr_is_a_python_tuple(void **state)
{
    (void)state;
    static const struct {
        const char *json, *repr;
    } cases[] = {
        {"[]", "()"},
        {"[2]", "(2,)"},
        {"[2, 3]", "(2, 3)"},
        {"[\"it's\", null, true]", "('it\\'s', None, True)"}, /* saferepr: always ' quotes */
        {"[[1, 2], {\"a\": 1}]", "([1, 2], {'a': 1})"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        json_t *v = json_loads(cases[i].json, 0, NULL);
        struct buf out = {0};
        outgoing_argsrepr(&out, v);
        assert_string_equal(out.data, cases[i].repr);
        buf_free(&out);
        json_decref(v);
    }
}

static void test_uuid_is_version_4(void **state)
{
    (void)state;
    char a[37], b[37];
    outgoing_uuid(a);
    outgoing_uuid(b);
    assert_int_equal(strlen(a), 36);
    assert_string_not_equal(a, b);
    assert_true(a[8] == '-' && a[13] == '-' && a[18] == '-' && a[23] == '-');
    assert_int_equal(a[14], '4');
    assert_non_null(strchr("89ab", a[19]));
}

static void test_eta_is_iso_with_offset(void **state)
{
    (void)state;
    char eta[40];
    outgoing_eta(0.5, eta, sizeof eta);
    assert_int_equal(strlen(eta) > 25, 1);
    assert_string_equal(eta + strlen(eta) - 6, "+00:00");
    assert_int_equal(eta[10], 'T');
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_encode_round_trips_through_the_decoder),
        cmocka_unit_test(test_defaults),
        cmocka_unit_test(test_refuses_incomplete),
        cmocka_unit_test(test_argsrepr_is_a_python_tuple),
        cmocka_unit_test(test_uuid_is_version_4),
        cmocka_unit_test(test_eta_is_iso_with_offset),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
