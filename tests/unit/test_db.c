/* Unit tests for db/'s pure parts: identifiers, table names and the allow-list, connection-string redaction,
 * JSON -> COPY encoding (text and binary), result values -> JSON, and SQLSTATE -> exception names.
 * The tasks themselves, against a real PostgreSQL, are in tests/integration/test_postgres.py. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "db.h"

static void test_identifiers(void **state)
{
    (void)state;
    static const char *const good[] = {"items",
                                       "_x",
                                       "a$1",
                                       "Items",
                                       "\303\234nic\303\270de", /* octal: a hex escape would swallow "de" */
                                       "t2"};
    static const char *const bad[] = {"", "1a", "$a", "a b", "a;b", "a\"b", "a.b", "a-b", "a)", "a\tb"};
    for (size_t i = 0; i < sizeof good / sizeof *good; i++)
        assert_true(db_ident_valid(good[i], strlen(good[i])));
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
        assert_false(db_ident_valid(bad[i], strlen(bad[i])));
    char name[65];
    memset(name, 'n', 64);
    name[64] = '\0';
    assert_false(db_ident_valid(name, 64)); /* PostgreSQL would truncate it to 63 */
    assert_true(db_ident_valid(name, 63));
    assert_false(db_ident_valid("ab\0c", 4));
    assert_false(db_ident_valid(NULL, 0));

    struct db_buf b = {0};
    db_quote_ident(&b, "a\"b");
    db_buf_puts(&b, " ");
    db_quote_ident(&b, "Items");
    assert_string_equal(b.data, "\"a\"\"b\" \"Items\"");
    db_buf_free(&b);
}

static void test_table_names(void **state)
{
    (void)state;
    struct db_table t;
    struct db_buf b = {0};
    assert_int_equal(db_table_parse("items", 5, &t), 0);
    assert_string_equal(t.schema, "");
    assert_string_equal(t.name, "items");
    assert_int_equal(db_table_parse("public.items", 12, &t), 0);
    assert_string_equal(t.schema, "public");
    assert_string_equal(t.name, "items");
    db_quote_table(&b, &t);
    assert_string_equal(b.data, "\"public\".\"items\"");
    db_buf_free(&b);
    static const char *const bad[] = {"", "a.b.c", ".a", "a.", "a..b", "a b", "items; DROP TABLE items", "\"items\""};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
        assert_int_equal(db_table_parse(bad[i], strlen(bad[i]), &t), -1);
}

static void test_allow_list(void **state)
{
    (void)state;
    struct db_allow a;
    struct db_table t;
    char err[256];
    assert_int_equal(db_allow_parse(" items , public.events,Mixed", &a, err, sizeof err), 0);
    assert_int_equal(a.n, 3);
    const struct {
        const char *name;
        bool allowed;
    } cases[] = {
        {"items", true}, {"public.items", false}, {"public.events", true}, {"events", false},
        {"Mixed", true}, {"mixed", false},        {"other.items", false},  {"item", false},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        assert_int_equal(db_table_parse(cases[i].name, strlen(cases[i].name), &t), 0);
        assert_int_equal(db_allow_has(&a, &t), cases[i].allowed);
    }
    db_allow_clear(&a);

    assert_int_equal(db_allow_parse(NULL, &a, err, sizeof err), 0);
    assert_int_equal(a.n, 0);
    assert_int_equal(db_allow_parse("", &a, err, sizeof err), 0);
    assert_int_equal(a.n, 0);
    assert_int_equal(db_table_parse("items", 5, &t), 0);
    assert_false(db_allow_has(&a, &t));

    static const char *const bad[] = {"a,,b", "a,", "a b", "x;y", "a.b.c", ","};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        assert_int_equal(db_allow_parse(bad[i], &a, err, sizeof err), -1);
        assert_non_null(strstr(err, "invalid table name"));
        assert_int_equal(a.n, 0);
        assert_null(a.tables);
    }
    assert_int_equal(db_allow_parse("good, bad name", &a, err, sizeof err), -1);
    assert_string_equal(err, "invalid table name 'bad name' in the table list 'good, bad name' (expected name or "
                             "schema.name)");
}

