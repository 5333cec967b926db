/* Unit tests for tasks/: the registry, the binder's Python-worded TypeErrors (checked against CPython 3.11 on
 * the same calls), and every built-in task including its failures. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <errno.h>
#include <hiredis/hiredis.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "task.h"

/* Parses JSON text (any value), or returns NULL for a NULL text; the caller frees with json_decref. */
static json_t *parse(const char *text)
{
    if (!text)
        return NULL;
    json_error_t err;
    json_t *v = json_loads(text, JSON_DECODE_ANY | JSON_ALLOW_NUL, &err);
    if (!v)
        fail_msg("bad JSON in test table: %s: %s", text, err.text);
    return v;
}

/* Compact, key-order-preserving text of v (or "NULL"); the caller frees with free(). */
static char *dump(const json_t *v)
{
    if (!v)
        return strdup("NULL");
    return json_dumps(v, JSON_ENCODE_ANY | JSON_COMPACT);
}

/* ---- registry ---- */

static void collect_names(const struct task_def *task, void *arg)
{
    json_t *names = arg;
    json_array_append_new(names, json_string(task->name));
}

static void test_registry_lists_the_builtins_in_order(void **state)
{
    (void)state;
    json_t *names = json_array();
    task_registry_each(collect_names, names);
    char *text = dump(names);
    assert_string_equal(text, "[\"native.add\",\"native.echo\",\"native.fail\",\"native.fib\",\"native.fib_tree\","
                              "\"native.incr\",\"native.noop\",\"native.pg_aggregate\",\"native.pg_bulk_delete\","
                              "\"native.pg_bulk_insert\",\"native.pg_bulk_upsert\",\"native.retry_n\","
                              "\"native.sleep_ms\",\"native.xsum\"]");
    free(text);
    /* bsearch in task_registry_find depends on the order. */
    for (size_t i = 1; i < json_array_size(names); i++)
        assert_true(strcmp(json_string_value(json_array_get(names, i - 1)),
                           json_string_value(json_array_get(names, i))) < 0);
    for (size_t i = 0; i < json_array_size(names); i++) {
        const char *name = json_string_value(json_array_get(names, i));
        const struct task_def *t = task_registry_find(name);
        assert_non_null(t);
        assert_string_equal(t->name, name);
        assert_non_null(t->fn);
        assert_non_null(t->params);
        assert_non_null(t->doc);
    }
    json_decref(names);
    assert_null(task_registry_find("native.nosuch"));
    assert_null(task_registry_find("native"));
    assert_null(task_registry_find(""));
    assert_null(task_registry_find("tasks.add"));
    assert_null(task_registry_find(NULL));
}

/* Every declared parameter list must parse: a bad one would fail every call with SystemError, so a call with
 * an unknown keyword must come back as the ordinary TypeError. */
static void check_params_parse(const struct task_def *task, void *arg)
{
    (void)arg;
    if (strstr(task->params, "**"))
        return; /* accepts any keyword */
    struct task_ctx ctx = {0};
    json_t *args = json_array(), *kwargs = json_pack("{s:i}", "zz_unknown", 1), *result = NULL;
    assert_int_equal(task_invoke(task, &ctx, args, kwargs, &result), TASK_FAILURE);
    assert_string_equal(ctx.exc_type, "TypeError");
    assert_non_null(strstr(ctx.exc_message, "got an unexpected keyword argument 'zz_unknown'"));
    assert_null(result);
    task_ctx_reset(&ctx);
    json_decref(args);
    json_decref(kwargs);
}

static void test_registry_params_parse(void **state)
{
    (void)state;
    task_registry_each(check_params_parse, NULL);
}

/* ---- binder ---- */

/* Records what the binder passed, as text. */
static char *seen_args, *seen_kwargs;

static enum task_outcome recorder(struct task_ctx *ctx, json_t *args, json_t *kwargs, json_t **result)
{
    (void)ctx;
    free(seen_args);
    free(seen_kwargs);
    seen_args = dump(args);
    seen_kwargs = dump(kwargs);
    *result = json_string("ran");
    return TASK_SUCCESS;
}

struct bind_case {
    const char *name, *params, *args, *kwargs;
    const char *error;                       /* TypeError message, or NULL when the call binds */
    const char *want_args, *want_kwargs;     /* what the task received, when it binds */
};

