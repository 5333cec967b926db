/* Unit tests for worker/result.c. The expected documents are real ones, captured from a stock Celery 5.2.6
 * worker (-P solo, Redis backend, Python 3.11) in November 2026; date_done is reproduced by passing the epoch
 * that the captured date stands for. The repr tables were produced by Python's repr() and by
 * celery.utils.saferepr.saferepr on the same values. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "result.h"

/* Parses JSON text (any value); the caller frees with json_decref. */
static json_t *parse(const char *text)
{
    json_error_t err;
    json_t *v = json_loads(text, JSON_DECODE_ANY | JSON_ALLOW_NUL, &err);
    if (!v)
        fail_msg("bad JSON in test table: %s: %s", text, err.text);
    return v;
}

/* ---- SUCCESS documents ---- */

struct success_case {
    const char *value; /* JSON text of the return value */
    const char *task_id, *group_id, *parent_id;
    double now;
    const char *doc; /* as stock Celery stored it */
};

static const struct success_case success_cases[] = {
    {"5", "f4d880f1-15ca-4af6-b3db-357644099a4c", NULL, NULL, 1795359284.372815,
     "{\"status\": \"SUCCESS\", \"result\": 5, \"traceback\": null, \"children\": [], \"date_done\": \"2026-11-22T14:54:44.372815\", \"task_id\": \"f4d880f1-15ca-4af6-b3db-357644099a4c\"}"},
    {"null", "3fbc84c8-2aa8-46e6-8ec7-7e9b5061c4b1", NULL, NULL, 1795359284.375863,
     "{\"status\": \"SUCCESS\", \"result\": null, \"traceback\": null, \"children\": [], \"date_done\": \"2026-11-22T14:54:44.375863\", \"task_id\": \"3fbc84c8-2aa8-46e6-8ec7-7e9b5061c4b1\"}"},
    {"true", "2d3140c2-37db-4237-858d-3d867409b510", NULL, NULL, 1795359284.377738,
     "{\"status\": \"SUCCESS\", \"result\": true, \"traceback\": null, \"children\": [], \"date_done\": \"2026-11-22T14:54:44.377738\", \"task_id\": \"2d3140c2-37db-4237-858d-3d867409b510\"}"},
    {"-9223372036854775808", "25e0c441-c66f-498c-86b2-608e9ef25e08", NULL, NULL, 1795359284.379838,
     "{\"status\": \"SUCCESS\", \"result\": -9223372036854775808, \"traceback\": null, \"children\": [], \"date_done\": \"2026-11-22T14:54:44.379838\", \"task_id\": \"25e0c441-c66f-498c-86b2-608e9ef25e08\"}"},
    {"9223372036854775807", "58987109-6f45-4fc1-8751-93c7064ee23c", NULL, NULL, 1795359284.381585,
     "{\"status\": \"SUCCESS\", \"result\": 9223372036854775807, \"traceback\": null, \"children\": [], \"date_done\": \"2026-11-22T14:54:44.381585\", \"task_id\": \"58987109-6f45-4fc1-8751-93c7064ee23c\"}"},
    {"1e+16", "72092a27-c70b-493c-a348-ba71ec13e437", NULL, NULL, 1795359284.385536,
     "{\"status\": \"SUCCESS\", \"result\": 1e+16, \"traceback\": null, \"children\": [], \"date_done\": \"2026-11-22T14:54:44.385536\", \"task_id\": \"72092a27-c70b-493c-a348-ba71ec13e437\"}"},
    {"1000000000000000.0", "26274779-aeae-4fd7-9c3f-2aaf54056718", NULL, NULL, 1795359284.387377,
     "{\"status\": \"SUCCESS\", \"result\": 1000000000000000.0, \"traceback\": null, \"children\": [], \"date_done\": \"2026-11-22T14:54:44.387377\", \"task_id\": \"26274779-aeae-4fd7-9c3f-2aaf54056718\"}"},
    {"-0.0", "14f4f844-5e4b-4bf1-96c0-3f9e598dab0e", NULL, NULL, 1795359284.390555,
     "{\"status\": \"SUCCESS\", \"result\": -0.0, \"traceback\": null, \"children\": [], \"date_done\": \"2026-11-22T14:54:44.390555\", \"task_id\": \"14f4f844-5e4b-4bf1-96c0-3f9e598dab0e\"}"},
    {"1e-05", "be1635c7-9b6c-41c5-9ca0-53638911598a", NULL, NULL, 1795359284.392384,
     "{\"status\": \"SUCCESS\", \"result\": 1e-05, \"traceback\": null, \"children\": [], \"date_done\": \"2026-11-22T14:54:44.392384\", \"task_id\": \"be1635c7-9b6c-41c5-9ca0-53638911598a\"}"},
    {"5e-324", "ef90b53c-81f5-467e-b790-bd0e5767534d", NULL, NULL, 1795359284.398509,
     "{\"status\": \"SUCCESS\", \"result\": 5e-324, \"traceback\": null, \"children\": [], \"date_done\": \"2026-11-22T14:54:44.398509\", \"task_id\": \"ef90b53c-81f5-467e-b790-bd0e5767534d\"}"},
    {"1.7976931348623157e+308", "4b2cbf96-08e8-402c-9856-1cd8ecbced6a", NULL, NULL, 1795359284.400261,
     "{\"status\": \"SUCCESS\", \"result\": 1.7976931348623157e+308, \"traceback\": null, \"children\": [], \"date_done\": \"2026-11-22T14:54:44.400261\", \"task_id\": \"4b2cbf96-08e8-402c-9856-1cd8ecbced6a\"}"},
    {"\"h\\u00e9llo \\\"q\\\" 'a' \\\\ \\n\\t\\r\\u0001\\u007f\\u001f \\u00e9\\u65e5\\u672c\\ud83d\\ude00\\u2028\\ufeff\"", "8acf1a04-ea52-4fe0-ad9d-b9b1d5627dfb", NULL, NULL, 1795359284.407525,
     "{\"status\": \"SUCCESS\", \"result\": \"h\\u00e9llo \\\"q\\\" 'a' \\\\ \\n\\t\\r\\u0001\\u007f\\u001f \\u00e9\\u65e5\\u672c\\ud83d\\ude00\\u2028\\ufeff\", \"traceback\": null, \"children\": [], \"date_done\": \"2026-11-22T14:54:44.407525\", \"task_id\": \"8acf1a04-ea52-4fe0-ad9d-b9b1d5627dfb\"}"},
    {"[]", "25d5ffc3-a2d6-4f9d-9e3a-f18479568115", NULL, NULL, 1795359284.40949,
     "{\"status\": \"SUCCESS\", \"result\": [], \"traceback\": null, \"children\": [], \"date_done\": \"2026-11-22T14:54:44.409490\", \"task_id\": \"25d5ffc3-a2d6-4f9d-9e3a-f18479568115\"}"},
    {"{}", "cb808bdc-9ed8-408c-a5b0-0d8016bc70fc", NULL, NULL, 1795359284.411544,
     "{\"status\": \"SUCCESS\", \"result\": {}, \"traceback\": null, \"children\": [], \"date_done\": \"2026-11-22T14:54:44.411544\", \"task_id\": \"cb808bdc-9ed8-408c-a5b0-0d8016bc70fc\"}"},
    {"[1, [2, [3, [4]]]]", "8096609c-f20d-4b9d-a18a-03d85d2d1b06", NULL, NULL, 1795359284.41359,
     "{\"status\": \"SUCCESS\", \"result\": [1, [2, [3, [4]]]], \"traceback\": null, \"children\": [], \"date_done\": \"2026-11-22T14:54:44.413590\", \"task_id\": \"8096609c-f20d-4b9d-a18a-03d85d2d1b06\"}"},
    {"{\"a\": {\"b\": [1.0, \"x\"]}, \"\": null}", "c514de49-9744-4668-943a-78bc476bb76c", NULL, NULL, 1795359284.415652,
     "{\"status\": \"SUCCESS\", \"result\": {\"a\": {\"b\": [1.0, \"x\"]}, \"\": null}, \"traceback\": null, \"children\": [], \"date_done\": \"2026-11-22T14:54:44.415652\", \"task_id\": \"c514de49-9744-4668-943a-78bc476bb76c\"}"},
    {"6", "23734ec7-6f6f-429a-973d-4f4694717634", NULL, "46d51e26-d140-4e6d-bc2f-a4692db4743f", 1795359284.434107,
     "{\"status\": \"SUCCESS\", \"result\": 6, \"traceback\": null, \"children\": [], \"date_done\": \"2026-11-22T14:54:44.434107\", \"parent_id\": \"46d51e26-d140-4e6d-bc2f-a4692db4743f\", \"task_id\": \"23734ec7-6f6f-429a-973d-4f4694717634\"}"},
    {"2", "361c956b-fc75-40a9-b1d6-2289e202447f", "1eecd8b2-ddcc-4b3f-8ba6-78a4a1c3a4a4", NULL, 1795359284.436717,
     "{\"status\": \"SUCCESS\", \"result\": 2, \"traceback\": null, \"children\": [], \"date_done\": \"2026-11-22T14:54:44.436717\", \"group_id\": \"1eecd8b2-ddcc-4b3f-8ba6-78a4a1c3a4a4\", \"task_id\": \"361c956b-fc75-40a9-b1d6-2289e202447f\"}"},
};