static void test_dsn_redaction(void **state)
{
    (void)state;
    static const char *const cases[][2] = {
        {"postgresql://u:secret@h:5432/db", "postgresql://u:**@h:5432/db"},
        {"postgres://u:sec@ret@h/db", "postgres://u:**@h/db"},
        {"postgresql://u:se/cr?et@h/db", "postgresql://u:**@h/db"},
        {"postgresql://u@h/db?password=secret&sslmode=require", "postgresql://u@h/db?password=**&sslmode=require"},
        {"postgresql://u:a@h/db?sslmode=require&password=b", "postgresql://u:**@h/db?sslmode=require&password=**"},
        {"postgresql://h/db", "postgresql://h/db"},
        {"postgresql://u@h:5432/db", "postgresql://u@h:5432/db"},
        {"host=h password=secret dbname=d", "host=h password=** dbname=d"},
        {"password=secret", "password=**"},
        {"host=h password = 'se cret\\' x' dbname=d", "host=h password = ** dbname=d"},
        {"host=h password=s3cr3t dbname", "host=h password=** dbname"},
        {"host=h dbname=password", "host=h dbname=password"},
        {"host=h dbname=d", "host=h dbname=d"},
        {"", ""},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        char *r = db_dsn_redact(cases[i][0]);
        assert_string_equal(r, cases[i][1]);
        free(r);
    }
}

/* ---- COPY encoding ---- */

/* The rows read from their text (rows.c), as the bulk tasks read a raw_param. */
static int encode_raw(struct db_copy *c, const char *rows_json, char *err, size_t errlen)
{
    struct db_raw_rows r;
    int rc = db_raw_rows_open(&r, rows_json, strlen(rows_json));
    assert_int_equal(rc, 0);
    struct db_value vals[16];
    size_t n, i = 0;
    bool is_list;
    db_copy_begin(c);
    while (rc == 0 && db_raw_rows_next(&r, vals, c->ncols, &n, &is_list) == 1)
        rc = db_copy_values(c, vals, n, is_list, i++, "rows", err, errlen);
    if (rc == 0) {
        assert_int_equal(i, r.count);
        db_copy_end(c);
    }
    db_raw_rows_close(&r);
    return rc;
}

/* Encodes through jansson, and checks that reading the same text raw gives the same bytes or error. */
static int encode(struct db_copy *c, const char *rows_json, char *err, size_t errlen)
{
    json_error_t jerr;
    json_t *rows = json_loads(rows_json, JSON_ALLOW_NUL, &jerr);
    assert_non_null(rows);
    int rc = 0;
    db_copy_begin(c);
    for (size_t i = 0; i < json_array_size(rows) && rc == 0; i++)
        rc = db_copy_row(c, json_array_get(rows, i), i, "rows", err, errlen);
    if (rc == 0)
        db_copy_end(c);
    json_decref(rows);

    struct db_copy raw = *c;
    raw.out = (struct db_buf){0};
    char raw_err[256] = "";
    assert_int_equal(encode_raw(&raw, rows_json, raw_err, sizeof raw_err), rc);
    if (rc == 0) {
        assert_int_equal(raw.out.len, c->out.len);
        assert_memory_equal(raw.out.data, c->out.data, c->out.len);
    } else {
        assert_string_equal(raw_err, err);
    }
    db_buf_free(&raw.out);
    return rc;
}


