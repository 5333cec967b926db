/* task: failures on the task context, and the binder that matches a caller's args/kwargs to a task's declared
 * parameters the way CPython 3.11 does, so that a wrong call fails with the TypeError a Python worker would
 * have raised.
 *
 * Runs in pool children (one task at a time per process); no globals. */
#include "task.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* More than any built-in needs; a params string with more is treated as malformed. */
#define TASK_MAX_PARAMS 16

struct param {
    const char *name; /* points into task->params; not NUL-terminated at len */
    size_t len;
    const char *dflt; /* default's text (points into task->params), NULL when the parameter is required */
    size_t dflt_len;
};

/* A parsed params string. Parsed on every call: the strings are a handful of bytes, and keeping the task
 * table const (no lazily filled caches) keeps it safe to share across fork. */
struct signature {
    struct param pos[TASK_MAX_PARAMS];
    int npos;      /* named positional parameters */
    int nrequired; /* the leading ones that have no default */
    bool varargs;  /* declares *name */
    bool varkw;    /* declares **name */
};

static void die_oom(void)
{
    fputs("celeriac: out of memory\n", stderr);
    abort();
}

enum task_outcome task_fail(struct task_ctx *ctx, const char *exc_type, const char *fmt, ...)
{
    char *msg = NULL;
    va_list ap;
    va_start(ap, fmt);
    int n = vasprintf(&msg, fmt, ap);
    va_end(ap);
    /* Same policy as buf.c: a worker that cannot allocate a message cannot write a truthful result. */
    if (n < 0)
        die_oom();
    free(ctx->exc_message);
    ctx->exc_message = msg;
    snprintf(ctx->exc_type, sizeof ctx->exc_type, "%s", exc_type);
    return TASK_FAILURE;
}

void task_ctx_reset(struct task_ctx *ctx)
{
    free(ctx->exc_message);
    ctx->exc_message = NULL;
    ctx->exc_type[0] = '\0';
    json_decref(ctx->subtasks);
    ctx->subtasks = NULL;
    json_decref(ctx->continuation);
    ctx->continuation = NULL;
}

enum task_outcome task_retry(struct task_ctx *ctx, double countdown, long long max_retries, const char *exc_type,
                             const char *fmt, ...)
{
    free(ctx->exc_message);
    ctx->exc_message = NULL;
    ctx->exc_type[0] = '\0';
    if (exc_type)
        snprintf(ctx->exc_type, sizeof ctx->exc_type, "%s", exc_type);
    if (fmt) {
        va_list ap;
        va_start(ap, fmt);
        if (vasprintf(&ctx->exc_message, fmt, ap) < 0)
            die_oom();
        va_end(ap);
    }
    ctx->retry_countdown = countdown > 0 ? countdown : 0;
    ctx->retry_max = max_retries;
    return TASK_RETRY;
}

static json_t *signature_new(const char *name, json_t *args, json_t *kwargs)
{
    return json_pack("{s:s, s:o, s:o, s:{}, s:n, s:b}", "task", name, "args", args ? args : json_array(), "kwargs",
                     kwargs ? kwargs : json_object(), "options", "subtask_type", "immutable", 0);
}

int task_subtask(struct task_ctx *ctx, const char *name, json_t *args, json_t *kwargs)
{
    if (!name || (args && !json_is_array(args)) || (kwargs && !json_is_object(kwargs))) {
        json_decref(args);
        json_decref(kwargs);
        return -1;
    }
    json_t *sig = signature_new(name, args, kwargs); /* steals args and kwargs, even on failure */
    if (!sig)
        die_oom();
    if (!ctx->subtasks)
        ctx->subtasks = json_array();
    json_array_append_new(ctx->subtasks, sig);
    return 0;
}

enum task_outcome task_continue_with(struct task_ctx *ctx, const char *name, json_t *extra_args)
{
    if (extra_args && !json_is_array(extra_args)) {
        json_decref(extra_args);
        extra_args = NULL;
    }
    json_decref(ctx->continuation);
    ctx->continuation = signature_new(name, extra_args, NULL);
    if (!ctx->continuation)
        die_oom();
    return TASK_REPLACED;
}