static void test_success_docs_match_stock(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof success_cases / sizeof success_cases[0]; i++) {
        const struct success_case *c = &success_cases[i];
        json_t *v = parse(c->value);
        struct result_meta meta = {.task_id = c->task_id, .group_id = c->group_id, .parent_id = c->parent_id};
        struct buf out = {0};
        result_doc_success(&out, &meta, json_is_null(v) ? NULL : v, c->now);
        assert_string_equal(out.data, c->doc);
        /* A null value given as a JSON null rather than NULL writes the same thing. */
        buf_reset(&out);
        result_doc_success(&out, &meta, v, c->now);
        assert_string_equal(out.data, c->doc);
        buf_free(&out);
        json_decref(v);
    }
}

/* What a Python client reads back must equal what was sent: the document's result parses to the same value
 * (jansson's equality compares reals exactly). */
static void test_success_values_round_trip(void **state)
{
    (void)state;
    static const char *const values[] = {
        "0.1", "0.30000000000000004", "2.5e-07", "1.7976931348623157e308", "5e-324", "-1.5e-310", "123456789.123",
        "1e22", "1e23", "9007199254740993", "[1.0, -0.0, 1e300, {\"k\": [\"\\u0000\", \"\\ud83d\\ude00\"]}]",
        "\"\\u007f\\u0080\\u07ff\\u0800\\uffff\\ud800\\udc00\\udbff\\udfff\"", "{\"a\": {\"b\": {\"c\": {\"d\": {}}}}}",
    };
    for (size_t i = 0; i < sizeof values / sizeof values[0]; i++) {
        json_t *v = parse(values[i]);
        struct result_meta meta = {.task_id = "id"};
        struct buf out = {0};
        result_doc_success(&out, &meta, v, 0);
        json_t *doc = parse(out.data);
        assert_true(json_equal(json_object_get(doc, "result"), v));
        json_decref(doc);
        buf_free(&out);
        json_decref(v);
    }
}