/* The row count and the rows read agree with jansson's parse of the same list. */
static void assert_count_as_jansson(const char *text, size_t len)
{
    json_error_t jerr;
    json_t *j = json_loadb(text, len, JSON_ALLOW_NUL, &jerr);
    assert_non_null(j);
    struct db_raw_rows r;
    assert_int_equal(db_raw_rows_open(&r, text, len), 0);
    assert_int_equal(r.count, json_array_size(j));
    struct db_value vals[4];
    size_t n, rows = 0;
    bool is_list;
    int rc;
    while ((rc = db_raw_rows_next(&r, vals, 4, &n, &is_list)) == 1)
        rows++;
    assert_int_equal(rc, 0);
    assert_int_equal(rows, json_array_size(j));
    db_raw_rows_close(&r);
    /* Counted apart (as a bulk task does for long lists, on a second thread) and read without a count: the
     * same answers. */
    size_t count = (size_t)-1;
    assert_int_equal(db_raw_rows_count(text, len, &count), 0);
    assert_int_equal(count, json_array_size(j));
    assert_int_equal(db_raw_rows_start(&r, text, len), 0);
    assert_int_equal(r.count, 0);
    for (rows = 0; (rc = db_raw_rows_next(&r, vals, 4, &n, &is_list)) == 1;)
        rows++;
    assert_int_equal(rc, 0);
    assert_int_equal(rows, json_array_size(j));
    db_raw_rows_close(&r);
    json_decref(j);
}


/* Reads every row of an opened list (rc: what opening it returned); returns the status that ended it. */
static int read_to_end(struct db_raw_rows *r, int rc)
{
    while (rc == 0 || rc == 1) {
        struct db_value vals[4];
        size_t n;
        bool is_list;
        rc = db_raw_rows_next(r, vals, 4, &n, &is_list);
    }
    return rc;
}