const char *task_pytype(const json_t *value)
{
    switch (value ? json_typeof(value) : JSON_NULL) {
    case JSON_OBJECT: return "dict";
    case JSON_ARRAY: return "list";
    case JSON_STRING: return "str";
    case JSON_INTEGER: return "int";
    case JSON_REAL: return "float";
    case JSON_TRUE:
    case JSON_FALSE: return "bool";
    case JSON_NULL: break;
    }
    return "NoneType";
}

static bool is_ident_start(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
}

static bool is_ident_char(char c)
{
    return is_ident_start(c) || (c >= '0' && c <= '9');
}

static bool is_space(char c)
{
    return c == ' ' || c == '\t';
}

/* Parses one comma-free item [start, end) into sig. Returns 0, or -1 when it breaks the grammar. */
static int parse_item(struct signature *sig, const char *start, const char *end)
{
    while (start < end && is_space(*start))
        start++;
    while (end > start && is_space(end[-1]))
        end--;
    int stars = 0;
    while (start < end && *start == '*' && stars < 2) {
        start++;
        stars++;
    }
    const char *name = start;
    if (start == end || !is_ident_start(*start))
        return -1;
    while (start < end && is_ident_char(*start))
        start++;
    size_t len = (size_t)(start - name);

    if (stars == 2) {
        if (start != end || sig->varkw)
            return -1;
        sig->varkw = true;
        return 0;
    }
    /* Nothing but **kwargs may follow *args: keyword-only parameters are not supported. */
    if (sig->varkw || sig->varargs)
        return -1;
    if (stars == 1) {
        if (start != end)
            return -1;
        sig->varargs = true;
        return 0;
    }
    if (sig->npos == TASK_MAX_PARAMS)
        return -1;
    struct param *p = &sig->pos[sig->npos];
    p->name = name;
    p->len = len;
    p->dflt = NULL;
    p->dflt_len = 0;
    while (start < end && is_space(*start))
        start++;
    if (start < end) {
        if (*start != '=')
            return -1;
        start++;
        while (start < end && is_space(*start))
            start++;
        if (start == end)
            return -1;
        p->dflt = start;
        p->dflt_len = (size_t)(end - start);
    } else if (sig->nrequired != sig->npos) {
        return -1; /* a required parameter after one with a default: Python's SyntaxError */
    }
    if (!p->dflt)
        sig->nrequired++;
    for (int i = 0; i < sig->npos; i++)
        if (sig->pos[i].len == len && memcmp(sig->pos[i].name, name, len) == 0)
            return -1;
    sig->npos++;
    return 0;
}

/* Returns 0, or -1 when params is malformed. params is borrowed and must outlive sig. */
static int parse_signature(const char *params, struct signature *sig)
{
    memset(sig, 0, sizeof *sig);
    const char *p = params ? params : "";
    while (is_space(*p))
        p++;
    if (*p == '\0')
        return 0;
    for (;;) {
        const char *comma = strchr(p, ',');
        const char *end = comma ? comma : p + strlen(p);
        if (parse_item(sig, p, end) < 0)
            return -1;
        if (!comma)
            return 0;
        p = comma + 1;
    }
}

bool task_params_valid(const char *params)
{
    struct signature sig;
    return parse_signature(params, &sig) == 0;
}

/* Returns a new reference for the default text, or NULL when it is not a literal we understand. */
static json_t *parse_default(const struct param *p)
{
    static const struct {
        const char *py;
        const char *json;
    } words[] = {{"None", "null"}, {"True", "true"}, {"False", "false"}};
    for (size_t i = 0; i < sizeof words / sizeof words[0]; i++)
        if (strlen(words[i].py) == p->dflt_len && memcmp(words[i].py, p->dflt, p->dflt_len) == 0)
            return json_loads(words[i].json, JSON_DECODE_ANY, NULL);
    return json_loadb(p->dflt, p->dflt_len, JSON_DECODE_ANY, NULL);
}

/* The function name Python would print: the task name after its last '.'. Borrowed from task->name. */
static const char *short_name(const struct task_def *task)
{
    const char *dot = strrchr(task->name, '.');
    return dot ? dot + 1 : task->name;
}