static const struct bind_case bind_cases[] = {
    /* The error messages are CPython 3.11's for a function declared with the same parameters. */
    {"native.add", "x, y", "[1, 2]", "{}", NULL, "[1,2]", "NULL"},
    {"native.add", "x, y", "[1]", "{\"y\": 2}", NULL, "[1,2]", "NULL"},
    {"native.add", "x, y", "[]", "{\"y\": 2, \"x\": 1}", NULL, "[1,2]", "NULL"},
    {"native.add", "x, y", "[]", "{}", "add() missing 2 required positional arguments: 'x' and 'y'", NULL, NULL},
    {"native.add", "x, y", "[1]", "{}", "add() missing 1 required positional argument: 'y'", NULL, NULL},
    {"native.add", "x, y", "[]", "{\"y\": 1}", "add() missing 1 required positional argument: 'x'", NULL, NULL},
    {"native.add", "x, y", "[1, 2, 3]", "{}", "add() takes 2 positional arguments but 3 were given", NULL, NULL},
    {"native.add", "x, y", "[1, 2]", "{\"z\": 1}", "add() got an unexpected keyword argument 'z'", NULL, NULL},
    {"native.add", "x, y", "[1]", "{\"x\": 2}", "add() got multiple values for argument 'x'", NULL, NULL},
    {"native.add", "x, y", "[1, 2]", "{\"x\": 2}", "add() got multiple values for argument 'x'", NULL, NULL},
    /* Keywords are checked before the positional count, in the order the caller gave them. */
    {"native.add", "x, y", "[1, 2, 3]", "{\"x\": 1}", "add() got multiple values for argument 'x'", NULL, NULL},
    {"native.add", "x, y", "[1, 2, 3]", "{\"z\": 1}", "add() got an unexpected keyword argument 'z'", NULL, NULL},
    {"native.add", "x, y", "[]", "{\"z\": 1, \"x\": 2}", "add() got an unexpected keyword argument 'z'", NULL, NULL},
    {"native.add", "x, y", "[1]", "{\"x\": 1, \"z\": 2}", "add() got multiple values for argument 'x'", NULL, NULL},
    {"native.fib", "n", "[1, 2]", "{}", "fib() takes 1 positional argument but 2 were given", NULL, NULL},
    {"native.fib", "n", "[]", "{\"n\": 5}", NULL, "[5]", "NULL"},
    {"native.fib", "n", "[]", "{\"n\": 1, \"n2\": 2}", "fib() got an unexpected keyword argument 'n2'", NULL, NULL},
    {"native.noop", "", "[]", "{}", NULL, "[]", "NULL"},
    {"native.noop", "", "[1]", "{}", "noop() takes 0 positional arguments but 1 was given", NULL, NULL},
    {"native.noop", "", "[1, 2]", "{}", "noop() takes 0 positional arguments but 2 were given", NULL, NULL},
    {"native.noop", "", "[]", "{\"a\": 1}", "noop() got an unexpected keyword argument 'a'", NULL, NULL},
    {"native.noop", "", "[1]", "{\"a\": 1}", "noop() got an unexpected keyword argument 'a'", NULL, NULL},
    {"x.tr", "a, b, c", "[]", "{}", "tr() missing 3 required positional arguments: 'a', 'b', and 'c'", NULL, NULL},
    {"x.tr", "a, b, c", "[1]", "{}", "tr() missing 2 required positional arguments: 'b' and 'c'", NULL, NULL},
    {"x.tr", "a, b, c", "[]", "{\"b\": 1}", "tr() missing 2 required positional arguments: 'a' and 'c'", NULL, NULL},
    /* Defaults. */
    {"x.fd", "x, y=1", "[5]", "{}", NULL, "[5,1]", "NULL"},
    {"x.fd", "x, y=1", "[5, 6]", "{}", NULL, "[5,6]", "NULL"},
    {"x.fd", "x, y=1", "[]", "{\"x\": 5}", NULL, "[5,1]", "NULL"},
    {"x.fd", "x, y=1", "[]", "{}", "fd() missing 1 required positional argument: 'x'", NULL, NULL},
    {"x.fd", "x, y=1", "[1, 2, 3]", "{}", "fd() takes from 1 to 2 positional arguments but 3 were given", NULL, NULL},
    {"x.fd", "x, y=1", "[1, 2, 3]", "{\"z\": 1}", "fd() got an unexpected keyword argument 'z'", NULL, NULL},
    {"x.fd2", "x, y=1, z=2", "[1, 2, 3, 4]", "{}", "fd2() takes from 1 to 3 positional arguments but 4 were given",
     NULL, NULL},
    {"x.fd3", "a=None, b=True, c=\"s\", d=2.5, e=[1]", "[]", "{\"c\": 0}", NULL, "[null,true,0,2.5,[1]]", "NULL"},
    {"x.fd4", "a=1", "[]", "{}", NULL, "[1]", "NULL"},
    {"x.fd4", "a=1", "[1, 2]", "{}", "fd4() takes from 0 to 1 positional arguments but 2 were given", NULL, NULL},
    /* Variadics: *args, **kwargs gets the caller's containers as they are. */
    {"native.echo", "*args, **kwargs", "[1, \"a\"]", "{\"k\": null}", NULL, "[1,\"a\"]", "{\"k\":null}"},
    {"native.echo", "*args, **kwargs", "[]", "{}", NULL, "[]", "{}"},
    {"native.echo", "*args, **kwargs", NULL, NULL, NULL, "[]", "{}"},
    {"x.va", "*args", "[1, 2]", "{}", NULL, "[1,2]", "NULL"},
    {"x.va", "*args", "[1, 2]", "{\"k\": 1}", "va() got an unexpected keyword argument 'k'", NULL, NULL},
    {"x.vk", "**kw", "[]", "{\"k\": 1}", NULL, "[]", "{\"k\":1}"},
    {"x.vk", "**kw", "[1]", "{}", "vk() takes 0 positional arguments but 1 was given", NULL, NULL},
    {"x.mix", "x, *rest", "[1, 2, 3]", "{}", NULL, "[1,2,3]", "NULL"},
    {"x.mix", "x, *rest", "[]", "{}", "mix() missing 1 required positional argument: 'x'", NULL, NULL},
    {"x.mix", "x, *rest", "[1, 2]", "{\"x\": 0}", "mix() got multiple values for argument 'x'", NULL, NULL},
    {"x.mixk", "x, **kw", "[]", "{\"a\": 1, \"x\": 2, \"b\": 3}", NULL, "[2]", "{\"a\":1,\"b\":3}"},
    {"x.mixk", "x, **kw", "[1]", "{}", NULL, "[1]", "{}"},
    {"x.mixk", "x, **kw", "[1, 2]", "{}", "mixk() takes 1 positional argument but 2 were given", NULL, NULL},
    /* Containers of the wrong type. */
    {"native.add", "x, y", "{}", "{}", "add() argument after * must be a list, not dict", NULL, NULL},
    {"native.add", "x, y", "\"ab\"", "{}", "add() argument after * must be a list, not str", NULL, NULL},
    {"native.add", "x, y", "5", "{}", "add() argument after * must be an iterable, not int", NULL, NULL},
    {"native.add", "x, y", "null", "{}", "add() argument after * must be an iterable, not NoneType", NULL, NULL},
    {"native.add", "x, y", "[1, 2]", "[1]", "add() argument after ** must be a mapping, not list", NULL, NULL},
    {"native.add", "x, y", "[1, 2]", "\"s\"", "add() argument after ** must be a mapping, not str", NULL, NULL},
    {"native.add", "x, y", "[1, 2]", "5", "add() argument after ** must be a mapping, not int", NULL, NULL},
    /* A NULL kwargs is an empty one; so is a NULL args. */
    {"native.add", "x, y", "[1, 2]", NULL, NULL, "[1,2]", "NULL"},
    {"nodots", "", NULL, NULL, NULL, "[]", "NULL"},
    {"nodots", "", "[1]", NULL, "nodots() takes 0 positional arguments but 1 was given", NULL, NULL},
};