static void test_raw_rows(void **state)
{
    (void)state;
    /* Values jansson reads one way and a hand-written reader could read another. */
    static const enum db_kind kinds[] = {DB_KIND_TEXT, DB_KIND_FLOAT8, DB_KIND_INT8, DB_KIND_JSON};
    static const char *const names[] = {"t", "f", "i", "j"};
    struct db_copy c = {.ncols = 4, .kinds = kinds, .names = names, .binary = false};
    char err[256] = "";
    assert_int_equal(encode(&c,
                            "[[\"\\u00e9\\ud83d\\ude00\\/\\b\\f\", -0.0, -9223372036854775808, {\"a\": [1, {}]}],"
                            " [\"\xc3\xa9 caf\xc3\xa9\", 1e-300, 123456789012345678, \"s\"],"
                            "  [ \"\" , 12345678901234567890e-3 , -0 , [ ] ] ]",
                            err, sizeof err),
                     0);
    db_buf_free(&c.out);
    /* Lists whose row count a structural pass could get wrong: brackets, commas, quotes and backslashes inside
     * strings, nested lists and objects, bare values, whitespace everywhere. The count must be jansson's. */
    static const char *const tricky[] = {
        "[]", " [ ] ", "[[]]", "[ [ ] , [ ] ]", "[[\"],[\", \"\\\\\"], [\"\\\"]\", 1]]",
        "[[{\"a,b\": [1, 2, {\"]\": \"[\"}]}, \"}\"], 3, \"x\", null, {\"k\": [[]]}]",
        "\n[\t[1 ,2 ] ,\r\n[3] ]\n", "[[\"\\\\\"], [\"\\\\\\\"\\\\\"]]",
    };
    for (size_t i = 0; i < sizeof tricky / sizeof tricky[0]; i++) {
        assert_count_as_jansson(tricky[i], strlen(tricky[i]));
    }
    /* Long lists, so that the 64-byte blocks of the count start everywhere: inside strings (with and without
     * escapes), on brackets, commas and quotes. */
    static const char *const pieces[] = {"[1, \"a,]\"]", "{\"k[\": [[], {}], \"v\": \"}\"}", "\"\\\"],[\"",
                                         "[[[\",\"]]]", "[\"x\\\\\", \"\\\\\"]", "17", "null",
                                         "[\"0123456789abcdefghijklmnopqrstuvwxyz,[]{}0123456789\"]"};
    for (size_t shift = 0; shift < 70; shift += 3) {
        struct db_buf text = {0};
        db_buf_puts(&text, "[");
        for (size_t pad = 0; pad < shift; pad++)
            db_buf_puts(&text, " ");
        for (size_t i = 0; i < 300; i++) {
            if (i)
                db_buf_puts(&text, i % 7 ? "," : " ,\n ");
            db_buf_puts(&text, pieces[(i * 5 + shift) % (sizeof pieces / sizeof pieces[0])]);
        }
        db_buf_puts(&text, " ]");
        assert_count_as_jansson(text.data, text.len);
        struct db_raw_rows r;
        struct db_value vals[4];
        size_t n;
        bool is_list;
        /* Cut short anywhere inside, the list does not end: open or the reading must say so. */
        for (size_t cut = 1; cut < text.len; cut += 97) {
            int rc = db_raw_rows_open(&r, text.data, text.len - cut);
            while (rc == 0 || rc == 1)
                rc = db_raw_rows_next(&r, vals, 4, &n, &is_list);
            assert_int_equal(rc, DB_RAW_MALFORMED);
            db_raw_rows_close(&r);
            /* Without the count (a long list is counted apart while it is read), the reading alone finds it. */
            rc = db_raw_rows_start(&r, text.data, text.len - cut);
            while (rc == 0 || rc == 1)
                rc = db_raw_rows_next(&r, vals, 4, &n, &is_list);
            assert_int_equal(rc, DB_RAW_MALFORMED);
            db_raw_rows_close(&r);
        }
        db_buf_free(&text);
    }
    /* What must fail as the whole body would have failed to parse. */
    static const struct {
        const char *text;
        int rc;
    } bad[] = {
        {"{\"a\": 1}", DB_RAW_NOT_A_LIST}, {"\"rows\"", DB_RAW_NOT_A_LIST}, {"[[1, 2]", DB_RAW_MALFORMED},
        {"[[01]]", DB_RAW_MALFORMED},      {"[[\"\\ud800\"]]", DB_RAW_MALFORMED}, {"[[\"a\tb\"]]", DB_RAW_MALFORMED},
        {"[[\"\xc3\"]]", DB_RAW_MALFORMED}, {"[[1,]]", DB_RAW_MALFORMED},          {"[[tru]]", DB_RAW_MALFORMED},
        {"[[9223372036854775808]]", DB_RAW_OVERFLOW}, {"[[1e400]]", DB_RAW_OVERFLOW},
        /* The count looks at the structure only: what it would count wrong must fail when read. */
        {"[[1] [2]]", DB_RAW_MALFORMED}, {"[[1],]", DB_RAW_MALFORMED}, {"[,[1]]", DB_RAW_MALFORMED},
        {"[[1],,[2]]", DB_RAW_MALFORMED}, {"[[1]] [2]", DB_RAW_MALFORMED}, {"[[1]]]", DB_RAW_MALFORMED},
        {"[[1], [2}]", DB_RAW_MALFORMED}, {"[[\"a\\\"]]", DB_RAW_MALFORMED}, {"[[1], [2], 3 4]", DB_RAW_MALFORMED},
        {"[[1], [\"x\"] ", DB_RAW_MALFORMED}, {"[", DB_RAW_MALFORMED}, {"[[1], [2]], ", DB_RAW_MALFORMED},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        struct db_raw_rows r;
        /* Out-of-range numbers and malformed values are found when their row is read, at the latest by the
         * read after the last row, as copy_rows reads them; the reading alone (no count) says the same. */
        assert_int_equal(read_to_end(&r, db_raw_rows_open(&r, bad[i].text, strlen(bad[i].text))), bad[i].rc);
        db_raw_rows_close(&r);
        assert_int_equal(read_to_end(&r, db_raw_rows_start(&r, bad[i].text, strlen(bad[i].text))), bad[i].rc);
        db_raw_rows_close(&r);
        json_error_t jerr;
        json_t *j = json_loads(bad[i].text, JSON_ALLOW_NUL, &jerr);
        if (bad[i].rc != DB_RAW_NOT_A_LIST)
            assert_null(j); /* jansson refuses them too */
        json_decref(j);
    }
}

/* Reals read from the text must be the doubles strtod (jansson) reads, bit for bit, also where a fast path
 * could round differently: 16 to 19 significant digits, halfway cases, powers of ten at the edges of the
 * exact ranges, leading and trailing zeros, signs, exponents. */
