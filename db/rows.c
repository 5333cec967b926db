/* rows: a list of rows read straight from its JSON text, value by value, without building jansson objects.
 * The bulk tasks receive their rows this way (task_arg_raw): for a million rows that is the difference
 * between one pass over the text and four million allocations. The values read are the ones jansson would
 * have produced (same number and string rules, same errors), so both paths encode and fail alike.
 * Pure (no libpq). */
#include "db.h"

#include <errno.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "scan64.h"

#define MAX_DEPTH 2048 /* jansson's limit on nesting */

const char *db_vtype_pyname(enum db_vtype t)
{
    static const char *const names[] = {[DBV_NULL] = "NoneType", [DBV_BOOL] = "bool", [DBV_INT] = "int",
                                        [DBV_REAL] = "float",    [DBV_STR] = "str",   [DBV_LIST] = "list",
                                        [DBV_DICT] = "dict"};
    return names[t];
}

static const char *skip_ws(const char *p, const char *end)
{
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
        p++;
    return p;
}

static int hex4(const char *p, const char *end, unsigned *out)
{
    if (end - p < 4)
        return -1;
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        char c = p[i];
        v <<= 4;
        if (c >= '0' && c <= '9')
            v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f')
            v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F')
            v |= (unsigned)(c - 'A' + 10);
        else
            return -1;
    }
    *out = v;
    return 0;
}

/* Length of the valid UTF-8 sequence at p (1..4), or 0 when it is not one (overlong, surrogate, > U+10FFFF,
 * truncated): jansson refuses such strings, and so does this. */
static size_t utf8_len(const unsigned char *p, const unsigned char *end)
{
    unsigned c = p[0];
    size_t n = c < 0x80 ? 1 : c >= 0xc2 && c <= 0xdf ? 2 : c >= 0xe0 && c <= 0xef ? 3 : c >= 0xf0 && c <= 0xf4 ? 4 : 0;
    if (!n || (size_t)(end - p) < n)
        return 0;
    for (size_t i = 1; i < n; i++)
        if ((p[i] & 0xc0) != 0x80)
            return 0;
    if ((c == 0xe0 && p[1] < 0xa0) || (c == 0xed && p[1] > 0x9f) || (c == 0xf0 && p[1] < 0x90) ||
        (c == 0xf4 && p[1] > 0x8f))
        return 0;
    return n;
}