static void test_success_appends(void **state)
{
    (void)state;
    struct buf out = {0};
    buf_append_str(&out, "prefix|");
    struct result_meta meta = {.task_id = "t"};
    result_doc_success(&out, &meta, NULL, 0);
    assert_string_equal(out.data, "prefix|{\"status\": \"SUCCESS\", \"result\": null, \"traceback\": null, "
                                  "\"children\": [], \"date_done\": \"1970-01-01T00:00:00\", \"task_id\": \"t\"}");
    buf_free(&out);
}

/* ---- exception documents ---- */

struct exception_case {
    const char *status, *exc_type, *message, *traceback, *task_id, *group_id, *parent_id;
    double now;
    const char *doc;
};

static const struct exception_case exception_cases[] = {
    {"FAILURE", "ValueError", "boom 1", "Traceback (most recent call last):\n  File \"/usr/lib/python3/dist-packages/celery/app/trace.py\", line 451, in trace_task\n    R = retval = fun(*args, **kwargs)\n                 ^^^^^^^^^^^^^^^^^^^^\n  File \"/usr/lib/python3/dist-packages/celery/app/trace.py\", line 734, in __protected_call__\n    return self.run(*args, **kwargs)\n           ^^^^^^^^^^^^^^^^^^^^^^^^^\n  File \"/tmp/tasks-capture/capapp.py\", line 13, in boom\n    raise ValueError(msg)\nValueError: boom 1\n", "6b5ae5b4-150e-414d-98ca-ba4ce4f02cbe", NULL, NULL, 1795359284.41963,
     "{\"status\": \"FAILURE\", \"result\": {\"exc_type\": \"ValueError\", \"exc_message\": [\"boom 1\"], \"exc_module\": \"builtins\"}, \"traceback\": \"Traceback (most recent call last):\\n  File \\\"/usr/lib/python3/dist-packages/celery/app/trace.py\\\", line 451, in trace_task\\n    R = retval = fun(*args, **kwargs)\\n                 ^^^^^^^^^^^^^^^^^^^^\\n  File \\\"/usr/lib/python3/dist-packages/celery/app/trace.py\\\", line 734, in __protected_call__\\n    return self.run(*args, **kwargs)\\n           ^^^^^^^^^^^^^^^^^^^^^^^^^\\n  File \\\"/tmp/tasks-capture/capapp.py\\\", line 13, in boom\\n    raise ValueError(msg)\\nValueError: boom 1\\n\", \"children\": [], \"date_done\": \"2026-11-22T14:54:44.419630\", \"task_id\": \"6b5ae5b4-150e-414d-98ca-ba4ce4f02cbe\"}"},
    {"FAILURE", "ValueError", "\303\274n\303\257code 'q' \"d\"\n", "Traceback (most recent call last):\n  File \"/usr/lib/python3/dist-packages/celery/app/trace.py\", line 451, in trace_task\n    R = retval = fun(*args, **kwargs)\n                 ^^^^^^^^^^^^^^^^^^^^\n  File \"/usr/lib/python3/dist-packages/celery/app/trace.py\", line 734, in __protected_call__\n    return self.run(*args, **kwargs)\n           ^^^^^^^^^^^^^^^^^^^^^^^^^\n  File \"/tmp/tasks-capture/capapp.py\", line 13, in boom\n    raise ValueError(msg)\nValueError: \303\274n\303\257code 'q' \"d\"\n\n", "958ff402-9809-40fc-a2cd-ff3a6c920353", NULL, NULL, 1795359284.423149,
     "{\"status\": \"FAILURE\", \"result\": {\"exc_type\": \"ValueError\", \"exc_message\": [\"\\u00fcn\\u00efcode 'q' \\\"d\\\"\\n\"], \"exc_module\": \"builtins\"}, \"traceback\": \"Traceback (most recent call last):\\n  File \\\"/usr/lib/python3/dist-packages/celery/app/trace.py\\\", line 451, in trace_task\\n    R = retval = fun(*args, **kwargs)\\n                 ^^^^^^^^^^^^^^^^^^^^\\n  File \\\"/usr/lib/python3/dist-packages/celery/app/trace.py\\\", line 734, in __protected_call__\\n    return self.run(*args, **kwargs)\\n           ^^^^^^^^^^^^^^^^^^^^^^^^^\\n  File \\\"/tmp/tasks-capture/capapp.py\\\", line 13, in boom\\n    raise ValueError(msg)\\nValueError: \\u00fcn\\u00efcode 'q' \\\"d\\\"\\n\\n\", \"children\": [], \"date_done\": \"2026-11-22T14:54:44.423149\", \"task_id\": \"958ff402-9809-40fc-a2cd-ff3a6c920353\"}"},
    {"FAILURE", "ValueError", "", "Traceback (most recent call last):\n  File \"/usr/lib/python3/dist-packages/celery/app/trace.py\", line 451, in trace_task\n    R = retval = fun(*args, **kwargs)\n                 ^^^^^^^^^^^^^^^^^^^^\n  File \"/usr/lib/python3/dist-packages/celery/app/trace.py\", line 734, in __protected_call__\n    return self.run(*args, **kwargs)\n           ^^^^^^^^^^^^^^^^^^^^^^^^^\n  File \"/tmp/tasks-capture/capapp.py\", line 13, in boom\n    raise ValueError(msg)\nValueError\n", "77c6a1ac-627e-4825-922e-53a27f45b6d1", NULL, NULL, 1795359284.425692,
     "{\"status\": \"FAILURE\", \"result\": {\"exc_type\": \"ValueError\", \"exc_message\": [\"\"], \"exc_module\": \"builtins\"}, \"traceback\": \"Traceback (most recent call last):\\n  File \\\"/usr/lib/python3/dist-packages/celery/app/trace.py\\\", line 451, in trace_task\\n    R = retval = fun(*args, **kwargs)\\n                 ^^^^^^^^^^^^^^^^^^^^\\n  File \\\"/usr/lib/python3/dist-packages/celery/app/trace.py\\\", line 734, in __protected_call__\\n    return self.run(*args, **kwargs)\\n           ^^^^^^^^^^^^^^^^^^^^^^^^^\\n  File \\\"/tmp/tasks-capture/capapp.py\\\", line 13, in boom\\n    raise ValueError(msg)\\nValueError\\n\", \"children\": [], \"date_done\": \"2026-11-22T14:54:44.425692\", \"task_id\": \"77c6a1ac-627e-4825-922e-53a27f45b6d1\"}"},
    {"FAILURE", "NotRegistered", "cap.nosuch", NULL, "9a83bb38-e873-48f8-b069-26293bf8e373", NULL, NULL, 1795359284.944249,
     "{\"status\": \"FAILURE\", \"result\": {\"exc_type\": \"NotRegistered\", \"exc_message\": [\"cap.nosuch\"], \"exc_module\": \"celery.exceptions\"}, \"traceback\": null, \"children\": [], \"date_done\": \"2026-11-22T14:54:44.944249\", \"task_id\": \"9a83bb38-e873-48f8-b069-26293bf8e373\"}"},
    {"REVOKED", "TaskRevokedError", "expired", NULL, "4e25ce18-b68b-42a6-9cdc-4754b121f83d", NULL, NULL, 1795359302.128751,
     "{\"status\": \"REVOKED\", \"result\": {\"exc_type\": \"TaskRevokedError\", \"exc_message\": [\"expired\"], \"exc_module\": \"celery.exceptions\"}, \"traceback\": null, \"children\": [], \"date_done\": \"2026-11-22T14:55:02.128751\", \"task_id\": \"4e25ce18-b68b-42a6-9cdc-4754b121f83d\"}"},
    {"RETRY", "KeyError", "again", "Traceback (most recent call last):\n  File \"/usr/lib/python3/dist-packages/celery/app/trace.py\", line 451, in trace_task\n    R = retval = fun(*args, **kwargs)\n                 ^^^^^^^^^^^^^^^^^^^^\n  File \"/usr/lib/python3/dist-packages/celery/app/trace.py\", line 734, in __protected_call__\n    return self.run(*args, **kwargs)\n           ^^^^^^^^^^^^^^^^^^^^^^^^^\n  File \"/tmp/tasks-capture/capapp.py\", line 31, in retry\n    raise self.retry(countdown=1, exc=KeyError(\"again\"))\n          ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n  File \"/usr/lib/python3/dist-packages/celery/app/task.py\", line 738, in retry\n    raise ret\ncelery.exceptions.Retry: Retry in 1s: KeyError('again')\n", "71c648d3-dafe-4e4c-942a-edeabf4ec05f", NULL, NULL, 0,
     "{\"status\": \"RETRY\", \"result\": {\"exc_type\": \"KeyError\", \"exc_message\": [\"again\"], \"exc_module\": \"builtins\"}, \"traceback\": \"Traceback (most recent call last):\\n  File \\\"/usr/lib/python3/dist-packages/celery/app/trace.py\\\", line 451, in trace_task\\n    R = retval = fun(*args, **kwargs)\\n                 ^^^^^^^^^^^^^^^^^^^^\\n  File \\\"/usr/lib/python3/dist-packages/celery/app/trace.py\\\", line 734, in __protected_call__\\n    return self.run(*args, **kwargs)\\n           ^^^^^^^^^^^^^^^^^^^^^^^^^\\n  File \\\"/tmp/tasks-capture/capapp.py\\\", line 31, in retry\\n    raise self.retry(countdown=1, exc=KeyError(\\\"again\\\"))\\n          ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\\n  File \\\"/usr/lib/python3/dist-packages/celery/app/task.py\\\", line 738, in retry\\n    raise ret\\ncelery.exceptions.Retry: Retry in 1s: KeyError('again')\\n\", \"children\": [[[\"71c648d3-dafe-4e4c-942a-edeabf4ec05f\", null], null]], \"date_done\": null, \"task_id\": \"71c648d3-dafe-4e4c-942a-edeabf4ec05f\"}"},
    {"FAILURE", "KeyError", "again", "Traceback (most recent call last):\n  File \"/usr/lib/python3/dist-packages/celery/app/trace.py\", line 451, in trace_task\n    R = retval = fun(*args, **kwargs)\n                 ^^^^^^^^^^^^^^^^^^^^\n  File \"/usr/lib/python3/dist-packages/celery/app/trace.py\", line 734, in __protected_call__\n    return self.run(*args, **kwargs)\n           ^^^^^^^^^^^^^^^^^^^^^^^^^\n  File \"/tmp/tasks-capture/capapp.py\", line 31, in retry\n    raise self.retry(countdown=1, exc=KeyError(\"again\"))\n          ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n  File \"/usr/lib/python3/dist-packages/celery/app/task.py\", line 717, in retry\n    raise_with_context(exc)\n  File \"/usr/lib/python3/dist-packages/celery/utils/serialization.py\", line 266, in raise_with_context\n    raise exc from exc_info[1]\nKeyError: 'again'\n", "71c648d3-dafe-4e4c-942a-edeabf4ec05f", NULL, "71c648d3-dafe-4e4c-942a-edeabf4ec05f", 1795359302.12512,
     "{\"status\": \"FAILURE\", \"result\": {\"exc_type\": \"KeyError\", \"exc_message\": [\"again\"], \"exc_module\": \"builtins\"}, \"traceback\": \"Traceback (most recent call last):\\n  File \\\"/usr/lib/python3/dist-packages/celery/app/trace.py\\\", line 451, in trace_task\\n    R = retval = fun(*args, **kwargs)\\n                 ^^^^^^^^^^^^^^^^^^^^\\n  File \\\"/usr/lib/python3/dist-packages/celery/app/trace.py\\\", line 734, in __protected_call__\\n    return self.run(*args, **kwargs)\\n           ^^^^^^^^^^^^^^^^^^^^^^^^^\\n  File \\\"/tmp/tasks-capture/capapp.py\\\", line 31, in retry\\n    raise self.retry(countdown=1, exc=KeyError(\\\"again\\\"))\\n          ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\\n  File \\\"/usr/lib/python3/dist-packages/celery/app/task.py\\\", line 717, in retry\\n    raise_with_context(exc)\\n  File \\\"/usr/lib/python3/dist-packages/celery/utils/serialization.py\\\", line 266, in raise_with_context\\n    raise exc from exc_info[1]\\nKeyError: 'again'\\n\", \"children\": [], \"date_done\": \"2026-11-22T14:55:02.125120\", \"parent_id\": \"71c648d3-dafe-4e4c-942a-edeabf4ec05f\", \"task_id\": \"71c648d3-dafe-4e4c-942a-edeabf4ec05f\"}"},
    {"FAILURE", "KeyError", "k", "Traceback (most recent call last):\n  File \"/usr/lib/python3/dist-packages/celery/app/trace.py\", line 451, in trace_task\n    R = retval = fun(*args, **kwargs)\n                 ^^^^^^^^^^^^^^^^^^^^\n  File \"/usr/lib/python3/dist-packages/celery/app/trace.py\", line 734, in __protected_call__\n    return self.run(*args, **kwargs)\n           ^^^^^^^^^^^^^^^^^^^^^^^^^\n  File \"/tmp/tasks-capture/capapp.py\", line 17, in keyerr\n    raise KeyError(msg)\nKeyError: 'k'\n", "8798e40d-9627-498a-8c79-f73f0cb1fb27", NULL, NULL, 1795359284.428734,
     "{\"status\": \"FAILURE\", \"result\": {\"exc_type\": \"KeyError\", \"exc_message\": [\"k\"], \"exc_module\": \"builtins\"}, \"traceback\": \"Traceback (most recent call last):\\n  File \\\"/usr/lib/python3/dist-packages/celery/app/trace.py\\\", line 451, in trace_task\\n    R = retval = fun(*args, **kwargs)\\n                 ^^^^^^^^^^^^^^^^^^^^\\n  File \\\"/usr/lib/python3/dist-packages/celery/app/trace.py\\\", line 734, in __protected_call__\\n    return self.run(*args, **kwargs)\\n           ^^^^^^^^^^^^^^^^^^^^^^^^^\\n  File \\\"/tmp/tasks-capture/capapp.py\\\", line 17, in keyerr\\n    raise KeyError(msg)\\nKeyError: 'k'\\n\", \"children\": [], \"date_done\": \"2026-11-22T14:54:44.428734\", \"task_id\": \"8798e40d-9627-498a-8c79-f73f0cb1fb27\"}"},
};