static void test_raw_reals_agree_with_strtod(void **state)
{
    (void)state;
    static const char *const fixed[] = {
        "0.1", "-0.0", "0.0", "0e5", "1e22", "1e23", "1e-22", "1e-23", "9007199254740993.0", "9007199254740992.0",
        "9007199254740995.0", "18014398509481985.0", "1.7976931348623157e308", "2.2250738585072014e-308",
        "4.9e-324", "123456789012345678.9", "1234567890123456789.0", "12345678901234567890.0", "0.30000000000000004",
        "-365635.7558875988", "1e27", "1e-27", "1e28", "99999999999999999999e-27", "0.000001234567890123456789",
        "100000000000000000000000000.0", "1.00000000000000011102230246251565404236316680908203125",
        "1.00000000000000011102230246251565404236316680908203124", "5e-1", "2.5E+1", "7.038531e-26",
        "8.98846567431158e307", "3.4028234663852886e38", "1.0000000000000002", "0.9999999999999999",
        /* where rounding to 64 bits, then to 53, lands on the wrong double (found by search) */
        "0.08929252560655236842", "4438.053664255860440", "47042.93016311896281"};
    struct db_buf text = {0};
    db_buf_puts(&text, "[");
    size_t n = 0;
    uint32_t x = 4242;
    char num[64];
    for (size_t i = 0; i < sizeof fixed / sizeof fixed[0] + 20000; i++) {
        const char *v = i < sizeof fixed / sizeof fixed[0] ? fixed[i] : num;
        if (v == num) {
            /* random significands of 1 to 20 digits, a point anywhere, exponents around the fast ranges */
            x = x * 1103515245u + 12345u;
            int digits = 1 + (int)(x >> 8) % 20, point = (int)(x >> 16) % (digits + 1);
            size_t k = 0;
            if (x & 1)
                num[k++] = '-';
            for (int d = 0; d < digits; d++) {
                x = x * 1103515245u + 12345u;
                if (d == point && d)
                    num[k++] = '.';
                num[k++] = (char)('0' + (d == 0 ? 1 + (x >> 16) % 9 : (x >> 16) % 10));
            }
            if (point == 0 || point == digits)
                k += (size_t)snprintf(num + k, sizeof num - k, ".5");
            x = x * 1103515245u + 12345u;
            if (x & 2)
                k += (size_t)snprintf(num + k, sizeof num - k, "e%d", (int)((x >> 16) % 70) - 35);
            num[k] = '\0';
        }
        if (n++)
            db_buf_puts(&text, ", ");
        db_buf_puts(&text, "[");
        db_buf_puts(&text, v);
        db_buf_puts(&text, "]");
    }
    db_buf_puts(&text, "]");
    json_error_t jerr;
    json_t *j = json_loads(text.data, 0, &jerr);
    assert_non_null(j);
    struct db_raw_rows r;
    assert_int_equal(db_raw_rows_open(&r, text.data, text.len), 0);
    struct db_value vals[1];
    size_t got, i = 0;
    bool is_list;
    while (db_raw_rows_next(&r, vals, 1, &got, &is_list) == 1) {
        const json_t *want = json_array_get(json_array_get(j, i), 0);
        assert_int_equal(vals[0].type, DBV_REAL);
        double w = json_real_value(want);
        if (memcmp(&vals[0].d, &w, sizeof w) != 0)
            fail_msg("row %zu: read %.17g, strtod %.17g", i, vals[0].d, w);
        i++;
    }
    assert_int_equal(i, n);
    db_raw_rows_close(&r);
    json_decref(j);
    db_buf_free(&text);
}

