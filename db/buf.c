/* db_buf: the byte buffer db/ assembles SQL text and COPY data in (db/ does not use the worker's buf). */
#include "db.h"

#include <stdlib.h>
#include <string.h>

void db_buf_append(struct db_buf *b, const void *data, size_t len)
{
    if (b->len + len + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + len + 1)
            cap *= 2;
        char *p = realloc(b->data, cap);
        if (!p)
            abort();
        b->data = p;
        b->cap = cap;
    }
    if (len)
        memcpy(b->data + b->len, data, len);
    b->len += len;
    b->data[b->len] = '\0';
}

void db_buf_puts(struct db_buf *b, const char *s)
{
    db_buf_append(b, s, strlen(s));
}

void db_buf_free(struct db_buf *b)
{
    free(b->data);
    memset(b, 0, sizeof *b);
}
