/* names: identifiers, table names and the allow-list; connection-string redaction. Pure (no libpq). */
#include "db.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static bool ident_start(unsigned char ch)
{
    return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || ch == '_' || ch >= 0x80;
}

bool db_ident_valid(const char *s, size_t len)
{
    if (!s || len == 0 || len > DB_IDENT_MAX || !ident_start((unsigned char)s[0]))
        return false;
    for (size_t i = 1; i < len; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (!ident_start(ch) && !(ch >= '0' && ch <= '9') && ch != '$')
            return false;
    }
    return true;
}

void db_quote_ident(struct db_buf *b, const char *s)
{
    /* Valid identifiers hold no '"', but quoting stays correct for any string. */
    db_buf_append(b, "\"", 1);
    for (const char *q; (q = strchr(s, '"')); s = q + 1) {
        db_buf_append(b, s, (size_t)(q - s));
        db_buf_append(b, "\"\"", 2);
    }
    db_buf_puts(b, s);
    db_buf_append(b, "\"", 1);
}

int db_table_parse(const char *s, size_t len, struct db_table *out)
{
    const char *dot = memchr(s, '.', len);
    const char *name = dot ? dot + 1 : s;
    size_t slen = dot ? (size_t)(dot - s) : 0, nlen = len - (size_t)(name - s);
    memset(out, 0, sizeof *out);
    if ((dot && !db_ident_valid(s, slen)) || !db_ident_valid(name, nlen))
        return -1;
    memcpy(out->schema, s, slen);
    memcpy(out->name, name, nlen);
    return 0;
}

void db_quote_table(struct db_buf *b, const struct db_table *t)
{
    if (t->schema[0]) {
        db_quote_ident(b, t->schema);
        db_buf_append(b, ".", 1);
    }
    db_quote_ident(b, t->name);
}

int db_allow_parse(const char *list, struct db_allow *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof *out);
    if (!list || !*list)
        return 0;
    for (const char *p = list;; p++) {
        size_t n = strcspn(p, ",");
        const char *end = p + n;
        while (p < end && *p == ' ')
            p++;
        while (end > p && end[-1] == ' ')
            end--;
        struct db_table t;
        if (db_table_parse(p, (size_t)(end - p), &t) < 0) {
            snprintf(err, errlen, "invalid table name '%.*s' in the table list '%s' (expected name or schema.name)",
                     (int)(end - p), p, list);
            db_allow_clear(out);
            return -1;
        }
        struct db_table *grown = realloc(out->tables, (out->n + 1) * sizeof *grown);
        if (!grown)
            abort();
        out->tables = grown;
        out->tables[out->n++] = t;
        p += strcspn(p, ",");
        if (!*p)
            return 0;
    }
}

bool db_allow_has(const struct db_allow *a, const struct db_table *t)
{
    for (size_t i = 0; i < a->n; i++)
        if (strcmp(a->tables[i].schema, t->schema) == 0 && strcmp(a->tables[i].name, t->name) == 0)
            return true;
    return false;
}

void db_allow_clear(struct db_allow *a)
{
    free(a->tables);
    memset(a, 0, sizeof *a);
}

/* Masks [from, to) of s into b as "**". */
static void mask(struct db_buf *b, const char **s, const char *from, const char *to)
{
    db_buf_append(b, *s, (size_t)(from - *s));
    db_buf_puts(b, "**");
    *s = to;
}

/* A keyword-form value starting at v: 'quoted with \' escapes' or up to the next space. Returns its end. */
static const char *keyword_value_end(const char *v)
{
    if (*v != '\'')
        return v + strcspn(v, " \t\n\r\f\v");
    for (v++; *v && *v != '\''; v++)
        if (*v == '\\' && v[1])
            v++;
    return *v ? v + 1 : v;
}

char *db_dsn_redact(const char *dsn)
{
    struct db_buf b = {0};
    const char *s = dsn;
    bool uri = strncmp(dsn, "postgresql://", 13) == 0 || strncmp(dsn, "postgres://", 11) == 0;
    if (uri) {
        /* user:password@ in the authority; as for Redis URLs, up to the LAST '@' before the path, so an
         * unescaped '@' in the password is still hidden. */
        const char *auth = strstr(dsn, "://") + 3;
        const char *end = auth + strcspn(auth, "/?#"), *at = NULL;
        for (const char *p = auth; p < end; p++)
            if (*p == '@')
                at = p;
        if (!at) { /* the password may hold '/', '?' or '#': look for '@' in the whole string */
            at = strrchr(auth, '@');
        }
        const char *colon = at ? memchr(auth, ':', (size_t)(at - auth)) : NULL;
        if (colon)
            mask(&b, &s, colon + 1, at);
        /* ?password=... or &password=... in the query */
        for (const char *p = s; (p = strstr(p, "password="));) {
            if (p > s && (p[-1] == '?' || p[-1] == '&')) {
                const char *v = p + 9;
                mask(&b, &s, v, v + strcspn(v, "&#"));
                p = s;
            } else {
                p += 9;
            }
        }
    } else {
        /* keyword form: password = value, the key at the start or after a space */
        for (const char *p = s; (p = strstr(p, "password"));) {
            const char *v = p + 8;
            bool key = p == dsn || strchr(" \t\n\r\f\v", p[-1]);
            while (*v == ' ' || *v == '\t')
                v++;
            if (key && *v == '=') {
                v++;
                while (*v == ' ' || *v == '\t')
                    v++;
                mask(&b, &s, v, keyword_value_end(v));
                p = s;
            } else {
                p += 8;
            }
        }
    }
    db_buf_puts(&b, s);
    return b.data;
}
