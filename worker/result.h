/* result: the documents the Redis result backend stores, and Python-repr text for logs and events.
 *
 * Pure. Documents follow shared/docs/celery-protocol.md section 5.2 byte for byte in field order and
 * separators (", " and ": "), so that captures diff cleanly against stock Celery. */
#ifndef CELERIAC_RESULT_H
#define CELERIAC_RESULT_H

#include <jansson.h>

#include "buf.h"

/* Optional document fields; NULL members are left out ("group_id", "parent_id"). */
struct result_meta {
    const char *task_id;   /* required */
    const char *group_id;  /* request's group, or NULL */
    const char *parent_id; /* request's parent, or NULL */
    /* Ids of the tasks this one sent on (chain link, callbacks), written as "children": [[[id, null], null],
     * ...] as stock Celery does; borrowed, may be NULL when nchildren is 0. */
    const char *const *children;
    size_t nchildren;
};

/* Appends {"status": "SUCCESS", "result": <value>, "traceback": null, "children": [], "date_done": "<ISO>",
 * "task_id": ..., ["group_id": ..., "parent_id": ...]} to out. value is borrowed; NULL means null.
 * date_done is the naive UTC ISO time of `now` (epoch seconds), microseconds left out when zero. */
void result_doc_success(struct buf *out, const struct result_meta *meta, const json_t *value, double now);

/* Appends an exception-state document: status is "FAILURE", "REVOKED" or "RETRY" (date_done null for RETRY);
 * result is {"exc_type": exc_type, "exc_message": [message], "exc_module": result_exc_module(exc_type)};
 * traceback is a string or NULL for null. A NULL message gives "exc_message": [] (an exception raised with no
 * arguments). For RETRY, "children" is [[[task_id, null], null]] as stock Celery writes it: the retry message,
 * sent under the same id, is the request's child. A NULL exc_type writes "result": null (a retry asked for
 * without an exception, as stock Celery stores it). All strings borrowed. */
void result_doc_exception(struct buf *out, const struct result_meta *meta, const char *status, const char *exc_type,
                          const char *message, const char *traceback, double now);
/* The same with the exception's args given as a JSON array (borrowed; not an array -> []), for exceptions whose
 * args are not one string: stock Celery stores TimeLimitExceeded(1) as "exc_message": [1]. */
void result_doc_exception_args(struct buf *out, const struct result_meta *meta, const char *status,
                               const char *exc_type, const json_t *exc_args, const char *traceback, double now);

/* Appends a custom state such as PROGRESS, as Task.update_state stores it: {"status": state, "result": meta,
 * "traceback": null, "children": [], "date_done": null, ...}. meta borrowed; NULL is null. */
void result_doc_state(struct buf *out, const struct result_meta *meta, const char *state, const json_t *value);

/* Appends {"status": "STARTED", "result": {"pid": pid, "hostname": hostname}, ...}. */
void result_doc_started(struct buf *out, const struct result_meta *meta, int pid, const char *hostname);

/* The module a Python client imports to rebuild exc_type: "builtins" for Python's built-in exceptions,
 * "celery.exceptions" for NotRegistered, TaskRevokedError, ChordError, MaxRetriesExceededError, Retry;
 * "billiard.exceptions" for TimeLimitExceeded, SoftTimeLimitExceeded, WorkerLostError (where the classes live,
 * so what a stock worker writes; celery.exceptions re-exports them, and every Celery client has billiard
 * loaded); "kombu.exceptions" for ContentDisallowed and DecodeError; otherwise "builtins" only if the name is a
 * builtin, else "celeriac.exceptions" (which a client cannot import, so it builds a stand-in class with that
 * name). exc_type borrowed; the result is a static string, never NULL. */
const char *result_exc_module(const char *exc_type);

/* A traceback string in Python's shape for a failure raised by a native task:
 * "Traceback (most recent call last):\n  File \"<native>\", line 0, in <task>\n<exc_type>: <message>\n".
 * As Python's traceback module, an empty (or NULL) message leaves out ": ", giving "<exc_type>\n". */
void result_traceback(struct buf *out, const char *task_name, const char *exc_type, const char *message);

/* The repr text stock Celery puts in logs and events for a value (the task-succeeded "result", the "succeeded
 * in ...: <value>" log line, a v1 message's missing argsrepr): celery.utils.saferepr.saferepr(value, max_len),
 * which is Python's repr() for None, True, False, 3, 1.5, [1, 2], {'a': 1} but not for strings: they are
 * always quoted with ' and only ' is escaped ('it\'s', a newline stays a newline). Containers nested more than
 * 3 deep show as [...] / {...}. With max_len > 0, strings, numbers and the whole output are cut as saferepr
 * cuts them (Celery uses 1024); 0 means no limit. value borrowed; NULL is None. */
void result_pyrepr(struct buf *out, const json_t *value, size_t max_len);
/* Python's repr() of a str given as UTF-8 (len bytes, borrowed): 'text', "it's", '\n', '\x00', '\u2028', with
 * Python 3.11's idea of printable characters. */
void result_repr_str(struct buf *out, const char *s, size_t len);
/* repr() of exc_type(message): "ValueError('boom 1')", "ValueError()" for a NULL message. Borrowed strings. */
void result_exc_repr(struct buf *out, const char *exc_type, const char *message);

/* Naive UTC ISO 8601 of epoch seconds, Python's isoformat(): "2026-11-22T13:07:10.555704" (no fraction when
 * the microseconds are 0). dst needs 32 bytes. */
void result_isoformat(double epoch, char *dst, size_t dstlen);

#endif