static void test_binder_table(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof bind_cases / sizeof bind_cases[0]; i++) {
        const struct bind_case *c = &bind_cases[i];
        struct task_def def = {.name = c->name, .fn = recorder, .params = c->params, .doc = "test"};
        struct task_ctx ctx = {0};
        json_t *args = parse(c->args), *kwargs = parse(c->kwargs), *result = NULL;
        free(seen_args);
        free(seen_kwargs);
        seen_args = seen_kwargs = NULL;
        enum task_outcome out = task_invoke(&def, &ctx, args, kwargs, &result);
        if (c->error) {
            if (out != TASK_FAILURE || strcmp(ctx.exc_type, "TypeError") != 0 ||
                strcmp(ctx.exc_message, c->error) != 0)
                fail_msg("case %zu (%s(%s) with %s %s): want TypeError <%s>, got %d %s <%s>", i, c->name, c->params,
                         c->args, c->kwargs, c->error, (int)out, ctx.exc_type,
                         ctx.exc_message ? ctx.exc_message : "");
            assert_null(seen_args); /* the task never ran */
            assert_null(result);
        } else {
            if (out != TASK_SUCCESS)
                fail_msg("case %zu (%s(%s) with %s %s): failed with %s <%s>", i, c->name, c->params, c->args,
                         c->kwargs, ctx.exc_type, ctx.exc_message);
            assert_string_equal(seen_args, c->want_args);
            assert_string_equal(seen_kwargs, c->want_kwargs);
            assert_string_equal(json_string_value(result), "ran");
        }
        json_decref(result);
        json_decref(args);
        json_decref(kwargs);
        task_ctx_reset(&ctx);
    }
    free(seen_args);
    free(seen_kwargs);
    seen_args = seen_kwargs = NULL;
}

static void test_binder_malformed_params(void **state)
{
    (void)state;
    static const char *const bad[] = {
        "x,", ",x", "x y", "1x", "x, x", "x=1, y", "*args, x", "**kw, x", "*a, *b", "**a, **b", "x=", "***a", "x=(1",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        struct task_def def = {.name = "x.bad", .fn = recorder, .params = bad[i], .doc = "test"};
        struct task_ctx ctx = {0};
        json_t *args = json_array(), *result = NULL;
        assert_int_equal(task_invoke(&def, &ctx, args, NULL, &result), TASK_FAILURE);
        /* "x=(1" parses but its default is not a literal: still SystemError, at call time. */
        if (strcmp(ctx.exc_type, "SystemError") != 0)
            fail_msg("params <%s>: want SystemError, got %s <%s>", bad[i], ctx.exc_type, ctx.exc_message);
        assert_null(result);
        task_ctx_reset(&ctx);
        json_decref(args);
    }
}

static enum task_outcome fails_silently(struct task_ctx *ctx, json_t *args, json_t *kwargs, json_t **result)
{
    (void)ctx;
    (void)args;
    (void)kwargs;
    *result = json_string("half-built"); /* must be released by the binder, not leaked */
    return TASK_FAILURE;
}

