/* values: JSON values -> COPY data (binary or text format), and result fields -> JSON. Pure (no libpq).
 *
 * Binary COPY (PostgreSQL docs, "COPY", binary format): a header, then per row an int16 field count and per
 * field an int32 length (-1: NULL) and the type's binary "send" form; an int16 -1 ends the data. All integers
 * are big-endian. Text COPY: fields separated by tabs, rows ended by '\n', NULL as \N, and backslash, tab,
 * newline and carriage return escaped with a backslash. */
#include "db.h"

#include <errno.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Built-in type OIDs, fixed by PostgreSQL (src/include/catalog/pg_type.dat); libpq-dev does not ship them. */
enum {
    OID_BOOL = 16,
    OID_NAME = 19,
    OID_INT8 = 20,
    OID_INT2 = 21,
    OID_INT4 = 23,
    OID_TEXT = 25,
    OID_OID = 26,
    OID_JSON = 114,
    OID_FLOAT4 = 700,
    OID_FLOAT8 = 701,
    OID_BPCHAR = 1042,
    OID_VARCHAR = 1043,
    OID_NUMERIC = 1700,
    OID_JSONB = 3802,
};

enum db_kind db_kind_of_oid(unsigned oid)
{
    switch (oid) {
    case OID_BOOL: return DB_KIND_BOOL;
    case OID_INT2: return DB_KIND_INT2;
    case OID_INT4: return DB_KIND_INT4;
    case OID_INT8: return DB_KIND_INT8;
    case OID_FLOAT4: return DB_KIND_FLOAT4;
    case OID_FLOAT8: return DB_KIND_FLOAT8;
    case OID_NUMERIC: return DB_KIND_NUMERIC;
    case OID_TEXT:
    case OID_VARCHAR:
    case OID_BPCHAR:
    case OID_NAME: return DB_KIND_TEXT;
    case OID_JSON: return DB_KIND_JSON;
    case OID_JSONB: return DB_KIND_JSONB;
    default: return DB_KIND_OTHER;
    }
}

bool db_kind_binary(enum db_kind k)
{
    return k != DB_KIND_NUMERIC && k != DB_KIND_OTHER;
}

const char *db_kind_name(enum db_kind k)
{
    static const char *const names[] = {
        [DB_KIND_BOOL] = "boolean",
        [DB_KIND_INT2] = "smallint",
        [DB_KIND_INT4] = "integer",
        [DB_KIND_INT8] = "bigint",
        [DB_KIND_FLOAT4] = "real",
        [DB_KIND_FLOAT8] = "double precision",
        [DB_KIND_NUMERIC] = "numeric",
        [DB_KIND_TEXT] = "text",
        [DB_KIND_JSON] = "json",
        [DB_KIND_JSONB] = "jsonb",
        [DB_KIND_OTHER] = "a type taking a string",
    };
    return (unsigned)k < sizeof names / sizeof names[0] ? names[k] : "?";
}

int db_format_double(char *out, double d)
{
    int n = 0;
    for (int prec = 15; prec <= 17; prec++) {
        n = snprintf(out, 32, "%.*g", prec, d);
        if (strtod(out, NULL) == d)
            break;
    }
    return n;
}

/* ---- JSON text for json/jsonb columns ----
 * Not json_dumps: jansson prints reals with 17 digits (0.1 -> 0.10000000000000001), which jsonb would keep
 * as that numeric; Python's json (and this) print the shortest form that reads back exactly. */

static void put_json_string(struct db_buf *b, const char *s, size_t len)
{
    static const char hex[] = "0123456789abcdef";
    db_buf_append(b, "\"", 1);
    size_t run = 0;
    for (size_t i = 0; i < len; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch >= 0x20 && ch != '"' && ch != '\\')
            continue;
        db_buf_append(b, s + run, i - run);
        run = i + 1;
        char esc[6] = {'\\', 'u', '0', '0', hex[ch >> 4], hex[ch & 15]};
        switch (ch) {
        case '"': db_buf_append(b, "\\\"", 2); break;
        case '\\': db_buf_append(b, "\\\\", 2); break;
        case '\n': db_buf_append(b, "\\n", 2); break;
        case '\r': db_buf_append(b, "\\r", 2); break;
        case '\t': db_buf_append(b, "\\t", 2); break;
        default: db_buf_append(b, esc, 6); break;
        }
    }
    db_buf_append(b, s + run, len - run);
    db_buf_append(b, "\"", 1);
}