static void test_copy_text(void **state)
{
    (void)state;
    static const enum db_kind kinds[] = {DB_KIND_INT4,  DB_KIND_TEXT,    DB_KIND_FLOAT8, DB_KIND_BOOL,
                                         DB_KIND_JSONB, DB_KIND_NUMERIC, DB_KIND_OTHER};
    static const char *const names[] = {"i", "t", "f", "b", "j", "n", "ts"};
    struct db_copy c = {.ncols = 7, .kinds = kinds, .names = names, .binary = false};
    char err[256] = "";
    assert_int_equal(
        encode(&c,
               "[[1, \"a\\tb\\\\c\\nd\\re\", 0.1, true, {\"k\": [1, 2.5, \"\\t\"]}, 19.99, \"2024-01-01\"],"
               " [null, null, null, null, null, null, null],"
               " [-5, \"\\\\N\", 3, false, 0.1, \"12.345\", \"x\"]]",
               err, sizeof err),
        0);
    assert_string_equal(c.out.data, "1\ta\\tb\\\\c\\nd\\re\t0.10000000000000001\tt\t{\"k\":[1,2.5,\"\\\\t\"]}\t19.99"
                                    "\t2024-01-01\n"
                                    "\\N\t\\N\t\\N\t\\N\t\\N\t\\N\t\\N\n"
                                    "-5\t\\\\N\t3\tf\t0.1\t12.345\tx\n");
    db_buf_free(&c.out);
}

static void test_copy_binary(void **state)
{
    (void)state;
    static const enum db_kind kinds[] = {DB_KIND_INT4, DB_KIND_TEXT,  DB_KIND_FLOAT8,
                                         DB_KIND_INT2, DB_KIND_JSONB, DB_KIND_BOOL};
    static const char *const names[] = {"i", "t", "f", "s", "j", "b"};
    struct db_copy c = {.ncols = 6, .kinds = kinds, .names = names, .binary = true};
    char err[256] = "";
    assert_int_equal(
        encode(&c, "[[1, \"ab\", 1.5, -2, [true], false], [null, \"\", 2, null, null, true]]", err, sizeof err), 0);
    static const unsigned char want[] = {
        'P',  'G',  'C',  'O',  'P',  'Y',  '\n', 0xff, '\r', '\n', 0,      /* signature */
        0,    0,    0,    0,    0,    0,    0,    0,                        /* flags, header extension */
        0,    6,                                                            /* row 1: 6 fields */
        0,    0,    0,    4,    0,    0,    0,    1,                        /* int4 1 */
        0,    0,    0,    2,    'a',  'b',                                  /* text */
        0,    0,    0,    8,    0x3f, 0xf8, 0,    0,    0,    0,    0,   0, /* float8 1.5 */
        0,    0,    0,    2,    0xff, 0xfe,                                 /* int2 -2 */
        0,    0,    0,    7,    1,    '[',  't',  'r',  'u',  'e',  ']',    /* jsonb: version 1, then the text */
        0,    0,    0,    1,    0,                                          /* false */
        0,    6,                                                            /* row 2 */
        0xff, 0xff, 0xff, 0xff,                                             /* NULL */
        0,    0,    0,    0,                                                /* empty text */
        0,    0,    0,    8,    0x40, 0,    0,    0,    0,    0,    0,   0, /* int 2 in a float8 column: 2.0 */
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,                     /* NULL, NULL */
        0,    0,    0,    1,    1,                                          /* true */
        0xff, 0xff,                                                         /* trailer */
    };
    assert_int_equal(c.out.len, sizeof want);
    assert_memory_equal(c.out.data, want, sizeof want);
    db_buf_free(&c.out);
}