static void test_binder_task_failing_without_exception(void **state)
{
    (void)state;
    struct task_def def = {.name = "x.quiet", .fn = fails_silently, .params = "", .doc = "test"};
    struct task_ctx ctx = {0};
    json_t *result = NULL;
    assert_int_equal(task_invoke(&def, &ctx, NULL, NULL, &result), TASK_FAILURE);
    assert_null(result);
    assert_string_equal(ctx.exc_type, "SystemError");
    assert_string_equal(ctx.exc_message, "quiet() failed without setting an exception");
    task_ctx_reset(&ctx);
}

static void test_task_fail_and_reset(void **state)
{
    (void)state;
    struct task_ctx ctx = {0};
    assert_int_equal(task_fail(&ctx, "ValueError", "boom %d %s", 1, "x"), TASK_FAILURE);
    assert_string_equal(ctx.exc_type, "ValueError");
    assert_string_equal(ctx.exc_message, "boom 1 x");
    /* A second failure replaces the first (no leak under ASan). */
    task_fail(&ctx, "TypeError", "%s", "again");
    assert_string_equal(ctx.exc_type, "TypeError");
    assert_string_equal(ctx.exc_message, "again");
    /* An over-long type name is cut to fit, still terminated. */
    char longname[200];
    memset(longname, 'E', sizeof longname - 1);
    longname[sizeof longname - 1] = '\0';
    task_fail(&ctx, longname, "m");
    assert_int_equal(strlen(ctx.exc_type), sizeof ctx.exc_type - 1);
    task_ctx_reset(&ctx);
    assert_null(ctx.exc_message);
    assert_string_equal(ctx.exc_type, "");
    task_ctx_reset(&ctx); /* twice is harmless */
}