static void put_json(struct db_buf *b, const json_t *v)
{
    char num[32];
    switch (json_typeof(v)) {
    case JSON_OBJECT: {
        const char *key;
        const json_t *item;
        bool first = true;
        db_buf_append(b, "{", 1);
        json_object_foreach((json_t *)v, key, item)
        {
            if (!first)
                db_buf_append(b, ",", 1);
            first = false;
            put_json_string(b, key, strlen(key));
            db_buf_append(b, ":", 1);
            put_json(b, item);
        }
        db_buf_append(b, "}", 1);
        break;
    }
    case JSON_ARRAY:
        db_buf_append(b, "[", 1);
        for (size_t i = 0; i < json_array_size(v); i++) {
            if (i)
                db_buf_append(b, ",", 1);
            put_json(b, json_array_get(v, i));
        }
        db_buf_append(b, "]", 1);
        break;
    case JSON_STRING: put_json_string(b, json_string_value(v), json_string_length(v)); break;
    case JSON_INTEGER:
        db_buf_append(b, num, (size_t)snprintf(num, sizeof num, "%" JSON_INTEGER_FORMAT, json_integer_value(v)));
        break;
    case JSON_REAL: {
        int n = db_format_double(num, json_real_value(v));
        db_buf_append(b, num, (size_t)n);
        if (!strpbrk(num, ".eE")) /* 2.0 prints as "2": keep it a float for readers that care */
            db_buf_append(b, ".0", 2);
        break;
    }
    case JSON_TRUE: db_buf_puts(b, "true"); break;
    case JSON_FALSE: db_buf_puts(b, "false"); break;
    case JSON_NULL: db_buf_puts(b, "null"); break;
    }
}

/* ---- COPY encoding ---- */

/* db_buf_append for the small pieces of COPY data, inline while the buffer has room (nearly always: the
 * caller drains it every 256 KiB). A million rows of binary COPY make seven million of these. */
static inline void put_bytes(struct db_buf *b, const void *data, size_t len)
{
    if (b->len + len + 1 <= b->cap) {
        memcpy(b->data + b->len, data, len);
        b->len += len;
        b->data[b->len] = '\0';
    } else {
        db_buf_append(b, data, len);
    }
}

static inline void put_be(struct db_buf *b, uint64_t v, int bytes)
{
    unsigned char out[8];
    for (int i = bytes - 1; i >= 0; i--, v >>= 8)
        out[i] = (unsigned char)v;
    put_bytes(b, out, (size_t)bytes);
}

/* Text format: s with backslash, tab, newline and carriage return escaped. */
static void put_text_escaped(struct db_buf *b, const char *s, size_t len)
{
    size_t run = 0;
    for (size_t i = 0; i < len; i++) {
        char esc;
        switch (s[i]) {
        case '\\': esc = '\\'; break;
        case '\t': esc = 't'; break;
        case '\n': esc = 'n'; break;
        case '\r': esc = 'r'; break;
        default: continue;
        }
        db_buf_append(b, s + run, i - run);
        char two[2] = {'\\', esc};
        db_buf_append(b, two, 2);
        run = i + 1;
    }
    db_buf_append(b, s + run, len - run);
}

/* A field's bytes: binary gets the length prefix, text the escaping. */
static void put_field(struct db_copy *c, const char *s, size_t len)
{
    if (c->binary) {
        put_be(&c->out, (uint32_t)len, 4);
        put_bytes(&c->out, s, len);
    } else {
        put_text_escaped(&c->out, s, len);
    }
}

void db_copy_begin(struct db_copy *c)
{
    static const char header[] = "PGCOPY\n\377\r\n"; /* + its NUL: 11 bytes */
    if (!c->binary)
        return;
    db_buf_append(&c->out, header, sizeof header);
    put_be(&c->out, 0, 4); /* flags */
    put_be(&c->out, 0, 4); /* header extension length */
}