static void test_copy_errors(void **state)
{
    (void)state;
    static const enum db_kind kinds[] = {DB_KIND_INT2, DB_KIND_TEXT,  DB_KIND_FLOAT4,
                                         DB_KIND_BOOL, DB_KIND_OTHER, DB_KIND_INT4};
    static const char *const names[] = {"s", "t", "r", "b", "ts", "i"};
    static const struct {
        const char *rows;
        const char *err;
    } cases[] = {
        {"[[1, \"a\", 1, true, \"x\", 1], [1, \"a\"]]", "rows[1]: expected 6 values (one per column), got 2"},
        {"[{\"s\": 1}]", "rows[0]: expected a list of 6 values, got dict"},
        {"[5]", "rows[0]: expected a list of 6 values, got int"},
        {"[[40000, \"a\", 1, true, \"x\", 1]]",
         "rows[0][0] (column \"s\", smallint): expected int in -32768..32767, got int"},
        {"[[1, 2, 1, true, \"x\", 1]]", "rows[0][1] (column \"t\", text): expected str, got int"},
        {"[[1, \"a\\u0000b\", 1, true, \"x\", 1]]", "rows[0][1] (column \"t\", text): expected str without NUL "
                                                    "characters (PostgreSQL text cannot hold them), got str"},
        {"[[1, \"a\", \"1.5\", true, \"x\", 1]]", "rows[0][2] (column \"r\", real): expected int or float, got str"},
        {"[[1, \"a\", 1e300, true, \"x\", 1]]",
         "rows[0][2] (column \"r\", real): expected int or float within real's range, got float"},
        {"[[1, \"a\", 1, 1, \"x\", 1]]", "rows[0][3] (column \"b\", boolean): expected bool, got int"},
        {"[[1, \"a\", 1, true, 17, 1]]", "rows[0][4] (column \"ts\", a type taking a string): expected str, got int"},
        {"[[1, \"a\", 1, true, \"x\", 2147483648]]",
         "rows[0][5] (column \"i\", integer): expected int in -2147483648..2147483647, got int"},
        {"[[1, \"a\", 1, true, \"x\", 1.0]]", "rows[0][5] (column \"i\", integer): expected int, got float"},
        {"[[1, \"a\", 1, true, \"x\", false]]", "rows[0][5] (column \"i\", integer): expected int, got bool"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        for (int binary = 0; binary < 2; binary++) {
            struct db_copy c = {.ncols = 6, .kinds = kinds, .names = names, .binary = binary};
            char err[256] = "";
            assert_int_equal(encode(&c, cases[i].rows, err, sizeof err), -1);
            assert_string_equal(err, cases[i].err);
            db_buf_free(&c.out);
        }
    }
}

static void test_copy_bare_scalars(void **state)
{
    (void)state;
    static const enum db_kind kinds[] = {DB_KIND_INT8};
    static const char *const names[] = {"id"};
    struct db_copy c = {.ncols = 1, .kinds = kinds, .names = names, .binary = false, .bare_scalars = true};
    char err[256] = "";
    assert_int_equal(encode(&c, "[1, [2], null, -3]", err, sizeof err), 0);
    assert_string_equal(c.out.data, "1\n2\n\\N\n-3\n");
    db_buf_free(&c.out);
    c.bare_scalars = false;
    assert_int_equal(encode(&c, "[1]", err, sizeof err), -1);
    assert_string_equal(err, "rows[0]: expected a list of 1 values, got int");
    db_buf_free(&c.out);
}

static void test_kinds(void **state)
{
    (void)state;
    assert_int_equal(db_kind_of_oid(23), DB_KIND_INT4);
    assert_int_equal(db_kind_of_oid(1043), DB_KIND_TEXT); /* varchar */
    assert_int_equal(db_kind_of_oid(3802), DB_KIND_JSONB);
    assert_int_equal(db_kind_of_oid(1114), DB_KIND_OTHER); /* timestamp */
    assert_true(db_kind_binary(DB_KIND_FLOAT8));
    assert_false(db_kind_binary(DB_KIND_NUMERIC));
    assert_false(db_kind_binary(DB_KIND_OTHER));
    assert_string_equal(db_kind_name(DB_KIND_FLOAT8), "double precision");
}

static void test_values_from_text(void **state)
{
    (void)state;
    static const struct {
        const char *text;
        unsigned oid;
        const char *json;
    } cases[] = {
        {"42", 20, "42"},
        {"-9223372036854775808", 20, "-9223372036854775808"},
        {"42.00", 1700, "42"},
        {"1.5", 1700, "1.5"},
        {"123456789012345678901234", 1700, "1.2345678901234568e23"},
        {"0.1", 701, "0.1"},
        {"3", 701, "3.0"}, /* a float8 stays a float */
        {"NaN", 701, "\"NaN\""},
        {"Infinity", 1700, "\"Infinity\""},
        {"t", 16, "true"},
        {"f", 16, "false"},
        {"{\"a\": [1, null]}", 3802, "{\"a\": [1, null]}"},
        {"hello", 25, "\"hello\""},
        {"2024-01-01 10:00:00", 1114, "\"2024-01-01 10:00:00\""},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        json_t *v = db_value_from_text(cases[i].text, strlen(cases[i].text), cases[i].oid);
        json_t *want = json_loads(cases[i].json, JSON_DECODE_ANY, NULL);
        assert_non_null(want);
        /* json_equal: same type (an int is not a float) and value */
        if (!json_equal(v, want))
            fail_msg("case %zu: %s (oid %u)", i, cases[i].text, cases[i].oid);
        json_decref(want);
        json_decref(v);
    }
}

static void test_format_double(void **state)
{
    (void)state;
    char out[32];
    static const struct {
        double d;
        const char *text;
    } cases[] = {{0.1, "0.1"},
                 {1.0 / 3, "0.3333333333333333"},
                 {1e300, "1e+300"},
                 {-2.5e-7, "-2.5e-07"},
                 {0.30000000000000004, "0.30000000000000004"},
                 {5, "5"}};
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        db_format_double(out, cases[i].d);
        assert_string_equal(out, cases[i].text);
    }
}