static void test_pytype(void **state)
{
    (void)state;
    static const struct {
        const char *json, *want;
    } cases[] = {
        {"null", "NoneType"}, {"true", "bool"}, {"false", "bool"}, {"1", "int"},    {"1.5", "float"},
        {"\"s\"", "str"},     {"[]", "list"},   {"{}", "dict"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        json_t *v = parse(cases[i].json);
        assert_string_equal(task_pytype(v), cases[i].want);
        json_decref(v);
    }
    assert_string_equal(task_pytype(NULL), "NoneType");
}

/* ---- built-ins, called through the registry and the binder as the worker calls them ---- */

struct call_case {
    const char *task, *args, *kwargs;
    const char *want;     /* JSON of the result on success ("NULL" for None) */
    const char *exc_type; /* on failure */
    const char *message;
};

static const struct call_case call_cases[] = {
    {"native.noop", "[]", "{}", "NULL", NULL, NULL},
    {"native.add", "[1, 2]", "{}", "3", NULL, NULL},
    {"native.add", "[-5, 2]", "{}", "-3", NULL, NULL},
    {"native.add", "[1.5, 2]", "{}", "3.5", NULL, NULL},
    {"native.add", "[2, 0.25]", "{}", "2.25", NULL, NULL},
    {"native.add", "[0.1, 0.2]", "{}", "0.30000000000000004", NULL, NULL},
    {"native.add", "[true, 1]", "{}", "2", NULL, NULL}, /* Python: True + 1 == 2 */
    {"native.add", "[true, true]", "{}", "2", NULL, NULL},
    {"native.add", "[false, 1.5]", "{}", "1.5", NULL, NULL},
    {"native.add", "[]", "{\"x\": 1, \"y\": 2}", "3", NULL, NULL},
    {"native.add", "[9223372036854775806, 1]", "{}", "9223372036854775807", NULL, NULL},
    {"native.add", "[-9223372036854775808, 0]", "{}", "-9223372036854775808", NULL, NULL},
    {"native.add", "[9223372036854775807, 1]", "{}", NULL, "OverflowError",
     "add(): 9223372036854775807 + 1 does not fit in a 64-bit integer"},
    {"native.add", "[-9223372036854775808, -1]", "{}", NULL, "OverflowError",
     "add(): -9223372036854775808 + -1 does not fit in a 64-bit integer"},
    {"native.add", "[1e308, 1e308]", "{}", NULL, "OverflowError",
     "add(): float result out of range (JSON cannot carry inf)"},
    {"native.add", "[1, \"a\"]", "{}", NULL, "TypeError", "unsupported operand type(s) for +: 'int' and 'str'"},
    {"native.add", "[\"a\", \"b\"]", "{}", NULL, "TypeError", "unsupported operand type(s) for +: 'str' and 'str'"},
    {"native.add", "[null, 1.5]", "{}", NULL, "TypeError",
     "unsupported operand type(s) for +: 'NoneType' and 'float'"},
    {"native.add", "[[1], {}]", "{}", NULL, "TypeError", "unsupported operand type(s) for +: 'list' and 'dict'"},
    {"native.add", "[1]", "{}", NULL, "TypeError", "add() missing 1 required positional argument: 'y'"},
    {"native.add", "[1, 2, 3]", "{}", NULL, "TypeError", "add() takes 2 positional arguments but 3 were given"},
    {"native.echo", "[1, \"x\"]", "{\"a\": [true, null]}", "{\"args\": [1, \"x\"], \"kwargs\": {\"a\": [true, null]}}",
     NULL, NULL},
    {"native.echo", "[]", "{}", "{\"args\":[],\"kwargs\":{}}", NULL, NULL},
    {"native.fib", "[0]", "{}", "0", NULL, NULL},
    {"native.fib", "[1]", "{}", "1", NULL, NULL},
    {"native.fib", "[2]", "{}", "1", NULL, NULL},
    {"native.fib", "[10]", "{}", "55", NULL, NULL},
    {"native.fib", "[25]", "{}", "75025", NULL, NULL},
    {"native.fib", "[true]", "{}", "1", NULL, NULL},
    {"native.fib", "[93]", "{}", NULL, "ValueError", "fib() argument must be between 0 and 92, got 93"},
    {"native.fib", "[-1]", "{}", NULL, "ValueError", "fib() argument must be between 0 and 92, got -1"},
    {"native.fib", "[9223372036854775807]", "{}", NULL, "ValueError",
     "fib() argument must be between 0 and 92, got 9223372036854775807"},
    {"native.fib", "[1.5]", "{}", NULL, "TypeError", "'float' object cannot be interpreted as an integer"},
    {"native.fib", "[\"3\"]", "{}", NULL, "TypeError", "'str' object cannot be interpreted as an integer"},
    {"native.fib", "[null]", "{}", NULL, "TypeError", "'NoneType' object cannot be interpreted as an integer"},
    {"native.fib", "[]", "{}", NULL, "TypeError", "fib() missing 1 required positional argument: 'n'"},
    {"native.sleep_ms", "[0]", "{}", "0", NULL, NULL},
    {"native.sleep_ms", "[1.5]", "{}", "1.5", NULL, NULL},
    {"native.sleep_ms", "[-1]", "{}", NULL, "ValueError", "sleep length must be non-negative"},
    {"native.sleep_ms", "[\"1\"]", "{}", NULL, "TypeError", "'str' object cannot be interpreted as an integer"},
    {"native.sleep_ms", "[1e300]", "{}", NULL, "OverflowError", "sleep length is too large"},
    {"native.fail", "[\"boom 1\"]", "{}", NULL, "ValueError", "boom 1"},
    {"native.fail", "[]", "{\"message\": \"h\\u00e9 \\\"q\\\"\\n\"}", NULL, "ValueError", "h\303\251 \"q\"\n"},
    {"native.fail", "[\"\"]", "{}", NULL, "ValueError", ""},
    {"native.fail", "[42]", "{}", NULL, "ValueError", "42"},
    {"native.fail", "[null]", "{}", NULL, "ValueError", "None"},
    {"native.fail", "[false]", "{}", NULL, "ValueError", "False"},
    {"native.fail", "[]", "{}", NULL, "TypeError", "fail() missing 1 required positional argument: 'message'"},
    {"native.xsum", "[[1, 2, 3]]", "{}", "6", NULL, NULL},
    {"native.xsum", "[[]]", "{}", "0", NULL, NULL},
    {"native.xsum", "[[1, 2.5]]", "{}", "3.5", NULL, NULL},
    {"native.xsum", "[[0.1, 0.2, 0.3]]", "{}", "0.6000000000000001", NULL, NULL}, /* left to right, as Python 3.11 */
    {"native.xsum", "[[true, true, 1]]", "{}", "3", NULL, NULL},
    /* Only the total has to fit, as with Python's big ints. */
    {"native.xsum", "[[9223372036854775807, 1, -1]]", "{}", "9223372036854775807", NULL, NULL},
    {"native.xsum", "[[9223372036854775807, 1]]", "{}", NULL, "OverflowError",
     "xsum(): the total does not fit in a 64-bit integer"},
    {"native.xsum", "[[-9223372036854775808, -1]]", "{}", NULL, "OverflowError",
     "xsum(): the total does not fit in a 64-bit integer"},
    /* The exact int total is converted once, like Python's int + float. */
    {"native.xsum", "[[9223372036854775807, 9223372036854775807, 0.5]]", "{}", "1.8446744073709552e+19", NULL, NULL},
    {"native.xsum", "[[1e308, 1e308]]", "{}", NULL, "OverflowError",
     "xsum(): float result out of range (JSON cannot carry inf)"},
    {"native.xsum", "[[1, \"a\"]]", "{}", NULL, "TypeError", "unsupported operand type(s) for +: 'int' and 'str'"},
    {"native.xsum", "[[1.5, null]]", "{}", NULL, "TypeError",
     "unsupported operand type(s) for +: 'float' and 'NoneType'"},
    {"native.xsum", "[[[1]]]", "{}", NULL, "TypeError", "unsupported operand type(s) for +: 'int' and 'list'"},
    {"native.xsum", "[5]", "{}", NULL, "TypeError", "'int' object is not iterable"},
    {"native.xsum", "[null]", "{}", NULL, "TypeError", "'NoneType' object is not iterable"},
    {"native.xsum", "[\"12\"]", "{}", NULL, "TypeError", "xsum() argument must be a list of numbers, not 'str'"},
    {"native.xsum", "[{\"a\": 1}]", "{}", NULL, "TypeError", "xsum() argument must be a list of numbers, not 'dict'"},
    {"native.xsum", "[[1], [2]]", "{}", NULL, "TypeError", "xsum() takes 1 positional argument but 2 were given"},
    /* incr checks its key before asking for a connection. */
    {"native.incr", "[null]", "{}", NULL, "DataError",
     "Invalid input of type: 'NoneType'. Convert to a bytes, string, int or float first."},
    {"native.incr", "[true]", "{}", NULL, "DataError",
     "Invalid input of type: 'bool'. Convert to a bytes, string, int or float first."},
    {"native.incr", "[]", "{}", NULL, "TypeError", "incr() missing 1 required positional argument: 'key'"},
    /* No redis service on this context at all. */
    {"native.incr", "[\"counter\"]", "{}", NULL, "ConnectionError", "no Redis connection is available to this task"},
};

static void test_builtins_table(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof call_cases / sizeof call_cases[0]; i++) {
        const struct call_case *c = &call_cases[i];
        const struct task_def *task = task_registry_find(c->task);
        assert_non_null(task);
        struct task_ctx ctx = {.task_id = "id", .task_name = c->task, .hostname = "test@host"};
        json_t *args = parse(c->args), *kwargs = parse(c->kwargs), *result = NULL;
        enum task_outcome out = task_invoke(task, &ctx, args, kwargs, &result);
        if (c->want) {
            if (out != TASK_SUCCESS)
                fail_msg("case %zu %s%s: failed with %s <%s>", i, c->task, c->args, ctx.exc_type, ctx.exc_message);
            /* Compared as values, types included (3 is not 3.0), reals exactly. */
            json_t *want = strcmp(c->want, "NULL") == 0 ? NULL : parse(c->want);
            if (want ? !json_equal(want, result) : result != NULL) {
                char *text = dump(result);
                fail_msg("case %zu %s%s: want %s, got %s", i, c->task, c->args, c->want, text);
                free(text);
            }
            json_decref(want);
        } else {
            if (out != TASK_FAILURE || strcmp(ctx.exc_type, c->exc_type) != 0 ||
                strcmp(ctx.exc_message, c->message) != 0)
                fail_msg("case %zu %s%s: want %s <%s>, got %d %s <%s>", i, c->task, c->args, c->exc_type, c->message,
                         (int)out, ctx.exc_type, ctx.exc_message ? ctx.exc_message : "");
            assert_null(result);
        }
        json_decref(result);
        json_decref(args);
        json_decref(kwargs);
        task_ctx_reset(&ctx);
    }
}