void db_copy_end(struct db_copy *c)
{
    if (c->binary)
        put_be(&c->out, 0xffff, 2);
}

/* Encodes one value of kind k. Returns NULL, or what was expected (for the error message). */
static const char *put_value(struct db_copy *c, enum db_kind k, const struct db_value *v)
{
    char num[32];
    struct db_buf *b = &c->out;
    if (v->type == DBV_NULL) {
        if (c->binary)
            put_be(b, 0xffffffffu, 4);
        else
            db_buf_append(b, "\\N", 2);
        return NULL;
    }
    switch (k) {
    case DB_KIND_BOOL:
        if (v->type != DBV_BOOL)
            return "bool";
        if (c->binary) {
            put_be(b, 1, 4);
            put_be(b, v->b, 1);
        } else {
            db_buf_append(b, v->b ? "t" : "f", 1);
        }
        return NULL;
    case DB_KIND_INT2:
    case DB_KIND_INT4:
    case DB_KIND_INT8: {
        if (v->type != DBV_INT)
            return "int";
        long long n = v->i;
        int bytes = k == DB_KIND_INT2 ? 2 : k == DB_KIND_INT4 ? 4 : 8;
        if ((bytes == 2 && (n < INT16_MIN || n > INT16_MAX)) || (bytes == 4 && (n < INT32_MIN || n > INT32_MAX)))
            return bytes == 2 ? "int in -32768..32767" : "int in -2147483648..2147483647";
        if (c->binary) {
            put_be(b, (uint64_t)bytes, 4);
            put_be(b, (uint64_t)n, bytes);
        } else {
            db_buf_append(b, num, (size_t)snprintf(num, sizeof num, "%lld", n));
        }
        return NULL;
    }
    case DB_KIND_FLOAT4:
    case DB_KIND_FLOAT8: {
        if (v->type != DBV_INT && v->type != DBV_REAL)
            return "int or float";
        double d = v->type == DBV_INT ? (double)v->i : v->d;
        if (k == DB_KIND_FLOAT4 && fabs(d) > FLT_MAX)
            return "int or float within real's range";
        if (c->binary && k == DB_KIND_FLOAT4) {
            float f = (float)d;
            uint32_t bits;
            memcpy(&bits, &f, 4);
            put_be(b, 4, 4);
            put_be(b, bits, 4);
        } else if (c->binary) {
            uint64_t bits;
            memcpy(&bits, &d, 8);
            put_be(b, 8, 4);
            put_be(b, bits, 8);
        } else if (v->type == DBV_INT) {
            db_buf_append(b, num, (size_t)snprintf(num, sizeof num, "%lld", v->i));
        } else {
            /* 17 digits always read back exactly, and are cheaper than finding the shortest form */
            db_buf_append(b, num, (size_t)snprintf(num, sizeof num, "%.17g", d));
        }
        return NULL;
    }
    case DB_KIND_NUMERIC: /* text format only */
        if (v->type == DBV_INT)
            db_buf_append(b, num, (size_t)snprintf(num, sizeof num, "%lld", v->i));
        else if (v->type == DBV_REAL) /* shortest: 19.99 is stored as 19.99 */
            db_buf_append(b, num, (size_t)db_format_double(num, v->d));
        else if (v->type == DBV_STR)
            put_text_escaped(b, v->s, v->len);
        else
            return "int, float or str";
        return NULL;
    case DB_KIND_TEXT:
    case DB_KIND_OTHER:
        if (v->type != DBV_STR)
            return "str";
        if (memchr(v->s, '\0', v->len))
            return "str without NUL characters (PostgreSQL text cannot hold them)";
        put_field(c, v->s, v->len);
        return NULL;
    case DB_KIND_JSON:
    case DB_KIND_JSONB: {
        /* Serialized on the side, since binary needs the length first and text the escaping. The text
         * holds no NUL: put_json escapes control characters. Through jansson, so that a value read from the
         * raw text is stored exactly as the same value parsed by jansson would be. */
        json_t *j = db_value_json(v);
        if (!j)
            return "valid JSON";
        struct db_buf t = {0};
        if (c->binary && k == DB_KIND_JSONB)
            db_buf_append(&t, "\1", 1); /* jsonb's binary format version */
        put_json(&t, j);
        put_field(c, t.data, t.len);
        db_buf_free(&t);
        json_decref(j);
        return NULL;
    }
    }
    return "a known type";
}

