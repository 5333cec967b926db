/* buf: a growable byte buffer, the one way this program assembles wire data.
 *
 * A zeroed struct buf is an empty buffer. The bytes are always NUL-terminated (not counted in len), so a
 * buffer holding text can be handed to functions that want a C string. Allocation failure aborts: a worker
 * that cannot allocate a few KiB cannot do anything useful and must not half-write results. */
#ifndef CELERIAC_BUF_H
#define CELERIAC_BUF_H

#include <stdarg.h>
#include <stddef.h>

struct buf {
    char *data; /* owned; NULL until the first append */
    size_t len; /* bytes used, excluding the terminating NUL */
    size_t cap; /* bytes allocated */
};

void buf_reserve(struct buf *b, size_t extra);
void buf_append(struct buf *b, const void *data, size_t len);
void buf_append_str(struct buf *b, const char *s);
void buf_append_char(struct buf *b, char c);
void buf_printf(struct buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void buf_vprintf(struct buf *b, const char *fmt, va_list ap) __attribute__((format(printf, 2, 0)));
/* Appends s as the body of a JSON string (quotes not included), escaping what JSON requires. */
void buf_append_json_escaped(struct buf *b, const char *s, size_t len);
/* Drops the first n bytes (consumed input), keeping the rest. */
void buf_consume(struct buf *b, size_t n);
void buf_reset(struct buf *b); /* len = 0, keeps the allocation */
void buf_free(struct buf *b);  /* releases the allocation; the buffer is empty and reusable */
/* Hands the bytes to the caller (caller frees with free()); the buffer is left empty. */
char *buf_steal(struct buf *b);

#endif