/* echo hands back the caller's very values: every JSON type, int64 bounds, exact floats, unicode with NULs. */
static void test_echo_keeps_values_exactly(void **state)
{
    (void)state;
    json_t *args = parse("[9223372036854775807, -9223372036854775808, 0.1, 1e-310, -0.0, true, false, null, "
                         "\"\\u0000\\u00e9\\ud83d\\ude00\", [], {}, [[[[{\"k\": [1.5]}]]]]]");
    json_t *kwargs = parse("{\"z\": 1, \"a\": {\"\": \"\"}, \"m\": [null]}");
    json_t *result = NULL;
    struct task_ctx ctx = {0};
    assert_int_equal(task_invoke(task_registry_find("native.echo"), &ctx, args, kwargs, &result), TASK_SUCCESS);
    assert_true(json_equal(json_object_get(result, "args"), args));
    assert_true(json_equal(json_object_get(result, "kwargs"), kwargs));
    assert_int_equal(json_object_size(result), 2);
    /* Key order is kept too (a Python client sees the same dict order). */
    char *text = dump(json_object_get(result, "kwargs"));
    assert_string_equal(text, "{\"z\":1,\"a\":{\"\":\"\"},\"m\":[null]}");
    free(text);
    /* The result holds its own references: it outlives the caller's arguments. */
    json_decref(args);
    json_decref(kwargs);
    text = dump(json_object_get(result, "args"));
    assert_non_null(strstr(text, "9223372036854775807,-9223372036854775808,"));
    free(text);
    json_decref(result);
}

static volatile sig_atomic_t alarms;

static void on_alarm(int sig)
{
    (void)sig;
    alarms++;
}

static double monotonic_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

/* Signals arriving during the sleep (without SA_RESTART, as the worker's flag handlers are) must not cut it
 * short. */
static void test_sleep_ms_resumes_after_signals(void **state)
{
    (void)state;
    struct sigaction sa = {0}, old;
    sa.sa_handler = on_alarm;
    sigemptyset(&sa.sa_mask);
    assert_int_equal(sigaction(SIGALRM, &sa, &old), 0);
    struct itimerval every5ms = {{0, 5000}, {0, 5000}}, off = {{0, 0}, {0, 0}};
    alarms = 0;
    assert_int_equal(setitimer(ITIMER_REAL, &every5ms, NULL), 0);

    json_t *args = parse("[60]"), *result = NULL;
    struct task_ctx ctx = {0};
    double start = monotonic_ms();
    enum task_outcome out = task_invoke(task_registry_find("native.sleep_ms"), &ctx, args, NULL, &result);
    double elapsed = monotonic_ms() - start;

    setitimer(ITIMER_REAL, &off, NULL);
    sigaction(SIGALRM, &old, NULL);
    assert_int_equal(out, TASK_SUCCESS);
    assert_true(json_is_integer(result));
    assert_int_equal(json_integer_value(result), 60);
    assert_true(alarms >= 2); /* the sleep really was interrupted */
    assert_true(elapsed >= 60.0);
    assert_true(elapsed < 2000.0);
    json_decref(result);
    json_decref(args);
}