static int find_param(const struct signature *sig, const char *key)
{
    size_t len = strlen(key);
    for (int i = 0; i < sig->npos; i++)
        if (sig->pos[i].len == len && memcmp(sig->pos[i].name, key, len) == 0)
            return i;
    return -1;
}

static enum task_outcome fail_too_many(struct task_ctx *ctx, const char *fname, const struct signature *sig,
                                       size_t given)
{
    const char *verb = given == 1 ? "was" : "were";
    if (sig->nrequired < sig->npos)
        return task_fail(ctx, "TypeError", "%s() takes from %d to %d positional arguments but %zu %s given", fname,
                         sig->nrequired, sig->npos, given, verb);
    return task_fail(ctx, "TypeError", "%s() takes %d positional argument%s but %zu %s given", fname, sig->npos,
                     sig->npos == 1 ? "" : "s", given, verb);
}

/* CPython lists missing names as 'x', 'x' and 'y', or 'a', 'b', and 'c'. */
static enum task_outcome fail_missing(struct task_ctx *ctx, const char *fname, const struct signature *sig,
                                      json_t *const *bound)
{
    int missing[TASK_MAX_PARAMS];
    int n = 0;
    for (int i = 0; i < sig->nrequired; i++)
        if (!bound[i])
            missing[n++] = i;
    /* Each name is at most the whole params string; 8 extra bytes cover quotes and separators. */
    size_t cap = 1;
    for (int i = 0; i < n; i++)
        cap += sig->pos[missing[i]].len + 8;
    char *names = malloc(cap);
    if (!names)
        die_oom();
    size_t len = 0;
    for (int i = 0; i < n; i++) {
        const struct param *p = &sig->pos[missing[i]];
        const char *sep = "";
        if (i > 0)
            sep = i == n - 1 ? (n == 2 ? " and " : ", and ") : ", ";
        len += (size_t)snprintf(names + len, cap - len, "%s'%.*s'", sep, (int)p->len, p->name);
    }
    enum task_outcome out = task_fail(ctx, "TypeError", "%s() missing %d required positional argument%s: %s", fname,
                                      n, n == 1 ? "" : "s", names);
    free(names);
    return out;
}

/* The outcome of a task that broke its contract (failed without saying why) still has to be a failure a
 * client can read. */
static enum task_outcome call_task(const struct task_def *task, struct task_ctx *ctx, json_t *args, json_t *kwargs,
                                   json_t **result)
{
    enum task_outcome out = task->fn(ctx, args, kwargs, result);
    if (out == TASK_RETRY || (out == TASK_REPLACED && ctx->continuation)) {
        json_decref(*result);
        *result = NULL;
        return out;
    }
    if (out != TASK_SUCCESS) {
        json_decref(*result);
        *result = NULL;
        if (ctx->exc_type[0] == '\0')
            task_fail(ctx, "SystemError", "%s() failed without setting an exception", short_name(task));
        return TASK_FAILURE;
    }
    return TASK_SUCCESS;
}

