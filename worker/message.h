/* message: one Celery task message as stored in a Redis list (bytes) -> a decoded request.
 *
 * Pure: no I/O, no globals, safe on hostile input (bounded depth, every byte validated). Used by the main
 * process (to learn the delivery tag, id, name, eta... of what it popped) and by pool children (to get the
 * task body), so it must be cheap: a one-pass validating scanner, not a JSON tree, for the envelope.
 * Wire format: shared/docs/celery-protocol.md sections 1-2 (protocol v2, v1, and the v2 "hybrid" body). */
#ifndef CELERIAC_MESSAGE_H
#define CELERIAC_MESSAGE_H

#include <stdbool.h>
#include <stddef.h>

/* A decoded string: NUL-terminated, JSON escapes undone, owned by the request (freed by msg_request_clear).
 * s == NULL when the field is absent or JSON null. */
struct msg_str {
    const char *s;
    size_t len;
};

enum msg_status {
    MSG_OK = 0,
    MSG_ERR_JSON = -1,          /* the envelope is not valid JSON (or not an object, or nested too deeply) */
    MSG_ERR_ENVELOPE = -2,      /* valid JSON, but a field has the wrong type or a required one is missing */
    MSG_ERR_BODY_ENCODING = -3, /* body_encoding is base64 but the body is not valid base64, or unknown encoding */
    MSG_ERR_CONTENT_TYPE = -4,  /* content-type is not application/json (pickle, yaml, msgpack, ...) */
    MSG_ERR_UNKNOWN = -5,       /* neither protocol v2 (task header) nor v1 (body object with "task") */
    MSG_ERR_TOO_LARGE = -6,     /* over the size limit: the id is still read, the body is not decoded */
};

struct msg_request {
    int protocol; /* 2 or 1 once known, else 0 */

    /* Task fields: from the v2 headers, or from the body object for v1 ("taskset" is v1's alias of group). */
    struct msg_str task, id, shadow, root_id, parent_id, group, eta, expires, origin, argsrepr, kwargsrepr;
    long long retries;          /* 0 when absent */
    long long group_index;      /* valid when has_group_index */
    bool has_group_index;
    double time_limit;          /* hard limit, seconds; valid when has_time_limit ("timelimit": [hard, soft]) */
    double soft_time_limit;     /* valid when has_soft_time_limit */
    bool has_time_limit, has_soft_time_limit;
    bool ignore_result;         /* headers.ignore_result */
    bool redelivered;           /* headers.redelivered or delivery_info.redelivered */

    /* Envelope and properties. */
    struct msg_str content_type, content_encoding, body_encoding, correlation_id, reply_to, delivery_tag;
    struct msg_str exchange, routing_key; /* properties.delivery_info */
    int priority;                         /* properties.priority, 0 when absent */

    /* The serialized body with the body encoding undone (still JSON text for application/json):
     * v2: [args, kwargs, embed] (or the hybrid dict); v1: the task object. Owned, NUL-terminated. */
    const char *body;
    size_t body_len;
    /* Set by msg_decode_envelope instead of body, for a v2 message: the body as it is in the raw message
     * (borrowed from it), for msg_body_copy. */
    const char *body_src;
    size_t body_src_len;
    bool body_src_escaped;

    void *arena; /* owns every string above but body_src; private to message.c */
};

/* Decodes raw[0..len) into *out (which the caller zeroes first or reuses after msg_request_clear).
 * max_size: 0 for no limit. Returns MSG_OK or a negative enum msg_status; on error err receives one line
 * saying what is wrong (e.g. "header 'retries' must be an integer"), and every field that could be read
 * before the error is still filled in: in particular `id` (from headers.id or properties.correlation_id)
 * whenever it is present, so the caller can store a FAILURE result for it.
 * The caller frees with msg_request_clear in every case. raw is borrowed (only read during the call);
 * every string in *out is owned by *out. When several things are wrong, the status reported is the first
 * of: TOO_LARGE, JSON (envelope), CONTENT_TYPE, ENVELOPE, BODY_ENCODING, then for v1 JSON (body),
 * UNKNOWN, ENVELOPE. A CONTENT_TYPE error leaves body NULL (a refused body is never decoded). */
int msg_decode(const char *raw, size_t len, size_t max_size, struct msg_request *out, char *err, size_t errlen);
/* The same, except that a v2 body is left encoded in raw (body NULL, body_src set): for the main process,
 * which routes a message by its headers and needs the body only to show a task's arguments (inspect), while
 * the pool process decodes it anyway. Spares a 48 MB message a base64 pass and 36 MB in the main process.
 * raw must then outlive *out. A body that would not decode is the pool process's to report. */
int msg_decode_envelope(const char *raw, size_t len, size_t max_size, struct msg_request *out, char *err,
                        size_t errlen);
/* The decoded body: a copy of body, or body_src decoded. Caller frees; NULL when there is none or it does not
 * decode. */
char *msg_body_copy(const struct msg_request *r, size_t *len);
void msg_request_clear(struct msg_request *r);
/* After msg_spare_keep, msg_request_clear keeps the calling thread's last big decoding buffer (1 MiB or more)
 * for its next big message, whose pages are then already there. msg_spare_release frees it: call it when
 * idle. */
void msg_spare_keep(void);
bool msg_spare_held(void);
void msg_spare_release(void);

/* An eta/expires header -> epoch seconds. Accepts what Celery's parser (celery/utils/iso8601.py) accepts:
 * "YYYY[-MM[-DD[THH:MM[:SS[.fraction]][Z|+HH:MM|-HH:MM]]]]" ("T" may also be "t" or a space; month and day may
 * have one digit); a time without an offset is UTC, as Celery's clients mean it. Unlike Celery, the whole of
 * s[0..len) must match (no trailing text). Returns -1 for anything else (bad syntax, day 31 of April, hour
 * 24, year 0); times before 1970 give 0, since for a worker they are simply in the past. s borrowed. */
double msg_parse_time(const char *s, size_t len);

/* A Celery-style label for a request in log lines: "name[id]". Writes into dst (always NUL-terminated;
 * borrowed, as is r), "<unknown>" / "?" for a missing name / id; control characters become '?' and a cut
 * never splits a UTF-8 sequence. */
void msg_label(const struct msg_request *r, char *dst, size_t dstlen);

/* Standard padded base64 (RFC 4648). decode: returns the decoded length, or -1 on invalid input;
 * dst must hold at least base64_decoded_max(len) bytes. dst may be src (decodes in place). Like Python's
 * b64decode, non-zero unused bits in the last quad are accepted. Both pointers are borrowed. */
size_t base64_decoded_max(size_t len);
long base64_decode(const char *src, size_t len, unsigned char *dst);
/* encode: dst must hold 4 * ((len + 2) / 3) + 1 bytes; NUL-terminates; returns the encoded length.
 * Both pointers are borrowed. */
size_t base64_encode(const unsigned char *src, size_t len, char *dst);

#endif