/* incr against a provider that cannot connect: the provider's error is what the client sees. */
static struct redisContext *no_redis(struct task_ctx *ctx)
{
    task_fail(ctx, "ConnectionError", "cannot reach Redis at 127.0.0.1:1: Connection refused");
    return NULL;
}

/* A provider that forgets to say why. */
static struct redisContext *silent_no_redis(struct task_ctx *ctx)
{
    (void)ctx;
    return NULL;
}

static void test_incr_without_connection(void **state)
{
    (void)state;
    const struct task_def *incr = task_registry_find("native.incr");
    json_t *args = parse("[\"counter\"]"), *result = NULL;

    struct task_ctx ctx = {.redis = no_redis};
    assert_int_equal(task_invoke(incr, &ctx, args, NULL, &result), TASK_FAILURE);
    assert_string_equal(ctx.exc_type, "ConnectionError");
    assert_string_equal(ctx.exc_message, "cannot reach Redis at 127.0.0.1:1: Connection refused");
    assert_null(result);
    task_ctx_reset(&ctx);

    struct task_ctx ctx2 = {.redis = silent_no_redis};
    assert_int_equal(task_invoke(incr, &ctx2, args, NULL, &result), TASK_FAILURE);
    assert_string_equal(ctx2.exc_type, "ConnectionError");
    assert_null(result);
    task_ctx_reset(&ctx2);
    json_decref(args);
}

/* A fake Redis server: the other end of a socketpair, with the reply written before the command is sent (the
 * socket buffers both), so that incr runs against a real hiredis context without a server. */
static struct redisContext *fake_redis(struct task_ctx *ctx)
{
    return ctx->host;
}

struct incr_case {
    const char *key_json;
    const char *reply;        /* raw RESP the fake server answers with; NULL: the server hangs up */
    const char *want_command; /* raw RESP the fake server must have received (may hold NULs), or NULL */
    size_t want_command_len;
    const char *want;         /* result on success, or NULL */
    const char *exc_type, *message;
};
#define CMD(lit) lit, sizeof(lit) - 1

static const struct incr_case incr_cases[] = {
    {"\"counter\"", ":42\r\n", CMD("*2\r\n$4\r\nINCR\r\n$7\r\ncounter\r\n"), "42", NULL, NULL},
    {"\"a b\\u0000c\"", ":-3\r\n", CMD("*2\r\n$4\r\nINCR\r\n$5\r\na b\0c\r\n"), "-3", NULL, NULL}, /* binary safe */
    {"7", ":1\r\n", CMD("*2\r\n$4\r\nINCR\r\n$1\r\n7\r\n"), "1", NULL, NULL},
    {"\"k\"", ":9223372036854775807\r\n", CMD("*2\r\n$4\r\nINCR\r\n$1\r\nk\r\n"), "9223372036854775807", NULL,
     NULL},
    /* redis-py drops the code for the codes it knows and names the exception after it. */
    {"\"k\"", "-ERR value is not an integer or out of range\r\n", NULL, 0, NULL, "ResponseError",
     "value is not an integer or out of range"},
    {"\"k\"", "-WRONGTYPE Operation against a key holding the wrong kind of value\r\n", NULL, 0, NULL,
     "ResponseError", "WRONGTYPE Operation against a key holding the wrong kind of value"},
    {"\"k\"", "-READONLY You can't write against a read only replica.\r\n", NULL, 0, NULL, "ReadOnlyError",
     "You can't write against a read only replica."},
    {"\"k\"", "-NOAUTH Authentication required.\r\n", NULL, 0, NULL, "AuthenticationError",
     "Authentication required."},
    {"\"k\"", "+OK\r\n", NULL, 0, NULL, "ResponseError", "unexpected reply type 5 to INCR"},
    {"\"k\"", NULL, NULL, 0, NULL, "ConnectionError", "Connection closed by server."},
};

static void test_incr_against_fake_server(void **state)
{
    (void)state;
    const struct task_def *incr = task_registry_find("native.incr");
    for (size_t i = 0; i < sizeof incr_cases / sizeof incr_cases[0]; i++) {
        const struct incr_case *c = &incr_cases[i];
        int sv[2];
        assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
        if (c->reply)
            assert_int_equal(write(sv[1], c->reply, strlen(c->reply)), (ssize_t)strlen(c->reply));
        else
            shutdown(sv[1], SHUT_WR); /* the server hangs up: hiredis reads EOF */
        redisContext *rc = redisConnectFd(sv[0]);
        assert_non_null(rc);

        char *key_array = NULL;
        assert_true(asprintf(&key_array, "[%s]", c->key_json) > 0);
        json_t *args = parse(key_array), *result = NULL;
        free(key_array);
        struct task_ctx ctx = {.redis = fake_redis, .host = rc};
        enum task_outcome out = task_invoke(incr, &ctx, args, NULL, &result);
        if (c->want) {
            if (out != TASK_SUCCESS)
                fail_msg("incr case %zu: failed with %s <%s>", i, ctx.exc_type, ctx.exc_message);
            char *text = dump(result);
            assert_string_equal(text, c->want);
            free(text);
        } else {
            assert_int_equal(out, TASK_FAILURE);
            assert_string_equal(ctx.exc_type, c->exc_type);
            if (c->message)
                assert_string_equal(ctx.exc_message, c->message);
            assert_null(result);
        }
        if (c->want_command) {
            char got[256];
            ssize_t n = read(sv[1], got, sizeof got);
            assert_int_equal(n, (ssize_t)c->want_command_len);
            assert_memory_equal(got, c->want_command, c->want_command_len);
        }
        json_decref(result);
        json_decref(args);
        task_ctx_reset(&ctx);
        redisFree(rc); /* closes sv[0] */
        close(sv[1]);
    }
}