int db_copy_values(struct db_copy *c, const struct db_value *vals, size_t n, bool is_list, size_t index,
                   const char *what, char *err, size_t errlen)
{
    if (!is_list && !(c->bare_scalars && c->ncols == 1)) {
        snprintf(err, errlen, "%s[%zu]: expected a list of %zu values, got %s", what, index, c->ncols,
                 db_vtype_pyname(vals[0].type));
        return -1;
    }
    if (is_list && n != c->ncols) {
        snprintf(err, errlen, "%s[%zu]: expected %zu values (one per column), got %zu", what, index, c->ncols, n);
        return -1;
    }
    if (c->binary)
        put_be(&c->out, c->ncols, 2);
    for (size_t i = 0; i < c->ncols; i++) {
        const struct db_value *v = is_list ? &vals[i] : &vals[0];
        if (!c->binary && i)
            db_buf_append(&c->out, "\t", 1);
        const char *expected = put_value(c, c->kinds[i], v);
        if (expected) {
            snprintf(err, errlen, "%s[%zu][%zu] (column \"%s\", %s): expected %s, got %s", what, index, i, c->names[i],
                     db_kind_name(c->kinds[i]), expected, db_vtype_pyname(v->type));
            return -1;
        }
    }
    if (!c->binary)
        db_buf_append(&c->out, "\n", 1);
    return 0;
}

int db_copy_row(struct db_copy *c, const json_t *row, size_t index, const char *what, char *err, size_t errlen)
{
    struct db_value few[16], *vals = few;
    size_t n = 1;
    bool is_list = json_is_array(row);
    if (is_list) {
        n = json_array_size(row);
        if (n != c->ncols) /* a width error needs no values */
            return db_copy_values(c, NULL, n, true, index, what, err, errlen);
        if (n > sizeof few / sizeof few[0] && !(vals = malloc(n * sizeof *vals)))
            abort();
        for (size_t i = 0; i < n; i++)
            db_value_of_json(json_array_get(row, i), &vals[i]);
    } else {
        db_value_of_json(row, &few[0]);
    }
    int rc = db_copy_values(c, vals, n, is_list, index, what, err, errlen);
    if (vals != few)
        free(vals);
    return rc;
}

/* ---- results ---- */

json_t *db_value_from_text(const char *s, size_t len, unsigned oid)
{
    enum db_kind k = db_kind_of_oid(oid);
    char *end = NULL;
    switch (k) {
    case DB_KIND_BOOL: return json_boolean(len == 1 && s[0] == 't');
    case DB_KIND_INT2:
    case DB_KIND_INT4:
    case DB_KIND_INT8:
    case DB_KIND_NUMERIC:
    case DB_KIND_FLOAT4:
    case DB_KIND_FLOAT8: {
        if (k != DB_KIND_FLOAT4 && k != DB_KIND_FLOAT8 && !strpbrk(s, ".eEN")) {
            errno = 0;
            long long n = strtoll(s, &end, 10);
            if (end == s + len && errno == 0)
                return json_integer(n);
        }
        double d = strtod(s, &end);
        if (end != s + len || !isfinite(d))
            return json_stringn(s, len); /* NaN, Infinity */
        if (k == DB_KIND_NUMERIC && d == floor(d) && fabs(d) < 9.2e18)
            return json_integer((json_int_t)d); /* 42.00 */
        return json_real(d);
    }
    case DB_KIND_JSON:
    case DB_KIND_JSONB: {
        json_t *v = json_loadb(s, len, JSON_DECODE_ANY | JSON_ALLOW_NUL, NULL);
        return v ? v : json_stringn(s, len);
    }
    default: return json_stringn(s, len);
    }
}