static void test_exception_docs_match_stock(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof exception_cases / sizeof exception_cases[0]; i++) {
        const struct exception_case *c = &exception_cases[i];
        struct result_meta meta = {.task_id = c->task_id, .group_id = c->group_id, .parent_id = c->parent_id};
        struct buf out = {0};
        result_doc_exception(&out, &meta, c->status, c->exc_type, c->message, c->traceback, c->now);
        assert_string_equal(out.data, c->doc);
        buf_free(&out);
    }
}

static void test_exception_args_doc(void **state)
{
    (void)state;
    /* Captured from a stock worker killing a task at its hard time limit: the args are [1], not a string. */
    static const char stock[] =
        "{\"status\": \"FAILURE\", \"result\": {\"exc_type\": \"TimeLimitExceeded\", \"exc_message\": [1], "
        "\"exc_module\": \"billiard.exceptions\"}, \"traceback\": null, \"children\": [], \"date_done\": "
        "\"2026-11-22T14:56:21.031466\", \"task_id\": \"9f1ddeb0-90c7-4564-b434-382b3492944f\"}";
    struct result_meta meta = {.task_id = "9f1ddeb0-90c7-4564-b434-382b3492944f"};
    json_t *args = parse("[1]");
    struct buf out = {0};
    result_doc_exception_args(&out, &meta, "FAILURE", "TimeLimitExceeded", args, NULL, 1795359381.031466);
    assert_string_equal(out.data, stock);
    json_decref(args);

    /* Not an array: an empty args tuple. So is a NULL message in result_doc_exception. */
    buf_reset(&out);
    result_doc_exception_args(&out, &meta, "FAILURE", "WorkerLostError", NULL, NULL, 0);
    assert_non_null(strstr(out.data, "\"exc_message\": [], \"exc_module\": \"billiard.exceptions\""));
    buf_reset(&out);
    result_doc_exception(&out, &meta, "FAILURE", "ValueError", NULL, NULL, 0);
    assert_non_null(strstr(out.data, "\"exc_message\": [], \"exc_module\": \"builtins\"}, \"traceback\": null"));
    buf_free(&out);
}