/* Where the raw_param's text is in a body: by position, by keyword, or nowhere (then the body is parsed whole). */
static void test_raw_arg_locate(void **state)
{
    (void)state;
    static const struct task_def def = {.name = "x.bulk", .fn = recorder, .params = "table, rows, n=1",
                                        .raw_param = "rows"};
    static const struct {
        const char *body;
        const char *want; /* the span's text, NULL: not found */
    } cases[] = {
        {"[[\"t\", [[1, \"a]\"], [2, \"{\\\"\"]], 5], {}, {}]", "[[1, \"a]\"], [2, \"{\\\"\"]]"},
        {"[ [ \"t\" , {\"k\": [1]} ] , {} , {} ]", "{\"k\": [1]}"},
        {"[[\"t\", 42], {}, {}]", "42"},
        {"[[\"t\", null], {}, {}]", "null"},
        {"[[\"t\"], {\"n\": 2, \"rows\": [[1], [2]]}, {}]", "[[1], [2]]"},
        {"[[\"t\"], {\"rows_x\": 1, \"rows\": \"s\"}, {}]", "\"s\""},
        {"[[\"t\"], {\"n\": 2}, {}]", NULL},
        {"{\"args\": [\"t\", [1]]}", NULL}, /* v1: parsed whole */
        {"[[\"t\", [1, 2", NULL},              /* truncated */
        {"[[\"t\", \"unterminated], {}, {}]", NULL},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        size_t start = 0, end = 0;
        const char *b = cases[i].body;
        bool found = task_raw_arg_locate(&def, b, strlen(b), &start, &end);
        if (!cases[i].want) {
            assert_false(found);
            continue;
        }
        assert_true(found);
        assert_int_equal(end - start, strlen(cases[i].want));
        assert_memory_equal(b + start, cases[i].want, end - start);
    }
    static const struct task_def plain = {.name = "x.plain", .fn = recorder, .params = "rows"};
    size_t start, end;
    assert_false(task_raw_arg_locate(&plain, "[[[1]], {}, {}]", 15, &start, &end));

    /* Long lists, skipped 64 bytes at a time: blocks that start inside strings, on brackets and quotes, and
     * blocks with escapes (byte by byte from there on), every piece at every offset. */
    static const char *const pieces[] = {"[1, \"a,]\"]", "{\"k[\": [[], {}], \"v\": \"}\"}", "\"]]]]}}}\"",
                                         "[[[\",\"]]]", "17", "\"0123456789abcdefghijklmnopqrstuvwxyz,[]{}0123456\""};
    static char body[32768], rows[32768];
    for (size_t shift = 0; shift < 70; shift += 1) {
        for (int escapes = 0; escapes < 2; escapes++) {
            size_t n = (size_t)snprintf(rows, sizeof rows, "[%*s", (int)shift, "");
            for (size_t i = 0; i < 200; i++) {
                const char *piece = escapes && i == 150 ? "\"\\\"]\\\\\"" : pieces[(i * 5 + shift) % 6];
                n += (size_t)snprintf(rows + n, sizeof rows - n, "%s%s", i ? "," : "", piece);
            }
            n += (size_t)snprintf(rows + n, sizeof rows - n, "]");
            size_t len = (size_t)snprintf(body, sizeof body, "[[\"t\", %s, 5], {}, {}]", rows);
            assert_true(task_raw_arg_locate(&def, body, len, &start, &end));
            assert_int_equal(end - start, n);
            assert_memory_equal(body + start, rows, n);
            /* Cut inside the list: not found (the body is then parsed whole, and refused). */
            assert_false(task_raw_arg_locate(&def, body, 7 + n - 1 - shift % 50, &start, &end));
        }
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_registry_lists_the_builtins_in_order),
        cmocka_unit_test(test_registry_params_parse),
        cmocka_unit_test(test_binder_table),
        cmocka_unit_test(test_binder_malformed_params),
        cmocka_unit_test(test_binder_task_failing_without_exception),
        cmocka_unit_test(test_task_fail_and_reset),
        cmocka_unit_test(test_pytype),
        cmocka_unit_test(test_builtins_table),
        cmocka_unit_test(test_echo_keeps_values_exactly),
        cmocka_unit_test(test_sleep_ms_resumes_after_signals),
        cmocka_unit_test(test_incr_without_connection),
        cmocka_unit_test(test_incr_against_fake_server),
        cmocka_unit_test(test_raw_arg_locate),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
