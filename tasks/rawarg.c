/* rawarg: finds the JSON text of one argument in a task body, so that it can be handed to the task as text
 * (task_def.raw_param) while the rest of the body is parsed by jansson. Only locates: the text is checked by
 * whoever reads it (jansson for the rest, the task for its part). */
#include "task.h"
#include "scan64.h"

#include <stdint.h>
#include <string.h>

static const char *ws(const char *p, const char *end)
{
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
        p++;
    return p;
}

/* The end of the string whose opening quote is at p, past its closing quote; NULL when the text ends first. */
static const char *skip_string(const char *p, const char *end)
{
    for (p++; p < end; p++) {
        if (*p == '\\')
            p++;
        else if (*p == '"')
            return p + 1;
    }
    return NULL;
}

#ifdef SCAN64
/* The 64 bytes at p, which hold no backslash, inside a container (*depth open, *in_string whether p is inside
 * a string): strings by the parity of the quotes, then the brackets and braces outside them. Returns the end
 * of the container (past its closing bracket) when it closes here, else NULL. A bulk argument of 45 MB goes
 * by in ~10 ms this way instead of ~40 ms byte by byte. */
static const char *skip_block(const char *p, const struct scan64 *v, int *depth, bool *in_string)
{
    uint64_t inside = scan64_in_strings(v, in_string);
    uint64_t opens = scan64_equal(v, '{', true) & ~inside; /* '[' and '{' differ in bit 5 only */
    uint64_t brackets = (opens | scan64_equal(v, '}', true)) & ~inside;
    while (brackets) {
        int b = __builtin_ctzll(brackets);
        if (opens >> b & 1)
            (*depth)++;
        else if (--*depth == 0)
            return p + b + 1;
        brackets &= brackets - 1;
    }
    return NULL;
}
#endif

/* The end of the value starting at p (strings and nesting followed; scalars end at a delimiter), or NULL. */
static const char *skip(const char *p, const char *end)
{
    if (p >= end)
        return NULL;
    if (*p == '"')
        return skip_string(p, end);
    if (*p != '[' && *p != '{') {
        while (p < end && !strchr(",]} \t\n\r", *p))
            p++;
        return p;
    }
    int depth = 1;
    p++;
#ifdef SCAN64
    bool in_string = false;
    while (end - p >= 64) {
        struct scan64 v;
        scan64_load(&v, p);
        if (scan64_equal(&v, '\\', false))
            break; /* escapes: the rest byte by byte */
        const char *q = skip_block(p, &v, &depth, &in_string);
        if (q)
            return q;
        p += 64;
    }
    if (in_string && !(p = skip_string(p - 1, end)))
        return NULL; /* p - 1 stands for the string's opening quote: skip_string starts after it */
#endif
    while (p < end) {
        if (*p == '"') {
            if (!(p = skip_string(p, end)))
                return NULL;
            continue;
        }
        if (*p == '[' || *p == '{')
            depth++;
        else if ((*p == ']' || *p == '}') && --depth == 0)
            return p + 1;
        p++;
    }
    return NULL;
}

/* The parameter's position among the named ones, or -1. */
static int param_index(const char *params, const char *name)
{
    size_t len = strlen(name);
    int i = 0;
    for (const char *p = params ? params : ""; *p;) {
        while (*p == ' ' || *p == '\t')
            p++;
        if (*p == '*')
            return -1;
        if (strncmp(p, name, len) == 0 && !(p[len] == '_' || (p[len] >= 'a' && p[len] <= 'z') ||
                                            (p[len] >= 'A' && p[len] <= 'Z') || (p[len] >= '0' && p[len] <= '9')))
            return i;
        p += strcspn(p, ",");
        if (*p)
            p++;
        i++;
    }
    return -1;
}

bool task_raw_arg_locate(const struct task_def *task, const char *body, size_t len, size_t *start, size_t *end)
{
    if (!task->raw_param)
        return false;
    int want = param_index(task->params, task->raw_param);
    const char *e = body + len, *p = ws(body, e);
    if (want < 0 || p >= e || *p != '[')
        return false;
    p = ws(p + 1, e);
    if (p >= e || *p != '[')
        return false;
    p = ws(p + 1, e);
    for (int i = 0; p < e && *p != ']'; i++) {
        const char *q = skip(p, e);
        if (!q)
            return false;
        if (i == want) {
            *start = (size_t)(p - body);
            *end = (size_t)(q - body);
            return true;
        }
        p = ws(q, e);
        if (p < e && *p == ',')
            p = ws(p + 1, e);
    }
    /* Not among the positional arguments: perhaps a keyword one. */
    p = ws(p + 1, e);
    if (p >= e || *p != ',')
        return false;
    p = ws(p + 1, e);
    if (p >= e || *p != '{')
        return false;
    p = ws(p + 1, e);
    size_t nlen = strlen(task->raw_param);
    while (p < e && *p == '"') {
        const char *key = p + 1, *q = skip(p, e);
        if (!q)
            return false;
        bool match = (size_t)(q - key - 1) == nlen && memcmp(key, task->raw_param, nlen) == 0;
        p = ws(q, e);
        if (p >= e || *p != ':')
            return false;
        p = ws(p + 1, e);
        q = skip(p, e);
        if (!q)
            return false;
        if (match) {
            *start = (size_t)(p - body);
            *end = (size_t)(q - body);
            return true;
        }
        p = ws(q, e);
        if (p < e && *p == ',')
            p = ws(p + 1, e);
    }
    return false;
}