static void test_exception_doc_with_group_and_parent(void **state)
{
    (void)state;
    struct result_meta meta = {.task_id = "tid", .group_id = "gid", .parent_id = "pid"};
    struct buf out = {0};
    result_doc_exception(&out, &meta, "FAILURE", "ResponseError", "WRONGTYPE x", "tb\n", 0.25);
    assert_string_equal(out.data, "{\"status\": \"FAILURE\", \"result\": {\"exc_type\": \"ResponseError\", "
                                  "\"exc_message\": [\"WRONGTYPE x\"], \"exc_module\": \"celeriac.exceptions\"}, "
                                  "\"traceback\": \"tb\\n\", \"children\": [], \"date_done\": "
                                  "\"1970-01-01T00:00:00.250000\", \"group_id\": \"gid\", \"parent_id\": \"pid\", "
                                  "\"task_id\": \"tid\"}");
    buf_free(&out);
}

static void test_started_doc_matches_stock(void **state)
{
    (void)state;
    struct result_meta meta = {.task_id = "8bbccc03-717a-489b-8542-fb58e50dfa00"};
    struct buf out = {0};
    result_doc_started(&out, &meta, 5911, "celery@vm");
    assert_string_equal(out.data, "{\"status\": \"STARTED\", \"result\": {\"pid\": 5911, \"hostname\": \"celery@vm\"}, "
                                  "\"traceback\": null, \"children\": [], \"date_done\": null, "
                                  "\"task_id\": \"8bbccc03-717a-489b-8542-fb58e50dfa00\"}");
    buf_free(&out);
}