enum task_outcome task_invoke(const struct task_def *task, struct task_ctx *ctx, json_t *args, json_t *kwargs,
                              json_t **result)
{
    const char *fname = short_name(task);
    struct signature sig;
    ctx->def = task;
    json_t *bound[TASK_MAX_PARAMS] = {NULL}; /* borrowed from args/kwargs, except defaults (see owned) */
    bool owned[TASK_MAX_PARAMS] = {false};
    json_t *call_args = NULL;                /* owned */
    json_t *extra_kw = NULL;                 /* owned */
    json_t *empty_args = NULL;               /* owned: stands in for a NULL args */
    enum task_outcome out = TASK_FAILURE;

    *result = NULL;
    if (parse_signature(task->params, &sig) < 0) {
        out = task_fail(ctx, "SystemError", "%s() has a malformed parameter list: '%s'", fname,
                        task->params ? task->params : "");
        goto out;
    }
    if (args && !json_is_array(args)) {
        if (json_is_string(args) || json_is_object(args))
            out = task_fail(ctx, "TypeError", "%s() argument after * must be a list, not %s", fname,
                            task_pytype(args));
        else
            out = task_fail(ctx, "TypeError", "%s() argument after * must be an iterable, not %s", fname,
                            task_pytype(args));
        goto out;
    }
    if (kwargs && !json_is_object(kwargs)) {
        out = task_fail(ctx, "TypeError", "%s() argument after ** must be a mapping, not %s", fname,
                        task_pytype(kwargs));
        goto out;
    }
    if (!args) {
        empty_args = json_array();
        if (!empty_args)
            die_oom();
        args = empty_args;
    }
    if (!kwargs && sig.varkw) {
        if (!(extra_kw = json_object()))
            die_oom();
        kwargs = extra_kw; /* empty, so it is never filled below */
    }
    size_t nargs = json_array_size(args);
    size_t nkw = kwargs ? json_object_size(kwargs) : 0;

    /* The common case, a call that matches the declaration exactly, reuses the caller's containers. */
    if (nkw == 0 && !sig.varargs && !sig.varkw && nargs == (size_t)sig.npos) {
        out = call_task(task, ctx, args, NULL, result);
        goto out;
    }
    if (sig.npos == 0 && sig.varargs && (sig.varkw || nkw == 0)) {
        out = call_task(task, ctx, args, sig.varkw ? kwargs : NULL, result);
        goto out;
    }

    size_t ncopy = nargs < (size_t)sig.npos ? nargs : (size_t)sig.npos;
    for (size_t i = 0; i < ncopy; i++)
        bound[i] = json_array_get(args, i);

    if (nkw) {
        const char *key;
        json_t *value;
        json_object_foreach(kwargs, key, value) {
            int j = find_param(&sig, key);
            if (j < 0) {
                if (!sig.varkw) {
                    out = task_fail(ctx, "TypeError", "%s() got an unexpected keyword argument '%s'", fname, key);
                    goto out;
                }
                if (!extra_kw && !(extra_kw = json_object()))
                    die_oom();
                if (json_object_set(extra_kw, key, value) < 0)
                    die_oom();
                continue;
            }
            if (bound[j]) {
                out = task_fail(ctx, "TypeError", "%s() got multiple values for argument '%s'", fname, key);
                goto out;
            }
            bound[j] = value;
        }
    }
    if (nargs > (size_t)sig.npos && !sig.varargs) {
        out = fail_too_many(ctx, fname, &sig, nargs);
        goto out;
    }
    for (int i = 0; i < sig.nrequired; i++) {
        if (!bound[i]) {
            out = fail_missing(ctx, fname, &sig, bound);
            goto out;
        }
    }
    for (int i = sig.nrequired; i < sig.npos; i++) {
        if (bound[i])
            continue;
        bound[i] = parse_default(&sig.pos[i]);
        if (!bound[i]) {
            out = task_fail(ctx, "SystemError", "%s() has a default that is not a JSON literal: '%.*s'", fname,
                            (int)sig.pos[i].dflt_len, sig.pos[i].dflt);
            goto out;
        }
        owned[i] = true;
    }

    call_args = json_array();
    if (!call_args)
        die_oom();
    for (int i = 0; i < sig.npos; i++)
        if (json_array_append(call_args, bound[i]) < 0)
            die_oom();
    for (size_t i = (size_t)sig.npos; i < nargs; i++) /* only reached with *args */
        if (json_array_append(call_args, json_array_get(args, i)) < 0)
            die_oom();
    if (sig.varkw && !extra_kw && !(extra_kw = json_object()))
        die_oom();
    out = call_task(task, ctx, call_args, extra_kw, result);

out:
    for (int i = 0; i < TASK_MAX_PARAMS; i++)
        if (owned[i])
            json_decref(bound[i]);
    json_decref(call_args);
    json_decref(extra_kw);
    json_decref(empty_args);
    return out;
}

int task_update_state(struct task_ctx *ctx, const char *state, json_t *meta)
{
    return ctx->update_state ? ctx->update_state(ctx, state, meta) : -1;
}

/* ------------------------------------------------------------------ the module API (celeriac.h) */

enum task_outcome task_return(struct task_ctx *ctx, json_t **result, json_t *value)
{
    if (!value)
        return task_fail(ctx, "MemoryError", "out of memory");
    *result = value;
    return TASK_SUCCESS;
}