static void test_sqlstate_classes(void **state)
{
    (void)state;
    /* Checked against psycopg2 2.9's psycopg2.errors.lookup(code) base classes. */
    static const char *const cases[][2] = {
        {"23505", "IntegrityError"},
        {"23502", "IntegrityError"},
        {"22001", "DataError"},
        {"22P02", "DataError"},
        {"08006", "OperationalError"},
        {"57P01", "OperationalError"},
        {"57014", "QueryCanceledError"},
        {"42P01", "ProgrammingError"},
        {"42501", "ProgrammingError"},
        {"21000", "ProgrammingError"},
        {"40001", "TransactionRollbackError"},
        {"40P01", "TransactionRollbackError"},
        {"0A000", "NotSupportedError"},
        {"25P02", "InternalError"},
        {"XX000", "InternalError"},
        {"P0001", "InternalError"},
        {"53100", "OperationalError"},
        {"72000", "DatabaseError"},
        {"99999", "DatabaseError"},
        {"", "DatabaseError"},
        {"2350", "DatabaseError"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++)
        assert_string_equal(db_exc_type_for_sqlstate(cases[i][0]), cases[i][1]);
    assert_string_equal(db_exc_type_for_sqlstate(NULL), "DatabaseError");
}

static void test_configure(void **state)
{
    (void)state;
    char err[512];
    struct db_table t;
    assert_int_equal(db_table_parse("items", 5, &t), 0);
    assert_int_equal(db_configure("postgresql://u:pw@localhost:5432/db", "items", err, sizeof err), 0);
    assert_true(db_table_allowed(&t));
    assert_int_equal(db_configure("host=h password=s3cr3t dbname", "items", err, sizeof err), -1);
    assert_null(strstr(err, "s3cr3t"));
    assert_non_null(strstr(err, "invalid database URL 'host=h password=** dbname'"));
    assert_true(db_table_allowed(&t)); /* a failed call leaves the configuration as it was */
    assert_int_equal(db_configure(NULL, "a b", err, sizeof err), -1);
    assert_int_equal(db_configure(NULL, NULL, err, sizeof err), 0);
    assert_false(db_table_allowed(&t));
    db_shutdown();
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_identifiers),   cmocka_unit_test(test_table_names),
        cmocka_unit_test(test_allow_list),    cmocka_unit_test(test_dsn_redaction),
        cmocka_unit_test(test_copy_text),     cmocka_unit_test(test_copy_binary),
        cmocka_unit_test(test_copy_errors),   cmocka_unit_test(test_copy_bare_scalars),
        cmocka_unit_test(test_kinds),         cmocka_unit_test(test_values_from_text),
        cmocka_unit_test(test_format_double), cmocka_unit_test(test_sqlstate_classes),
        cmocka_unit_test(test_configure),     cmocka_unit_test(test_raw_rows), cmocka_unit_test(test_raw_reals_agree_with_strtod),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