/* ---- exc modules, traceback ---- */

static void test_exc_module(void **state)
{
    (void)state;
    static const struct {
        const char *exc_type, *module;
    } cases[] = {
        {"ValueError", "builtins"},
        {"TypeError", "builtins"},
        {"OverflowError", "builtins"},
        {"ConnectionError", "builtins"},
        {"ArithmeticError", "builtins"},
        {"ZeroDivisionError", "builtins"},
        {"BaseException", "builtins"},
        {"Exception", "builtins"},
        {"SystemError", "builtins"},
        {"MemoryError", "builtins"},
        {"KeyError", "builtins"},
        {"IOError", "builtins"},
        {"UserWarning", "builtins"},
        {"NotRegistered", "celery.exceptions"},
        {"InvalidTaskError", "celery.exceptions"},
        {"TaskRevokedError", "celery.exceptions"},
        {"ChordError", "celery.exceptions"},
        {"MaxRetriesExceededError", "celery.exceptions"},
        {"Retry", "celery.exceptions"},
        {"TimeLimitExceeded", "billiard.exceptions"},
        {"SoftTimeLimitExceeded", "billiard.exceptions"},
        {"WorkerLostError", "billiard.exceptions"},
        {"ContentDisallowed", "kombu.exceptions"},
        {"DecodeError", "kombu.exceptions"},
        {"ResponseError", "celeriac.exceptions"},
        {"DataError", "celeriac.exceptions"},
        {"valueerror", "celeriac.exceptions"},
        {"", "celeriac.exceptions"},
        {"print", "celeriac.exceptions"}, /* a builtin that is not an exception must never be named */
        {"Warning2", "celeriac.exceptions"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        assert_string_equal(result_exc_module(cases[i].exc_type), cases[i].module);
    assert_string_equal(result_exc_module(NULL), "builtins");
}

static void test_traceback(void **state)
{
    (void)state;
    struct buf out = {0};
    result_traceback(&out, "native.fail", "ValueError", "boom 1");
    assert_string_equal(out.data, "Traceback (most recent call last):\n  File \"<native>\", line 0, in native.fail\n"
                                  "ValueError: boom 1\n");
    buf_reset(&out);
    result_traceback(&out, "native.fail", "ValueError", "");
    assert_string_equal(out.data, "Traceback (most recent call last):\n  File \"<native>\", line 0, in native.fail\n"
                                  "ValueError\n");
    buf_reset(&out);
    result_traceback(&out, "native.fail", "ValueError", NULL);
    assert_string_equal(out.data, "Traceback (most recent call last):\n  File \"<native>\", line 0, in native.fail\n"
                                  "ValueError\n");
    buf_free(&out);
}

/* ---- repr ---- */

struct repr_case {
    const char *json;
    size_t max_len;
    const char *want; /* celery.utils.saferepr.saferepr(value, max_len or None) */
};

static const struct repr_case saferepr_cases[] = {
    {"null", 0, "None"},
    {"true", 0, "True"},
    {"false", 0, "False"},
    {"3", 0, "3"},
    {"-9223372036854775808", 0, "-9223372036854775808"},
    {"1.5", 0, "1.5"},
    {"1e16", 0, "1e+16"},
    {"1e-5", 0, "1e-05"},
    {"-0.0", 0, "-0.0"},
    {"100.0", 0, "100.0"},
    {"\"second time\"", 0, "'second time'"},
    {"\"it's\"", 0, "'it\\'s'"},
    {"\"say \\\"hi\\\"\"", 0, "'say \"hi\"'"},
    {"\"a\\nb\\\\c\"", 0, "'a\nb\\c'"},
    {"\"h\\u00e9 \\u65e5\\ud83d\\ude00\"", 0, "'h\303\251 \346\227\245\360\237\230\200'"},
    {"\"\"", 0, "''"},
    {"[1, 2]", 0, "[1, 2]"},
    {"[]", 0, "[]"},
    {"{}", 0, "{}"},
    {"{\"a\": 1, \"b\": [true, null]}", 0, "{'a': 1, 'b': [True, None]}"},
    {"[1, [2, [3, [4, [5]]]]]", 0, "[1, [2, [3, [...]]]]"},
    {"{\"a\": {\"b\": {\"c\": {\"d\": 1}}}}", 0, "{'a': {'b': {'c': {...}}}}"},
    {"[[[{}]]]", 0, "[[[{...}]]]"},
    {"[[[[]]]]", 0, "[[[[...]]]]"},
    {"{\"it's\": \"v\"}", 0, "{'it\\'s': 'v'}"},
    {"\"abcdef\"", 3, "'abc...'"},
    {"\"abc\"", 3, "'abc...'"},
    {"\"ab\"", 3, "'ab'"},
    {"\"hello world again\"", 12, "'hello world...'"},
    {"\"x\"", 1, "'x...'"},
    {"123456", 3, "123..."},
    {"12", 3, "12"},
    {"[1, 2, 3, 4, 5]", 4, "[1, , ...]"},
    {"[1, 2]", 4, "[1, , ...]"},
    {"[1, [2, 3], 4]", 5, "[1, [, ...]]"},
    {"[1, [2, 3], 4]", 4, "[1, , ...]]"},
    {"{\"key\": \"value\", \"k2\": 2}", 6, "{'key', ...}"},
    {"{\"key\": \"value\"}", 3, "{'ke...', ...}"},
    {"[\"aaaa bbbb cccc\", \"x\"]", 8, "['aaaa...', ...]"},
    {"\"h\\u00e9llo w\\u00f6rld\"", 8, "'h\303\251llo...'"},
    {"[1.5, 2.25]", 2, "[1..., ...]"},
    {"[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]", 1024, "[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]"},
};

static void test_pyrepr_matches_saferepr(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof saferepr_cases / sizeof saferepr_cases[0]; i++) {
        json_t *v = parse(saferepr_cases[i].json);
        struct buf out = {0};
        result_pyrepr(&out, v, saferepr_cases[i].max_len);
        if (strcmp(out.data, saferepr_cases[i].want) != 0)
            fail_msg("saferepr(%s, %zu): want <%s>, got <%s>", saferepr_cases[i].json, saferepr_cases[i].max_len,
                     saferepr_cases[i].want, out.data);
        buf_free(&out);
        json_decref(v);
    }
    struct buf out = {0};
    result_pyrepr(&out, NULL, 0);
    assert_string_equal(out.data, "None");
    buf_free(&out);
}

struct str_case {
    const char *s;
    size_t len;
    const char *want; /* Python's repr(s) */
};
#define S(lit) lit, sizeof(lit) - 1

static const struct str_case repr_str_cases[] = {
    {S("boom 1"), "'boom 1'"},
    {S("it's"), "\"it's\""},
    {S("say \"hi\""), "'say \"hi\"'"},
    {S("both ' and \""), "'both \\' and \"'"},
    {S("tab\there\nnl\015\000\007\177"), "'tab\\there\\nnl\\r\\x00\\x07\\x7f'"},
    {S("back\\slash"), "'back\\\\slash'"},
    {S("h\303\251 \346\227\245\360\237\230\200"), "'h\303\251 \346\227\245\360\237\230\200'"},
    {S("\302\240\302\255\342\200\250\357\273\277\363\240\200\201\315\270"), "'\\xa0\\xad\\u2028\\ufeff\\U000e0001\\u0378'"},
    {S(""), "''"},
    {S("\302\200\302\237"), "'\\x80\\x9f'"},
};

static void test_repr_str_matches_python(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof repr_str_cases / sizeof repr_str_cases[0]; i++) {
        struct buf out = {0};
        result_repr_str(&out, repr_str_cases[i].s, repr_str_cases[i].len);
        assert_string_equal(out.data, repr_str_cases[i].want);
        buf_free(&out);
    }
}