static void put_utf8(struct db_buf *b, unsigned cp)
{
    char u[4];
    size_t n;
    if (cp < 0x80) {
        u[0] = (char)cp;
        n = 1;
    } else if (cp < 0x800) {
        u[0] = (char)(0xc0 | (cp >> 6));
        u[1] = (char)(0x80 | (cp & 0x3f));
        n = 2;
    } else if (cp < 0x10000) {
        u[0] = (char)(0xe0 | (cp >> 12));
        u[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
        u[2] = (char)(0x80 | (cp & 0x3f));
        n = 3;
    } else {
        u[0] = (char)(0xf0 | (cp >> 18));
        u[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
        u[2] = (char)(0x80 | ((cp >> 6) & 0x3f));
        u[3] = (char)(0x80 | (cp & 0x3f));
        n = 4;
    }
    db_buf_append(b, u, n);
}

/* The string starting at *pp (its opening quote), unescaped and appended to out when out is not NULL (else
 * only checked). Advances *pp past the closing quote. Returns 0, or -1 when it is not a valid JSON string. */
static int scan_string(const char **pp, const char *end, struct db_buf *out)
{
    const char *p = *pp + 1;
    for (;;) {
        const char *run = p;
        while (p < end && *p != '"' && *p != '\\' && (unsigned char)*p >= 0x20 && (unsigned char)*p < 0x80)
            p++;
        if (out && p > run)
            db_buf_append(out, run, (size_t)(p - run));
        if (p >= end)
            return -1;
        unsigned char c = (unsigned char)*p;
        if (c == '"') {
            *pp = p + 1;
            return 0;
        }
        if (c < 0x20)
            return -1;
        if (c >= 0x80) {
            size_t n = utf8_len((const unsigned char *)p, (const unsigned char *)end);
            if (!n)
                return -1;
            if (out)
                db_buf_append(out, p, n);
            p += n;
            continue;
        }
        /* a backslash */
        if (++p >= end)
            return -1;
        char e = *p++, lit = 0;
        switch (e) {
        case '"': lit = '"'; break;
        case '\\': lit = '\\'; break;
        case '/': lit = '/'; break;
        case 'b': lit = '\b'; break;
        case 'f': lit = '\f'; break;
        case 'n': lit = '\n'; break;
        case 'r': lit = '\r'; break;
        case 't': lit = '\t'; break;
        case 'u': {
            unsigned cp, lo;
            if (hex4(p, end, &cp) < 0)
                return -1;
            p += 4;
            if (cp >= 0xdc00 && cp <= 0xdfff)
                return -1; /* a lone low surrogate */
            if (cp >= 0xd800 && cp <= 0xdbff) {
                if (end - p < 6 || p[0] != '\\' || p[1] != 'u' || hex4(p + 2, end, &lo) < 0 || lo < 0xdc00 ||
                    lo > 0xdfff)
                    return -1;
                p += 6;
                cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
            }
            if (out)
                put_utf8(out, cp);
            continue;
        }
        default: return -1;
        }
        if (out)
            db_buf_append(out, &lit, 1);
    }
}

/* The double a JSON real number [s, end) (grammar already checked) stands for, without strtod when that can
 * be done exactly: strtod's correct rounding (arbitrary precision) was the largest cost of a bulk insert of
 * floats. The significand (up to 19 digits) and a power of ten up to 10^22 are exact doubles when the
 * significand is below 2^53, so one division or multiplication rounds correctly (Clinger's fast path);
 * beyond that, up to 10^27, both are exact in x87 long double (64-bit mantissa), whose one rounding is then
 * rounded again to double, which is right unless the long double lies within an ulp of a halfway point
 * between two doubles: those, and everything else, go to strtod. Returns false for strtod's cases. */
static bool fast_real(const char *s, const char *end, double *out)
{
    static const double p10[] = {1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,  1e8,  1e9,  1e10, 1e11,
                                 1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};
    bool neg = *s == '-';
    s += neg;
    uint64_t m = 0;
    int digits = 0, e10 = 0;
    for (bool frac = false; s < end; s++) {
        if (*s == '.') {
            frac = true;
            continue;
        }
        if (*s < '0' || *s > '9')
            break;
        if (digits || *s != '0') { /* leading zeros do not count */
            if (digits == 19)
                return false;
            m = m * 10 + (uint64_t)(*s - '0');
            digits++;
        }
        e10 -= frac;
    }
    if (s < end) { /* the exponent */
        bool eneg = *++s == '-';
        s += *s == '-' || *s == '+';
        int e = 0;
        for (; s < end; s++) {
            if (e > 1000)
                return false;
            e = e * 10 + (*s - '0');
        }
        e10 += eneg ? -e : e;
    }
    double d;
    if (m == 0) {
        d = 0.0;
    } else if (m <= (1ull << 53) && e10 >= -22 && e10 <= 22) {
        d = e10 < 0 ? (double)m / p10[-e10] : (double)m * p10[e10];
    } else {
#if (defined(__x86_64__) || defined(__i386__)) && LDBL_MANT_DIG == 64
        static const long double p10l[] = {1e0L,  1e1L,  1e2L,  1e3L,  1e4L,  1e5L,  1e6L,  1e7L,  1e8L,  1e9L,
                                           1e10L, 1e11L, 1e12L, 1e13L, 1e14L, 1e15L, 1e16L, 1e17L, 1e18L, 1e19L,
                                           1e20L, 1e21L, 1e22L, 1e23L, 1e24L, 1e25L, 1e26L, 1e27L};
        if (e10 < -27 || e10 > 27)
            return false;
        long double x = e10 < 0 ? (long double)m / p10l[-e10] : (long double)m * p10l[e10];
        uint64_t mant;
        memcpy(&mant, &x, sizeof mant); /* the 64-bit mantissa: the low 11 bits are what double drops */
        unsigned low = (unsigned)(mant & 0x7ff);
        if (low >= 0x3ff && low <= 0x401)
            return false;
        d = (double)x;
#else
        return false;
#endif
    }
    *out = neg ? -d : d;
    return true;
}

/* A JSON number at *pp: its grammar checked, then read as jansson reads it (an int unless it has a fraction
 * or an exponent). Returns 0, -1 when malformed, -2 when it does not fit (int64, or a finite double). */
static int scan_number(const char **pp, const char *end, struct db_value *v)
{
    const char *p = *pp, *start = p;
    bool real = false;
    if (p < end && *p == '-')
        p++;
    if (p >= end || *p < '0' || *p > '9')
        return -1;
    if (*p == '0')
        p++;
    else
        while (p < end && *p >= '0' && *p <= '9')
            p++;
    if (p < end && *p == '.') {
        real = true;
        if (++p >= end || *p < '0' || *p > '9')
            return -1;
        while (p < end && *p >= '0' && *p <= '9')
            p++;
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        real = true;
        if (++p < end && (*p == '+' || *p == '-'))
            p++;
        if (p >= end || *p < '0' || *p > '9')
            return -1;
        while (p < end && *p >= '0' && *p <= '9')
            p++;
    }
    *pp = p;
    if (!v)
        return 0;
    if (!real && p - start <= 18) {
        /* Up to 18 digits always fit in int64: read them here (the common case in bulk rows) */
        const char *d = start + (*start == '-');
        long long i = 0;
        for (; d < p; d++)
            i = i * 10 + (*d - '0');
        v->type = DBV_INT;
        v->i = *start == '-' ? -i : i;
        return 0;
    }
    if (real && fast_real(start, p, &v->d)) {
        v->type = DBV_REAL;
        return 0;
    }
    char num[400];
    size_t n = (size_t)(p - start);
    if (n >= sizeof num)
        return -2; /* longer than any int64; a real this long is refused rather than truncated */
    memcpy(num, start, n);
    num[n] = '\0';
    errno = 0;
    if (!real) {
        long long i = strtoll(num, NULL, 10);
        if (errno == ERANGE)
            return -2;
        v->type = DBV_INT;
        v->i = i;
    } else {
        double d = strtod(num, NULL);
        if (errno == ERANGE && (d == HUGE_VAL || d == -HUGE_VAL))
            return -2;
        v->type = DBV_REAL;
        v->d = d;
    }
    return 0;
}

static int literal(const char **pp, const char *end, const char *word)
{
    size_t n = strlen(word);
    if ((size_t)(end - *pp) < n || memcmp(*pp, word, n) != 0)
        return -1;
    *pp += n;
    return 0;
}

/* Skips (and checks the grammar of) one value of any kind. Returns 0, or -1 when malformed. */
static int skip_value(const char **pp, const char *end, int depth)
{
    const char *p = skip_ws(*pp, end);
    if (p >= end || depth > MAX_DEPTH)
        return -1;
    int rc = 0;
    switch (*p) {
    case '"': rc = scan_string(&p, end, NULL); break;
    case 't': rc = literal(&p, end, "true"); break;
    case 'f': rc = literal(&p, end, "false"); break;
    case 'n': rc = literal(&p, end, "null"); break;
    case '[':
    case '{': {
        char close = *p == '[' ? ']' : '}';
        bool object = *p == '{';
        p = skip_ws(p + 1, end);
        if (p < end && *p == close) {
            p++;
            break;
        }
        for (;;) {
            if (object) {
                p = skip_ws(p, end);
                if (p >= end || *p != '"' || scan_string(&p, end, NULL) < 0)
                    return -1;
                p = skip_ws(p, end);
                if (p >= end || *p++ != ':')
                    return -1;
            }
            if ((rc = skip_value(&p, end, depth + 1)) < 0)
                return rc;
            p = skip_ws(p, end);
            if (p < end && *p == ',') {
                p++;
                continue;
            }
            if (p < end && *p == close) {
                p++;
                break;
            }
            return -1;
        }
        break;
    }
    default:
        /* Only the grammar: the value is read (and a number out of range found) by the pass that uses it. */
        rc = scan_number(&p, end, NULL);
        break;
    }
    *pp = p;
    return rc;
}

/* The state of a structural pass over a list (count_elements). */
struct shape {
    size_t depth;     /* open brackets and braces */
    size_t commas;    /* commas seen at depth 1 */
    bool in_string;
    const char *close; /* the bracket that closed the list, once found */
};

/* The structural pass byte by byte over [p, stop), or beyond stop by one when an escape straddles it.
 * Returns where it stopped. */
static const char *shape_bytes(struct shape *s, const char *p, const char *stop)
{
    while (p < stop) {
        char c = *p;
        if (s->in_string) {
            if (c == '\\')
                p++;
            else if (c == '"')
                s->in_string = false;
            p++;
            continue;
        }
        switch (c) {
        case '"': s->in_string = true; break;
        case '[':
        case '{': s->depth++; break;
        case ']':
        case '}':
            if (--s->depth == 0) {
                s->close = p;
                return p + 1;
            }
            break;
        case ',': s->commas += s->depth == 1; break;
        default: break;
        }
        p++;
    }
    return p;
}

#ifdef SCAN64
/* The structural pass over the 64 bytes at p, which hold no backslash: strings by the parity of the quotes
 * before each byte, then depth changes at the brackets and braces outside strings, and the commas between
 * them counted while the depth is 1. Rows go by in a few steps each instead of a branch per byte. */
static void shape_block(struct shape *s, const char *p, const struct scan64 *v)
{
    uint64_t inside = scan64_in_strings(v, &s->in_string);
    uint64_t opens = scan64_equal(v, '{', true) & ~inside; /* '[' and '{' differ in bit 5 only */
    uint64_t closes = scan64_equal(v, '}', true) & ~inside; /* ']' and '}' likewise */
    uint64_t commas = scan64_equal(v, ',', false) & ~inside;
    uint64_t brackets = opens | closes, from = ~0ull;
    while (brackets) {
        int b = __builtin_ctzll(brackets);
        uint64_t bit = 1ull << b;
        if (s->depth == 1)
            s->commas += (size_t)__builtin_popcountll(commas & from & (bit - 1));
        if (opens & bit) {
            s->depth++;
        } else if (--s->depth == 0) {
            s->close = p + b;
            return;
        }
        from = b == 63 ? 0 : ~0ull << (b + 1);
        brackets &= brackets - 1;
    }
    if (s->depth == 1)
        s->commas += (size_t)__builtin_popcountll(commas & from);
}
#endif

/* The number of elements of the list at p ('['), found from its structure alone: strings are skipped (an
 * escaped quote does not end one), brackets and braces counted, commas at the top level counted. Nothing
 * else is checked here: db_raw_rows_next reads every value and separator strictly, so a list this count
 * gets wrong is malformed, and its reading fails. Returns 0, or -1 when the text ends inside the list. */
static int count_elements(const char *p, const char *end, size_t *count)
{
    struct shape s = {0};
    const char *first = skip_ws(p + 1, end);
    while (!s.close && p < end) {
#ifdef SCAN64
        if (end - p >= 64) {
            struct scan64 v;
            scan64_load(&v, p);
            if (!scan64_equal(&v, '\\', false)) {
                shape_block(&s, p, &v);
                p += 64;
                continue;
            }
            p = shape_bytes(&s, p, p + 64); /* escapes: rare in bulk rows */
            continue;
        }
#endif
        p = shape_bytes(&s, p, end);
    }
    if (!s.close)
        return -1;
    *count = s.close == first ? 0 : s.commas + 1;
    return 0;
}

int db_raw_rows_start(struct db_raw_rows *r, const char *text, size_t len)
{
    memset(r, 0, sizeof *r);
    const char *end = text + len, *p = skip_ws(text, end);
    if (p >= end || *p != '[')
        return DB_RAW_NOT_A_LIST;
    r->p = skip_ws(p + 1, end);
    r->end = end;
    return 0;
}

int db_raw_rows_count(const char *text, size_t len, size_t *count)
{
    const char *end = text + len, *p = skip_ws(text, end);
    if (p >= end || *p != '[')
        return DB_RAW_NOT_A_LIST;
    return count_elements(p, end, count) < 0 ? DB_RAW_MALFORMED : 0;
}

int db_raw_rows_open(struct db_raw_rows *r, const char *text, size_t len)
{
    /* Counted first, since progress reports need the total; only the structure, in one quick pass: the
     * values are checked as their rows are read (a malformed list then aborts the COPY, so nothing lands,
     * just as for a number out of range). A grammar pass here cost more than reading the rows. */
    int rc = db_raw_rows_start(r, text, len);
    if (rc == 0)
        rc = db_raw_rows_count(text, len, &r->count);
    return rc;
}

/* Reads one scalar or container at *pp into v; strings go to scratch (v->s is then an offset until the row is
 * done, see db_raw_rows_next). */
static int read_value(struct db_raw_rows *r, const char **pp, struct db_value *v)
{
    const char *p = *pp;
    memset(v, 0, sizeof *v);
    int rc = 0;
    switch (*p) {
    case '"': {
        size_t at = r->scratch.len;
        rc = scan_string(&p, r->end, &r->scratch);
        v->type = DBV_STR;
        v->s = (const char *)(uintptr_t)at;
        v->len = r->scratch.len - at;
        break;
    }
    case 't':
        rc = literal(&p, r->end, "true");
        v->type = DBV_BOOL;
        v->b = true;
        break;
    case 'f':
        rc = literal(&p, r->end, "false");
        v->type = DBV_BOOL;
        break;
    case 'n':
        rc = literal(&p, r->end, "null");
        v->type = DBV_NULL;
        break;
    case '[':
    case '{': {
        const char *start = p;
        rc = skip_value(&p, r->end, 2);
        v->type = *start == '[' ? DBV_LIST : DBV_DICT;
        v->s = start;
        v->len = (size_t)(p - start);
        break;
    }
    default: rc = scan_number(&p, r->end, v); break;
    }
    *pp = p;
    return rc;
}

int db_raw_rows_next(struct db_raw_rows *r, struct db_value *vals, size_t max, size_t *n, bool *is_list)
{
    const char *p = r->p;
    *n = 0;
    if (p >= r->end)
        return DB_RAW_MALFORMED;
    if (*p == ']') /* the end: nothing may follow but whitespace */
        return skip_ws(p + 1, r->end) == r->end ? 0 : DB_RAW_MALFORMED;
    r->scratch.len = 0;
    int rc = 0;
    if (*p == '[') {
        *is_list = true;
        p = skip_ws(p + 1, r->end);
        if (p < r->end && *p == ']') {
            p++;
        } else {
            for (;;) {
                struct db_value spare;
                rc = read_value(r, &p, *n < max ? &vals[*n] : &spare);
                if (rc < 0)
                    break;
                (*n)++;
                p = skip_ws(p, r->end);
                if (p < r->end && *p == ',') {
                    p = skip_ws(p + 1, r->end);
                    continue;
                }
                if (p < r->end && *p == ']') {
                    p++;
                    break;
                }
                rc = -1;
                break;
            }
        }
    } else {
        *is_list = false;
        rc = read_value(r, &p, &vals[0]);
        *n = 1;
    }
    if (rc < 0)
        return rc == -2 ? DB_RAW_OVERFLOW : DB_RAW_MALFORMED;
    /* The scratch buffer may have moved while the row was read: offsets become pointers now. */
    for (size_t i = 0; i < *n && i < max; i++)
        if (vals[i].type == DBV_STR)
            vals[i].s = r->scratch.data + (uintptr_t)vals[i].s;
    /* The row must be followed by a comma and another row, or by the list's end (read by the next call). */
    p = skip_ws(p, r->end);
    if (p < r->end && *p == ',') {
        p = skip_ws(p + 1, r->end);
        if (p >= r->end || *p == ']')
            return DB_RAW_MALFORMED;
    } else if (p >= r->end || *p != ']') {
        return DB_RAW_MALFORMED;
    }
    r->p = p;
    return 1;
}

void db_raw_rows_close(struct db_raw_rows *r)
{
    db_buf_free(&r->scratch);
}

json_t *db_value_json(const struct db_value *v)
{
    if (v->json)
        return json_incref((json_t *)v->json);
    switch (v->type) {
    case DBV_NULL: return json_null();
    case DBV_BOOL: return json_boolean(v->b);
    case DBV_INT: return json_integer(v->i);
    case DBV_REAL: return json_real(v->d);
    case DBV_STR: return json_stringn_nocheck(v->s, v->len);
    case DBV_LIST:
    case DBV_DICT: return json_loadb(v->s, v->len, JSON_ALLOW_NUL, NULL);
    }
    return NULL;
}

void db_value_of_json(const json_t *j, struct db_value *v)
{
    memset(v, 0, sizeof *v);
    v->json = j;
    switch (j ? json_typeof(j) : JSON_NULL) {
    case JSON_NULL: v->type = DBV_NULL; break;
    case JSON_TRUE:
    case JSON_FALSE:
        v->type = DBV_BOOL;
        v->b = json_is_true(j);
        break;
    case JSON_INTEGER:
        v->type = DBV_INT;
        v->i = json_integer_value(j);
        break;
    case JSON_REAL:
        v->type = DBV_REAL;
        v->d = json_real_value(j);
        break;
    case JSON_STRING:
        v->type = DBV_STR;
        v->s = json_string_value(j);
        v->len = json_string_length(j);
        break;
    case JSON_ARRAY: v->type = DBV_LIST; break;
    case JSON_OBJECT: v->type = DBV_DICT; break;
    }
}