json_t *task_arg(const struct task_ctx *ctx, json_t *args, const char *name)
{
    struct signature sig;
    if (!ctx->def || !name || parse_signature(ctx->def->params, &sig) < 0)
        return NULL;
    int i = find_param(&sig, name);
    return i < 0 ? NULL : json_array_get(args, (size_t)i);
}

/* The declared parameter, or NULL after a failure that says what is wrong: asking for a parameter the task
 * does not declare is the task author's bug, reported as such rather than as the caller's TypeError. */
static json_t *arg_or_fail(struct task_ctx *ctx, json_t *args, const char *name)
{
    json_t *v = task_arg(ctx, args, name);
    if (!v)
        task_fail(ctx, "SystemError", "%s() reads parameter '%s', which it does not declare (params: \"%s\")",
                  ctx->def ? short_name(ctx->def) : "task", name ? name : "(null)",
                  ctx->def && ctx->def->params ? ctx->def->params : "");
    return v;
}

static bool wrong_type(struct task_ctx *ctx, const char *name, const char *want, const json_t *v)
{
    task_fail(ctx, "TypeError", "%s() argument '%s' must be %s, not %s", ctx->def ? short_name(ctx->def) : "task",
              name, want, task_pytype(v));
    return false;
}

bool task_arg_int(struct task_ctx *ctx, json_t *args, const char *name, long long *out)
{
    json_t *v = arg_or_fail(ctx, args, name);
    if (!v)
        return false;
    if (json_is_integer(v))
        *out = json_integer_value(v);
    else if (json_is_boolean(v))
        *out = json_is_true(v);
    else
        return wrong_type(ctx, name, "int", v);
    return true;
}

bool task_arg_number(struct task_ctx *ctx, json_t *args, const char *name, double *out)
{
    json_t *v = arg_or_fail(ctx, args, name);
    if (!v)
        return false;
    if (json_is_integer(v))
        *out = (double)json_integer_value(v);
    else if (json_is_real(v))
        *out = json_real_value(v);
    else if (json_is_boolean(v))
        *out = json_is_true(v);
    else
        return wrong_type(ctx, name, "a number", v);
    return true;
}

bool task_arg_bool(struct task_ctx *ctx, json_t *args, const char *name, bool *out)
{
    json_t *v = arg_or_fail(ctx, args, name);
    if (!v)
        return false;
    if (!json_is_boolean(v))
        return wrong_type(ctx, name, "bool", v);
    *out = json_is_true(v);
    return true;
}

bool task_arg_str(struct task_ctx *ctx, json_t *args, const char *name, const char **out)
{
    json_t *v = arg_or_fail(ctx, args, name);
    if (!v)
        return false;
    if (!json_is_string(v))
        return wrong_type(ctx, name, "str", v);
    *out = json_string_value(v);
    return true;
}

bool task_arg_list(struct task_ctx *ctx, json_t *args, const char *name, json_t **out)
{
    json_t *v = arg_or_fail(ctx, args, name);
    if (!v)
        return false;
    if (!json_is_array(v))
        return wrong_type(ctx, name, "list", v);
    *out = v;
    return true;
}

bool task_arg_dict(struct task_ctx *ctx, json_t *args, const char *name, json_t **out)
{
    json_t *v = arg_or_fail(ctx, args, name);
    if (!v)
        return false;
    if (!json_is_object(v))
        return wrong_type(ctx, name, "dict", v);
    *out = v;
    return true;
}

bool task_should_stop(const struct task_ctx *ctx)
{
    return task_soft_time_limit_exceeded(ctx) || (ctx->revoked && ctx->revoked(ctx));
}

enum task_outcome task_stop(struct task_ctx *ctx)
{
    if (task_soft_time_limit_exceeded(ctx))
        return task_fail(ctx, "SoftTimeLimitExceeded", "soft time limit exceeded");
    return task_fail(ctx, "TaskRevokedError", "revoked");
}

bool task_arg_raw(const struct task_ctx *ctx, const char **text, size_t *len)
{
    if (!ctx->raw_text)
        return false;
    *text = ctx->raw_text;
    *len = ctx->raw_len;
    return true;
}