static void test_exc_repr(void **state)
{
    (void)state;
    struct buf out = {0};
    result_exc_repr(&out, "ValueError", "boom 1");
    assert_string_equal(out.data, "ValueError('boom 1')");
    buf_reset(&out);
    result_exc_repr(&out, "NotRegistered", "it's");
    assert_string_equal(out.data, "NotRegistered(\"it's\")");
    buf_reset(&out);
    result_exc_repr(&out, "TypeError", "line\nbreak");
    assert_string_equal(out.data, "TypeError('line\\nbreak')");
    buf_reset(&out);
    result_exc_repr(&out, "ValueError", NULL);
    assert_string_equal(out.data, "ValueError()");
    buf_free(&out);
}

/* float.__repr__ in documents (json.dumps uses it) and in repr text. The first three are just above a power
 * of two, where the correctly rounded 16 digits do not read back but another 16-digit string does. */
static void test_float_repr(void **state)
{
    (void)state;
    static const struct {
        const char *json, *want; /* want: Python's repr(float(json)) */
    } cases[] = {
        {"7.120236347223045e-307", "7.120236347223045e-307"},
        {"7.291122019556398e-304", "7.291122019556398e-304"},
        {"8.209073602596753e-289", "8.209073602596753e-289"},
        {"5e-324", "5e-324"},
        {"2.2250738585072014e-308", "2.2250738585072014e-308"},
        {"1.7976931348623157e308", "1.7976931348623157e+308"},
        {"1e22", "1e+22"},
        {"1e23", "1e+23"},
        {"9007199254740993.0", "9007199254740992.0"},
        {"0.1", "0.1"},
        {"0.30000000000000004", "0.30000000000000004"},
        {"123456789012345680.0", "1.2345678901234568e+17"},
        {"1234567890123456.7", "1234567890123456.8"},
        {"0.0001", "0.0001"},
        {"0.00001", "1e-05"},
        {"1e15", "1000000000000000.0"},
        {"1e16", "1e+16"},
        {"-2.5e-7", "-2.5e-07"},
        {"4.35", "4.35"},
        {"1.2345678901234567e-100", "1.2345678901234567e-100"},
        {"-0.0", "-0.0"},
        {"0.0", "0.0"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        json_t *v = parse(cases[i].json);
        struct buf out = {0};
        result_pyrepr(&out, v, 0);
        assert_string_equal(out.data, cases[i].want);
        buf_reset(&out);
        struct result_meta meta = {.task_id = "t"};
        result_doc_success(&out, &meta, v, 0);
        char want_doc[200];
        snprintf(want_doc, sizeof want_doc,
                 "{\"status\": \"SUCCESS\", \"result\": %s, \"traceback\": null, \"children\": [], "
                 "\"date_done\": \"1970-01-01T00:00:00\", \"task_id\": \"t\"}",
                 cases[i].want);
        assert_string_equal(out.data, want_doc);
        buf_free(&out);
        json_decref(v);
    }
}

/* ---- isoformat ---- */

static void test_isoformat(void **state)
{
    (void)state;
    static const struct {
        double epoch;
        const char *want; /* datetime.utcfromtimestamp(epoch).isoformat() */
    } cases[] = {
        {0.0, "1970-01-01T00:00:00"},
        {1795352830.555704, "2026-11-22T13:07:10.555704"},
        {1795359284.0, "2026-11-22T14:54:44"},
        {1795359284.9999995, "2026-11-22T14:54:45"},
        {1795359284.0000005, "2026-11-22T14:54:44"},
        {1795359284.1, "2026-11-22T14:54:44.100000"},
        {-1.5, "1969-12-31T23:59:58.500000"},
        {951782400.5, "2000-02-29T00:00:00.500000"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char iso[32];
        memset(iso, 'x', sizeof iso);
        result_isoformat(cases[i].epoch, iso, sizeof iso);
        assert_string_equal(iso, cases[i].want);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_success_docs_match_stock),
        cmocka_unit_test(test_success_values_round_trip),
        cmocka_unit_test(test_success_appends),
        cmocka_unit_test(test_exception_docs_match_stock),
        cmocka_unit_test(test_exception_args_doc),
        cmocka_unit_test(test_exception_doc_with_group_and_parent),
        cmocka_unit_test(test_started_doc_matches_stock),
        cmocka_unit_test(test_exc_module),
        cmocka_unit_test(test_traceback),
        cmocka_unit_test(test_pyrepr_matches_saferepr),
        cmocka_unit_test(test_repr_str_matches_python),
        cmocka_unit_test(test_exc_repr),
        cmocka_unit_test(test_float_repr),
        cmocka_unit_test(test_isoformat),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
