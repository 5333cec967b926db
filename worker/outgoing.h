/* outgoing: the task messages celeriac itself sends (chain links, callbacks, chord bodies, retries, subtasks),
 * encoded the way a stock Celery 5 client encodes them for kombu's Redis transport (protocol doc 1.1, 2.2,
 * 2.3), so that a Python worker runs them exactly like messages from a Python process.
 *
 * Pure: no I/O, no globals (outgoing_uuid reads the kernel's random source). */
#ifndef CELERIAC_OUTGOING_H
#define CELERIAC_OUTGOING_H

#include <jansson.h>
#include <stdbool.h>

#include "buf.h"

/* Everything borrowed. NULL strings are written as null; NULL JSON values as null (embed) or []/{} (args). */
struct outgoing_task {
    const char *task;      /* required */
    const char *id;        /* required */
    const char *root_id;   /* the workflow's first task; NULL: the task's own id */
    const char *parent_id; /* the task that sends this one */
    const char *group;
    long long group_index;
    bool has_group_index;
    const char *eta;     /* ISO 8601 with offset, or NULL */
    const char *expires; /* ISO 8601 with offset, or NULL */
    long long retries;
    double time_limit, soft_time_limit; /* seconds, 0: null */
    const char *origin;                 /* the sending node, e.g. "gen1234@host" */
    const char *reply_to;               /* NULL: "" (a Redis result backend ignores it) */
    const char *exchange;               /* NULL: "" */
    const char *routing_key;            /* the queue for exchange "" */
    int priority;
    bool ignore_result;
    const json_t *args, *kwargs;
    const json_t *callbacks, *errbacks, *chain, *chord; /* the body's embed */
};

/* Appends the Redis list element for t (the kombu envelope as JSON, body base64). Returns 0, or -1 when a
 * required field is missing or a value cannot be encoded as JSON (nothing appended then). */
int outgoing_encode(struct buf *out, const struct outgoing_task *t);

/* A fresh random (version 4) UUID in its 36-character text form, NUL-terminated. */
void outgoing_uuid(char dst[37]);

/* Now plus `seconds`, as the ISO 8601 text Celery writes for an eta: "2026-11-22T17:03:03.489598+00:00".
 * dst needs 40 bytes. */
void outgoing_eta(double seconds, char *dst, size_t dstlen);

/* Python's repr of args as the tuple a Python producer shows in argsrepr: "(2, 3)", "('x',)", "()".
 * args borrowed (an array; anything else gives "()"). Cut at 1024 characters as saferepr cuts. */
void outgoing_argsrepr(struct buf *out, const json_t *args);

#endif
