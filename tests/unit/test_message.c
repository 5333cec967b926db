/* Unit tests for worker/message.c: the captured and hand-made messages of tests/data/messages (see the
 * capture.py there for what each expected.json holds), then focused cases. Runs from the repo root. */
#include <dirent.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <jansson.h>

#include "message.h"

#define DATA_DIR "tests/data/messages"

/* ------------------------------------------------------------------------------------------------------ */
/* Helpers */

/* Reads a whole file; caller frees with free(). NULL when it cannot be read. */
static char *read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    char *data = NULL;
    size_t cap = 0, n = 0;
    if (!f)
        return NULL;
    for (;;) {
        if (cap - n < 4096) {
            cap = cap ? cap * 2 : 8192;
            char *p = realloc(data, cap);
            assert_non_null(p);
            data = p;
        }
        size_t got = fread(data + n, 1, cap - n, f);
        n += got;
        if (got == 0)
            break;
    }
    fclose(f);
    *len = n;
    return data;
}

static const struct {
    const char *name;
    int value;
} statuses[] = {
    {"MSG_OK", MSG_OK},
    {"MSG_ERR_JSON", MSG_ERR_JSON},
    {"MSG_ERR_ENVELOPE", MSG_ERR_ENVELOPE},
    {"MSG_ERR_BODY_ENCODING", MSG_ERR_BODY_ENCODING},
    {"MSG_ERR_CONTENT_TYPE", MSG_ERR_CONTENT_TYPE},
    {"MSG_ERR_UNKNOWN", MSG_ERR_UNKNOWN},
    {"MSG_ERR_TOO_LARGE", MSG_ERR_TOO_LARGE},
};

static const char *status_name(int st)
{
    for (size_t i = 0; i < sizeof statuses / sizeof statuses[0]; i++)
        if (statuses[i].value == st)
            return statuses[i].name;
    return "(not a msg_status)";
}

#define STR_FIELD(name) {#name, offsetof(struct msg_request, name)}
static const struct {
    const char *name;
    size_t off;
} str_fields[] = {
    STR_FIELD(task), STR_FIELD(id), STR_FIELD(shadow), STR_FIELD(root_id), STR_FIELD(parent_id),
    STR_FIELD(group), STR_FIELD(eta), STR_FIELD(expires), STR_FIELD(origin), STR_FIELD(argsrepr),
    STR_FIELD(kwargsrepr), STR_FIELD(content_type), STR_FIELD(content_encoding), STR_FIELD(body_encoding),
    STR_FIELD(correlation_id), STR_FIELD(reply_to), STR_FIELD(delivery_tag), STR_FIELD(exchange),
    STR_FIELD(routing_key),
};

static const char *other_fields[] = {"priority", "redelivered", "ignore_result", "protocol", "retries",
                                     "group_index", "time_limit", "soft_time_limit"};

/* Failures of one data case, printed as they are found so that every mismatch shows, not only the first. */
struct check {
    const char *name;
    int failures;
};

static void mismatch(struct check *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void mismatch(struct check *c, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "  %s: ", c->name);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    c->failures++;
}

static void check_str(struct check *c, const char *field, const struct msg_str *got, json_t *want)
{
    if (json_is_null(want)) {
        if (got->s)
            mismatch(c, "%s: want null, got \"%s\"", field, got->s);
        return;
    }
    if (!json_is_string(want)) {
        mismatch(c, "%s: expected.json holds neither a string nor null", field);
        return;
    }
    size_t wl = json_string_length(want);
    if (!got->s)
        mismatch(c, "%s: want \"%s\", got null", field, json_string_value(want));
    else if (got->len != wl || memcmp(got->s, json_string_value(want), wl) != 0 || got->s[got->len] != '\0')
        mismatch(c, "%s: want \"%s\", got \"%s\" (%zu bytes)", field, json_string_value(want), got->s,
                 got->len);
}

static void check_double(struct check *c, const char *field, bool has, double got, json_t *want)
{
    if (json_is_null(want)) {
        if (has)
            mismatch(c, "%s: want null, got %g", field, got);
    } else if (!has || got != json_number_value(want)) {
        mismatch(c, "%s: want %g, got %s%g", field, json_number_value(want), has ? "" : "(absent) ", got);
    }
}

static void check_other(struct check *c, const char *f, const struct msg_request *r, json_t *w)
{
    long long wi = json_is_integer(w) ? json_integer_value(w) : -12345;
    if (!strcmp(f, "priority") && r->priority != wi)
        mismatch(c, "priority: want %lld, got %d", wi, r->priority);
    else if (!strcmp(f, "protocol") && r->protocol != wi)
        mismatch(c, "protocol: want %lld, got %d", wi, r->protocol);
    else if (!strcmp(f, "retries") && r->retries != wi)
        mismatch(c, "retries: want %lld, got %lld", wi, r->retries);
    else if (!strcmp(f, "redelivered") && r->redelivered != json_is_true(w))
        mismatch(c, "redelivered: want %d, got %d", json_is_true(w), r->redelivered);
    else if (!strcmp(f, "ignore_result") && r->ignore_result != json_is_true(w))
        mismatch(c, "ignore_result: want %d, got %d", json_is_true(w), r->ignore_result);
    else if (!strcmp(f, "group_index")) {
        if (json_is_null(w) ? r->has_group_index : (!r->has_group_index || r->group_index != wi))
            mismatch(c, "group_index: want %s%lld, got %s%lld", json_is_null(w) ? "(null) " : "", wi,
                     r->has_group_index ? "" : "(absent) ", r->group_index);
    } else if (!strcmp(f, "time_limit"))
        check_double(c, f, r->has_time_limit, r->time_limit, w);
    else if (!strcmp(f, "soft_time_limit"))
        check_double(c, f, r->has_soft_time_limit, r->soft_time_limit, w);
}

/* Decodes DATA_DIR/<name>/message.json and compares with expected.json. Returns the number of mismatches. */
static int run_case(const char *name)
{
    char path[512];
    size_t len = 0;
    json_error_t jerr;
    struct check c = {name, 0};
    struct msg_request r = {0};
    char err[256] = "untouched";

    snprintf(path, sizeof path, DATA_DIR "/%s/message.json", name);
    char *raw = read_file(path, &len);
    snprintf(path, sizeof path, DATA_DIR "/%s/expected.json", name);
    json_t *exp = json_load_file(path, JSON_ALLOW_NUL, &jerr);
    if (!raw || !exp) {
        mismatch(&c, "cannot read message.json or expected.json (%s)", exp ? "" : jerr.text);
        free(raw);
        json_decref(exp);
        return c.failures;
    }
    int st = msg_decode(raw, len, 0, &r, err, sizeof err);
    const char *want_st = json_string_value(json_object_get(exp, "status"));
    json_t *fields = json_object_get(exp, "fields");
    if (!want_st || strcmp(want_st, status_name(st)) != 0)
        mismatch(&c, "status: want %s, got %s (%s)", want_st ? want_st : "?", status_name(st), err);

    bool ok = st == MSG_OK;
    if (ok && err[0] != '\0')
        mismatch(&c, "err not cleared on success: \"%s\"", err);
    if (!ok) {
        const char *has = json_string_value(json_object_get(exp, "error_has"));
        if (!has || !strstr(err, has))
            mismatch(&c, "error line \"%s\" does not contain \"%s\"", err, has ? has : "?");
        if (strchr(err, '\n'))
            mismatch(&c, "error line has a newline");
    }
    for (size_t i = 0; i < sizeof str_fields / sizeof str_fields[0]; i++) {
        json_t *w = json_object_get(fields, str_fields[i].name);
        if (!w) {
            if (ok)
                mismatch(&c, "expected.json lacks %s (every field is checked for MSG_OK)", str_fields[i].name);
            continue;
        }
        check_str(&c, str_fields[i].name,
                  (const struct msg_str *)(const void *)((const char *)&r + str_fields[i].off), w);
    }
    for (size_t i = 0; i < sizeof other_fields / sizeof other_fields[0]; i++) {
        json_t *w = json_object_get(fields, other_fields[i]);
        if (!w) {
            if (ok)
                mismatch(&c, "expected.json lacks %s", other_fields[i]);
            continue;
        }
        check_other(&c, other_fields[i], &r, w);
    }
    if (ok) {
        json_t *wb = json_object_get(exp, "body");
        size_t wl = json_string_length(wb);
        if (!json_is_string(wb) || !r.body || r.body_len != wl || memcmp(r.body, json_string_value(wb), wl) != 0 ||
            r.body[r.body_len] != '\0')
            mismatch(&c, "body: want %s, got %.*s", json_string_value(wb), (int)r.body_len,
                     r.body ? r.body : "(null)");
    }
    msg_request_clear(&r);
    free(raw);
    json_decref(exp);
    return c.failures;
}

static int is_case_dir(const struct dirent *d)
{
    return d->d_name[0] != '.' && strcmp(d->d_name, "capture.py") != 0 && strcmp(d->d_name, "__pycache__") != 0;
}

static void test_data_cases(void **state)
{
    (void)state;
    struct dirent **names = NULL;
    int n = scandir(DATA_DIR, &names, is_case_dir, alphasort);
    assert_true(n > 0);
    int failures = 0, good = 0, bad = 0;
    for (int i = 0; i < n; i++) {
        int f = run_case(names[i]->d_name);
        failures += f;
        if (strncmp(names[i]->d_name, "bad-", 4) == 0)
            bad++;
        else
            good++;
        free(names[i]);
    }
    free(names);
    fprintf(stderr, "  %d data cases (%d bad-*), %d mismatches\n", good + bad, bad, failures);
    /* Guards against a data directory that went missing or empty, which would pass vacuously. */
    assert_true(good >= 35);
    assert_true(bad >= 30);
    assert_int_equal(failures, 0);
}

/* A v2 message with the given extra header members (a JSON fragment starting with ", " or empty), the
 * given properties members, and the body (base64 text). Decoded into *r; returns the status. */
static char msgbuf[1 << 16];
static int decode_v2(const char *headers, const char *props, const char *body, struct msg_request *r,
                     char *err, size_t errlen)
{
    int n = snprintf(msgbuf, sizeof msgbuf,
                     "{\"body\": \"%s\", \"content-type\": \"application/json\", \"headers\": "
                     "{\"task\": \"t.x\", \"id\": \"id-1\"%s}, \"properties\": {\"correlation_id\": \"corr-1\", "
                     "\"body_encoding\": \"base64\"%s}}",
                     body, headers, props);
    assert_true(n > 0 && (size_t)n < sizeof msgbuf);
    return msg_decode(msgbuf, (size_t)n, 0, r, err, errlen);
}

static int decode_hdr(const char *headers, struct msg_request *r, char *err)
{
    return decode_v2(headers, "", "W10=", r, err, 256);
}

static int decode_str(const char *s, struct msg_request *r, char *err)
{
    return msg_decode(s, strlen(s), 0, r, err, 256);
}

/* ------------------------------------------------------------------------------------------------------ */
/* Focused tests */

static void test_base64_vectors(void **state)
{
    (void)state;
    static const char *plain[] = {"", "f", "fo", "foo", "foob", "fooba", "foobar"};
    static const char *enc[] = {"", "Zg==", "Zm8=", "Zm9v", "Zm9vYg==", "Zm9vYmE=", "Zm9vYmFy"};
    char e[32];
    unsigned char d[32];
    for (size_t i = 0; i < 7; i++) {
        size_t n = strlen(plain[i]);
        assert_int_equal(base64_encode((const unsigned char *)plain[i], n, e), strlen(enc[i]));
        assert_string_equal(e, enc[i]);
        assert_true(base64_decoded_max(strlen(enc[i])) >= n);
        assert_int_equal(base64_decode(enc[i], strlen(enc[i]), d), (long)n);
        assert_memory_equal(d, plain[i], n);
    }
    static const char *invalid[] = {"Zg=", "Z===", "Zg=a", "Z=g=", "!!!!", "Zm9v\n", "=AAA", "Zm9", "Zm9v Zg==",
                                    "Zm-_", "Zg==Zg==", "A"};
    for (size_t i = 0; i < sizeof invalid / sizeof invalid[0]; i++)
        assert_int_equal(base64_decode(invalid[i], strlen(invalid[i]), d), -1);
}

static void test_base64_roundtrip(void **state)
{
    (void)state;
    unsigned char src[300], back[300];
    char enc[404];
    uint32_t x = 12345;
    for (size_t len = 0; len <= sizeof src; len++) {
        for (size_t i = 0; i < len; i++) {
            x = x * 1103515245u + 12345u;
            src[i] = (unsigned char)(x >> 16);
        }
        size_t el = base64_encode(src, len, enc);
        assert_int_equal(el, 4 * ((len + 2) / 3));
        assert_int_equal(enc[el], '\0');
        assert_true(base64_decoded_max(el) <= sizeof back);
        assert_int_equal(base64_decode(enc, el, back), (long)len);
        assert_memory_equal(back, src, len);
        /* Into a buffer of exactly the decoded size (ASan sees a write past it: two quads go out as one
         * 8-byte store), then a character outside the alphabet at every place is refused. */
        unsigned char *exact = malloc(len ? len : 1);
        assert_int_equal(base64_decode(enc, el, exact), (long)len);
        assert_memory_equal(exact, src, len);
        free(exact);
        for (size_t at = 0; at < el && enc[at] != '='; at += 1 + len / 40) {
            char saved = enc[at];
            enc[at] = (char)(at % 2 ? '.' : 0x80);
            assert_int_equal(base64_decode(enc, el, back), -1);
            enc[at] = saved;
        }
        /* In place, as the decoder does for an escaped body. */
        assert_int_equal(base64_decode(enc, el, (unsigned char *)enc), (long)len);
        assert_memory_equal(enc, src, len);
    }
}

/* Inputs long enough for the 32-characters-a-step loop (AVX2, when the CPU has it): every character of the
 * alphabet at every place of a step decodes as the scalar table says, and every character outside it, at every
 * place, is refused, as is '=' before the end. */
static void test_base64_long(void **state)
{
    (void)state;
    static const char alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    enum { LEN = 32 * 6 + 8 }; /* 50 quads: steps, then the quads the scalar loop does */
    char enc[LEN + 1];
    unsigned char back[LEN], want[LEN];
    for (size_t shift = 0; shift < 64; shift++) {
        for (size_t i = 0; i < LEN; i++)
            enc[i] = alphabet[(i * 7 + shift) % 64];
        enc[LEN] = '\0';
        /* Expected: each 4 characters' 24 bits, from the alphabet's own order. */
        for (size_t q = 0; q < LEN / 4; q++) {
            uint32_t v = 0;
            for (size_t k = 0; k < 4; k++)
                v = v << 6 | (uint32_t)(strchr(alphabet, enc[4 * q + k]) - alphabet);
            want[3 * q] = (unsigned char)(v >> 16);
            want[3 * q + 1] = (unsigned char)(v >> 8);
            want[3 * q + 2] = (unsigned char)v;
        }
        assert_int_equal(base64_decode(enc, LEN, back), LEN / 4 * 3);
        assert_memory_equal(back, want, LEN / 4 * 3);
    }
    for (size_t at = 0; at < LEN; at++) {
        for (int c = 0; c < 256; c += 1 + (int)(at % 5)) {
            if (c && strchr(alphabet, c))
                continue;
            char saved = enc[at];
            enc[at] = (char)c;
            assert_int_equal(base64_decode(enc, LEN, back), -1);
            enc[at] = saved;
        }
        char saved = enc[at];
        enc[at] = '=';
        if (at < LEN - 2)
            assert_int_equal(base64_decode(enc, LEN, back), -1);
        enc[at] = saved;
    }
    /* In place, over lengths around the step boundaries. */
    for (size_t len = 4 * 16; len <= 4 * 40; len += 4) {
        char buf[4 * 40];
        memcpy(buf, enc, len);
        assert_int_equal(base64_decode(enc, len, back), (long)(len / 4 * 3));
        assert_int_equal(base64_decode(buf, len, (unsigned char *)buf), (long)(len / 4 * 3));
        assert_memory_equal(buf, back, len / 4 * 3);
    }
}

static void test_escapes(void **state)
{
    (void)state;
    struct msg_request r = {0};
    char err[256];
    assert_int_equal(decode_hdr(", \"shadow\": \"a\\\"b\\\\c\\/d\\b\\f\\n\\r\\te\"", &r, err), MSG_OK);
    assert_int_equal(r.shadow.len, 13);
    assert_memory_equal(r.shadow.s, "a\"b\\c/d\b\f\n\r\te", 14);
    msg_request_clear(&r);

    /* 1, 2, 3 and 4 byte UTF-8 from \u escapes, upper and lower case hex, mixed with raw UTF-8. */
    assert_int_equal(decode_hdr(", \"origin\": \"\\u0041\\u00e9\\u20AC"
                                "\\ud83d\\ude00\\uD834\\uDD1E|é€😀\"", &r, err),
                     MSG_OK);
    assert_string_equal(r.origin.s, "A\xC3\xA9\xE2\x82\xAC\xF0\x9F\x98\x80\xF0\x9D\x84\x9E|é€😀");
    assert_int_equal(r.origin.len, strlen("A\xC3\xA9\xE2\x82\xAC\xF0\x9F\x98\x80\xF0\x9D\x84\x9E|é€😀"));
    msg_request_clear(&r);

    /* Keys are compared after unescaping. */
    assert_int_equal(decode_hdr(", \"\\u0073hadow\": \"s\"", &r, err), MSG_OK);
    assert_string_equal(r.shadow.s, "s");
    msg_request_clear(&r);

    /* \u0000 is fine in a value we skip, refused in one we hand on as a C string. */
    assert_int_equal(decode_hdr(", \"custom\": \"a\\u0000b\"", &r, err), MSG_OK);
    msg_request_clear(&r);
    assert_int_equal(decode_hdr(", \"shadow\": \"a\\u0000b\"", &r, err), MSG_ERR_ENVELOPE);
    assert_non_null(strstr(err, "header 'shadow' contains a NUL"));
    assert_string_equal(r.id.s, "id-1");
    msg_request_clear(&r);

    static const char *bad[] = {"\\x41", "\\u12", "\\u12G4", "\\", "\\U0041", "\\'", "\\a"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char h[64];
        snprintf(h, sizeof h, ", \"shadow\": \"%s\"", bad[i]);
        assert_int_equal(decode_hdr(h, &r, err), MSG_ERR_JSON);
        assert_non_null(strstr(err, "invalid JSON at byte"));
        msg_request_clear(&r);
    }
}

static void test_surrogates(void **state)
{
    (void)state;
    struct msg_request r = {0};
    char err[256];
    static const char *bad[] = {"\\ud800", "\\udc00", "\\ud800\\u0041", "\\ud800\\ud800", "\\ud800x",
                                "\\udbff\\ue000", "\\ud800\\", "\\ude00\\ud83d"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char h[64];
        snprintf(h, sizeof h, ", \"custom\": \"%s\"", bad[i]);
        assert_int_equal(decode_hdr(h, &r, err), MSG_ERR_JSON);
        assert_non_null(strstr(err, "surrogate"));
        assert_string_equal(r.id.s, "id-1"); /* read before the error */
        msg_request_clear(&r);
    }
    /* The extremes of the pairs. */
    assert_int_equal(decode_hdr(", \"shadow\": \"\\ud800\\udc00\\udbff\\udfff\"", &r, err), MSG_OK);
    assert_string_equal(r.shadow.s, "\xF0\x90\x80\x80\xF4\x8F\xBF\xBF");
    msg_request_clear(&r);
}

static void test_utf8_validation(void **state)
{
    (void)state;
    struct msg_request r = {0};
    char err[256];
    static const char *good[] = {"\xC2\x80", "\xDF\xBF", "\xE0\xA0\x80", "\xED\x9F\xBF", "\xEE\x80\x80",
                                 "\xEF\xBF\xBF", "\xF0\x90\x80\x80", "\xF4\x8F\xBF\xBF", "\x7F"};
    static const char *bad[] = {"\x80", "\xBF", "\xC0\x80", "\xC1\xBF", "\xC2", "\xC2\x41", "\xE0\x80\x80",
                                "\xE0\x9F\xBF", "\xED\xA0\x80", "\xED\xBF\xBF", "\xE1\x80", "\xF0\x80\x80\x80",
                                "\xF0\x8F\xBF\xBF", "\xF4\x90\x80\x80", "\xF5\x80\x80\x80", "\xFF", "\xFE"};
    char h[64];
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
        snprintf(h, sizeof h, ", \"shadow\": \"%s\"", good[i]);
        assert_int_equal(decode_hdr(h, &r, err), MSG_OK);
        assert_string_equal(r.shadow.s, good[i]);
        msg_request_clear(&r);
    }
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        snprintf(h, sizeof h, ", \"shadow\": \"%s\"", bad[i]);
        assert_int_equal(decode_hdr(h, &r, err), MSG_ERR_JSON);
        assert_non_null(strstr(err, "UTF-8"));
        msg_request_clear(&r);
    }
    /* Raw control characters are not allowed in strings; DEL is. */
    assert_int_equal(decode_hdr(", \"custom\": \"a\tb\"", &r, err), MSG_ERR_JSON);
    assert_non_null(strstr(err, "control character"));
    msg_request_clear(&r);
    /* Invalid UTF-8 is also refused outside strings, and at any position relative to the 8-byte stride. */
    for (int pad = 0; pad < 9; pad++) {
        snprintf(h, sizeof h, ", \"custom\": \"%.*s\xC3\"", pad, "aaaaaaaaa");
        assert_int_equal(decode_hdr(h, &r, err), MSG_ERR_JSON);
        msg_request_clear(&r);
        snprintf(h, sizeof h, ", \"custom\": \"%.*s\\\"\\\\\x01\"", pad, "aaaaaaaaa");
        assert_int_equal(decode_hdr(h, &r, err), MSG_ERR_JSON);
        msg_request_clear(&r);
    }
    /* Every byte class at every position of a long string, so the 8-byte stride cannot step over one. */
    static const char *specials[] = {"\x01", "\x1f", "\xC3", "\xE2\x82", "\x80", "\"x", "\\q"};
    for (size_t k = 0; k < sizeof specials / sizeof specials[0]; k++) {
        for (int pad = 0; pad < 17; pad++) {
            char hh[128];
            snprintf(hh, sizeof hh, ", \"custom\": \"%.*s%s0123456789abcdefghij\"", pad, "aaaaaaaaaaaaaaaaa",
                     specials[k]);
            assert_int_equal(decode_hdr(hh, &r, err), MSG_ERR_JSON);
            msg_request_clear(&r);
        }
    }
    assert_int_equal(decode_hdr(", \xC3\xA9: 1", &r, err), MSG_ERR_JSON);
    msg_request_clear(&r);
}

static void test_numbers(void **state)
{
    (void)state;
    struct msg_request r = {0};
    char err[256];

    assert_int_equal(decode_hdr(", \"retries\": 9223372036854775807, \"group_index\": -9223372036854775808", &r, err),
                     MSG_OK);
    assert_true(r.retries == INT64_MAX);
    assert_true(r.has_group_index && r.group_index == INT64_MIN);
    msg_request_clear(&r);

    assert_int_equal(decode_hdr(", \"retries\": -0, \"group_index\": 0", &r, err), MSG_OK);
    assert_true(r.retries == 0 && r.has_group_index && r.group_index == 0);
    msg_request_clear(&r);

    assert_int_equal(decode_hdr(", \"group_index\": null", &r, err), MSG_OK);
    assert_false(r.has_group_index);
    msg_request_clear(&r);

    static const char *out_of_range[] = {"9223372036854775808", "-9223372036854775809", "100000000000000000000"};
    for (size_t i = 0; i < 3; i++) {
        char h[80];
        snprintf(h, sizeof h, ", \"retries\": %s", out_of_range[i]);
        assert_int_equal(decode_hdr(h, &r, err), MSG_ERR_ENVELOPE);
        assert_string_equal(err, "header 'retries' is out of range");
        msg_request_clear(&r);
    }
    static const char *not_int[] = {"1.0", "1e2", "1E+2", "-0.5", "\"1\"", "true", "[1]", "{}"};
    for (size_t i = 0; i < sizeof not_int / sizeof not_int[0]; i++) {
        char h[80];
        snprintf(h, sizeof h, ", \"retries\": %s", not_int[i]);
        assert_int_equal(decode_hdr(h, &r, err), MSG_ERR_ENVELOPE);
        assert_string_equal(err, "header 'retries' must be an integer");
        assert_string_equal(r.id.s, "id-1");
        msg_request_clear(&r);
    }
    static const char *not_json[] = {"01", "-01", "1.", ".5", "-", "1e", "1e+", "+1", "0x10", "1.e3", "--1",
                                     "NaN", "Infinity", "-Infinity", "1_000"};
    for (size_t i = 0; i < sizeof not_json / sizeof not_json[0]; i++) {
        char h[80];
        snprintf(h, sizeof h, ", \"custom\": %s", not_json[i]);
        assert_int_equal(decode_hdr(h, &r, err), MSG_ERR_JSON);
        msg_request_clear(&r);
    }
    static const char *fine[] = {"0", "-0", "1.5e-3", "1E10", "-1e-10", "123456789012345678901234567890", "0.0e0",
                                 "1e400"};
    for (size_t i = 0; i < sizeof fine / sizeof fine[0]; i++) {
        char h[80];
        snprintf(h, sizeof h, ", \"custom\": [%s]", fine[i]);
        assert_int_equal(decode_hdr(h, &r, err), MSG_OK);
        msg_request_clear(&r);
    }

    assert_int_equal(decode_hdr(", \"timelimit\": [1e2, 0.5]", &r, err), MSG_OK);
    assert_true(r.has_time_limit && r.time_limit == 100.0);
    assert_true(r.has_soft_time_limit && r.soft_time_limit == 0.5);
    msg_request_clear(&r);
    assert_int_equal(decode_hdr(", \"timelimit\": [null, 30]", &r, err), MSG_OK);
    assert_true(!r.has_time_limit && r.has_soft_time_limit && r.soft_time_limit == 30.0);
    msg_request_clear(&r);
    assert_int_equal(decode_hdr(", \"timelimit\": null", &r, err), MSG_OK);
    assert_true(!r.has_time_limit && !r.has_soft_time_limit);
    msg_request_clear(&r);
    static const char *bad_tl[] = {"[1e400, null]", "[1]", "[]", "[1, 2, 3]", "[\"1\", 2]", "5", "{}",
                                   "[true, null]", "[[1], 2]"};
    for (size_t i = 0; i < sizeof bad_tl / sizeof bad_tl[0]; i++) {
        char h[80];
        snprintf(h, sizeof h, ", \"timelimit\": %s", bad_tl[i]);
        assert_int_equal(decode_hdr(h, &r, err), MSG_ERR_ENVELOPE);
        assert_non_null(strstr(err, "header 'timelimit' must be [hard, soft]"));
        msg_request_clear(&r);
    }

    /* priority: integers clamp to int, anything else is an error. */
    assert_int_equal(decode_v2("", ", \"priority\": 300", "W10=", &r, err, sizeof err), MSG_OK);
    assert_int_equal(r.priority, 300);
    msg_request_clear(&r);
    assert_int_equal(decode_v2("", ", \"priority\": 99999999999", "W10=", &r, err, sizeof err), MSG_OK);
    assert_int_equal(r.priority, INT32_MAX);
    msg_request_clear(&r);
    assert_int_equal(decode_v2("", ", \"priority\": 4.5", "W10=", &r, err, sizeof err), MSG_ERR_ENVELOPE);
    assert_string_equal(err, "property 'priority' must be an integer");
    msg_request_clear(&r);
}

static void test_depth(void **state)
{
    (void)state;
    struct msg_request r = {0};
    char err[256], h[400];
    /* The envelope is level 1 and headers level 2, so n arrays in a header reach level 2 + n. */
    for (int n = 60; n <= 66; n++) {
        int o = snprintf(h, sizeof h, ", \"custom\": ");
        for (int i = 0; i < n; i++)
            h[o++] = '[';
        for (int i = 0; i < n; i++)
            h[o++] = ']';
        h[o] = '\0';
        int st = decode_hdr(h, &r, err);
        if (2 + n <= 64) {
            assert_int_equal(st, MSG_OK);
        } else {
            assert_int_equal(st, MSG_ERR_JSON);
            assert_non_null(strstr(err, "nesting too deep"));
        }
        msg_request_clear(&r);
    }
    /* Deep objects too, and a huge depth does not exhaust the stack. */
    char *deep = malloc(3000000);
    assert_non_null(deep);
    size_t o = (size_t)sprintf(deep, "{\"body\": \"W10=\", \"x\": ");
    for (int i = 0; i < 500000; i++)
        memcpy(deep + o, "{\"a\":", 5), o += 5;
    int st = msg_decode(deep, o, 0, &r, err, sizeof err);
    assert_int_equal(st, MSG_ERR_JSON);
    assert_non_null(strstr(err, "nesting too deep"));
    msg_request_clear(&r);
    free(deep);
}

static void test_structure_errors(void **state)
{
    (void)state;
    struct msg_request r = {0};
    char err[256];
    static const struct {
        const char *in, *err_has;
    } cases[] = {
        {"", "unexpected end of input"},
        {"   \n", "unexpected end of input"},
        {"[]", "not a JSON object"},
        {"\"x\"", "not a JSON object"},
        {"{", "end of input"},
        {"{\"body\"", "end of input"},
        {"{\"body\":", "end of input"},
        {"{\"body\": \"W10=", "end of input"},
        {"{\"body\": \"W10=\",}", "trailing comma"},
        {"{\"body\": \"W10=\" \"x\": 1}", "expected ','"},
        {"{\"body\" \"W10=\"}", "expected ':'"},
        {"{body: 1}", "expected a string key"},
        {"{\"a\": [1,]}", "trailing comma"},
        {"{\"a\": [1 2]}", "expected ','"},
        {"{\"a\": tru}", "invalid literal"},
        {"{\"a\": nulll}", "expected ','"},
        {"{\"a\": @}", "unexpected character"},
        {"{} {}", "after the JSON value"},
        {"{}\0", "after the JSON value"},
        {"\xEF\xBB\xBF{}", "not a JSON object"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        size_t len = strlen(cases[i].in) + (strcmp(cases[i].in, "{}") == 0 ? 1 : 0);
        assert_int_equal(msg_decode(cases[i].in, len, 0, &r, err, sizeof err), MSG_ERR_JSON);
        if (!strstr(err, cases[i].err_has))
            fail_msg("input %zu: \"%s\" lacks \"%s\"", i, err, cases[i].err_has);
        msg_request_clear(&r);
    }
    /* Whitespace anywhere JSON allows it; an object with nothing we need. */
    assert_int_equal(decode_str(" \t\r\n{ \"body\" : \"[]\" , "
                                "\"headers\" :{\"task\":\"a\",\"id\":\"b\"} }\n ", &r, err),
                     MSG_OK);
    assert_string_equal(r.body, "[]");
    msg_request_clear(&r);
    assert_int_equal(decode_str("{}", &r, err), MSG_ERR_ENVELOPE);
    assert_string_equal(err, "message has no 'body'");
    msg_request_clear(&r);
    /* Near misses of known keys are unknown keys: skipped, whatever their type. */
    assert_int_equal(decode_hdr(", \"retriez\": \"x\", \"Retries\": [], \"ix\": 1, \"etaa\": 2, \"et\": 3, "
                                "\"shadow \": 4, \"timelimi\": 5", &r, err),
                     MSG_OK);
    assert_true(r.retries == 0 && !r.has_time_limit);
    assert_string_equal(r.id.s, "id-1");
    assert_null(r.eta.s);
    assert_null(r.shadow.s);
    msg_request_clear(&r);
    /* Last duplicate wins, as in Python. */
    assert_int_equal(decode_hdr(", \"shadow\": \"one\", \"shadow\": \"two\", \"task\": \"t.y\"", &r, err), MSG_OK);
    assert_string_equal(r.shadow.s, "two");
    assert_string_equal(r.task.s, "t.y");
    msg_request_clear(&r);
    /* NULL / empty err buffers are allowed. */
    assert_int_equal(msg_decode("[]", 2, 0, &r, NULL, 0), MSG_ERR_JSON);
    msg_request_clear(&r);
    /* err is cut, not overrun. */
    char small[8];
    memset(small, 'x', sizeof small);
    assert_int_equal(msg_decode("[]", 2, 0, &r, small, 5), MSG_ERR_JSON);
    assert_int_equal(small[4], '\0');
    assert_int_equal(small[5], 'x');
    msg_request_clear(&r);
}

static void test_errors_keep_id(void **state)
{
    (void)state;
    struct msg_request r = {0};
    char err[256];
    /* JSON error after the headers: id and task read before it stay. */
    static const char *trunc =
        "{\"headers\": {\"task\": \"t.x\", \"id\": \"id-9\"}, \"properties\": {\"correlation_id\": \"c-9\", \"x\": [";
    assert_int_equal(decode_str(trunc, &r, err), MSG_ERR_JSON);
    assert_string_equal(r.id.s, "id-9");
    assert_string_equal(r.task.s, "t.x");
    assert_string_equal(r.correlation_id.s, "c-9");
    assert_int_equal(r.protocol, 2);
    msg_request_clear(&r);
    /* JSON error before any id: the correlation_id read earlier is the fallback. */
    assert_int_equal(decode_str("{\"properties\": {\"correlation_id\": \"c-8\"}, \"headers\": {\"id\": ", &r, err),
                     MSG_ERR_JSON);
    assert_string_equal(r.id.s, "c-8");
    msg_request_clear(&r);
    /* A type error in the headers; the id only comes later, from properties. */
    assert_int_equal(decode_str("{\"body\": \"W10=\", \"headers\": {\"task\": \"t.x\", \"retries\": \"2\"}, "
                                "\"properties\": {\"correlation_id\": \"c-7\", \"body_encoding\": \"base64\"}}",
                                &r, err),
                     MSG_ERR_ENVELOPE);
    assert_string_equal(err, "header 'retries' must be an integer");
    assert_string_equal(r.id.s, "c-7");
    assert_string_equal(r.task.s, "t.x");
    assert_int_equal(r.protocol, 2);
    msg_request_clear(&r);
    /* First type error wins. */
    assert_int_equal(decode_hdr(", \"retries\": \"2\", \"eta\": 5", &r, err), MSG_ERR_ENVELOPE);
    assert_string_equal(err, "header 'retries' must be an integer");
    msg_request_clear(&r);
    static const char *typed[][2] = {
        {", \"eta\": 5", "header 'eta' must be a string"},
        {", \"ignore_result\": 0", "header 'ignore_result' must be a boolean"},
        {", \"group_index\": \"1\"", "header 'group_index' must be an integer"},
        {", \"redelivered\": \"true\"", "header 'redelivered' must be a boolean"},
    };
    for (size_t i = 0; i < sizeof typed / sizeof typed[0]; i++) {
        assert_int_equal(decode_hdr(typed[i][0], &r, err), MSG_ERR_ENVELOPE);
        assert_string_equal(err, typed[i][1]);
        assert_string_equal(r.id.s, "id-1");
        msg_request_clear(&r);
    }
    assert_int_equal(decode_v2("", ", \"delivery_info\": {\"exchange\": 1}", "W10=", &r, err, sizeof err),
                     MSG_ERR_ENVELOPE);
    assert_string_equal(err, "delivery_info field 'exchange' must be a string");
    msg_request_clear(&r);
    assert_int_equal(decode_v2("", ", \"delivery_info\": []", "W10=", &r, err, sizeof err), MSG_ERR_ENVELOPE);
    assert_string_equal(err, "property 'delivery_info' must be an object");
    msg_request_clear(&r);
    /* redelivered is true when either place says so, whatever the other says. */
    assert_int_equal(decode_v2(", \"redelivered\": true", ", \"delivery_info\": {\"redelivered\": false}", "W10=", &r,
                               err, sizeof err),
                     MSG_OK);
    assert_true(r.redelivered);
    msg_request_clear(&r);
    assert_int_equal(decode_v2(", \"redelivered\": null", ", \"delivery_info\": {\"redelivered\": true}", "W10=", &r,
                               err, sizeof err),
                     MSG_OK);
    assert_true(r.redelivered);
    msg_request_clear(&r);
    assert_int_equal(decode_v2(", \"redelivered\": false", ", \"delivery_info\": {\"redelivered\": false}", "W10=",
                               &r, err, sizeof err),
                     MSG_OK);
    assert_false(r.redelivered);
    msg_request_clear(&r);
    /* Body encoding errors keep everything from the envelope. */
    assert_int_equal(decode_v2("", "", "W10", &r, err, sizeof err), MSG_ERR_BODY_ENCODING);
    assert_string_equal(r.id.s, "id-1");
    assert_string_equal(r.task.s, "t.x");
    assert_null(r.body);
    msg_request_clear(&r);
    /* No id anywhere. */
    assert_int_equal(decode_str("{\"body\": \"[]\", \"headers\": {\"task\": \"t\"}}", &r, err), MSG_ERR_ENVELOPE);
    assert_non_null(strstr(err, "no task id"));
    msg_request_clear(&r);
}

static void test_content_type(void **state)
{
    (void)state;
    struct msg_request r = {0};
    char err[256];
    static const char *refused[] = {"application/x-python-serialize", "application/x-yaml",
                                    "application/x-msgpack", "application/JSON", "application/json; charset=utf-8",
                                    "text/plain", ""};
    for (size_t i = 0; i < sizeof refused / sizeof refused[0]; i++) {
        char m[512], want[160];
        int n = snprintf(m, sizeof m, "{\"body\": \"!!\", \"content-type\": \"%s\", \"headers\": {\"task\": \"t.p\", "
                                      "\"id\": \"id-p\", \"retries\": \"bad too\"}}", refused[i]);
        assert_int_equal(msg_decode(m, (size_t)n, 0, &r, err, sizeof err), MSG_ERR_CONTENT_TYPE);
        snprintf(want, sizeof want, "refusing content type '%s' (only application/json is accepted)", refused[i]);
        assert_string_equal(err, want);
        assert_string_equal(r.id.s, "id-p");
        assert_string_equal(r.task.s, "t.p");
        assert_null(r.body); /* never decoded */
        msg_request_clear(&r);
    }
    /* Control characters from the peer do not reach the error line; long types are cut. */
    assert_int_equal(decode_str("{\"body\": \"\", \"content-type\": \"a\\nb\"}", &r, err), MSG_ERR_CONTENT_TYPE);
    assert_string_equal(err, "refusing content type 'a?b' (only application/json is accepted)");
    msg_request_clear(&r);
    char m[600];
    int n = snprintf(m, sizeof m, "{\"body\": \"\", \"content-type\": \"%0300d\"}", 7);
    assert_int_equal(msg_decode(m, (size_t)n, 0, &r, err, sizeof err), MSG_ERR_CONTENT_TYPE);
    assert_non_null(strstr(err, "...'"));
    assert_true(strlen(err) < 200);
    msg_request_clear(&r);
    /* null content-type is as absent: JSON. */
    assert_int_equal(decode_str("{\"body\": \"[]\", \"content-type\": null, "
                                "\"headers\": {\"task\": \"t\", \"id\": \"i\"}}",
                                &r, err),
                     MSG_OK);
    assert_null(r.content_type.s);
    assert_string_equal(r.body, "[]");
    msg_request_clear(&r);
}

static void test_body_encoding(void **state)
{
    (void)state;
    struct msg_request r = {0};
    char err[256];
    /* Escaped base64 ("\/" is legal JSON for '/') still decodes. */
    assert_int_equal(decode_v2("", "", "P\\/8=", &r, err, sizeof err), MSG_OK);
    assert_int_equal(r.body_len, 2);
    assert_memory_equal(r.body, "\x3F\xFF", 3);
    msg_request_clear(&r);
    /* Binary bodies keep their length past NULs. */
    assert_int_equal(decode_v2("", "", "AAEA", &r, err, sizeof err), MSG_OK);
    assert_int_equal(r.body_len, 3);
    assert_memory_equal(r.body, "\0\1\0", 4);
    msg_request_clear(&r);
    assert_int_equal(decode_v2("", "", "", &r, err, sizeof err), MSG_OK);
    assert_int_equal(r.body_len, 0);
    assert_string_equal(r.body, "");
    msg_request_clear(&r);
    static const char *bad[] = {"W10", "W1=0", "W1 0", "====", "W10=W10="};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        assert_int_equal(decode_v2("", "", bad[i], &r, err, sizeof err), MSG_ERR_BODY_ENCODING);
        assert_non_null(strstr(err, "not valid base64"));
        msg_request_clear(&r);
    }
    char props[64];
    snprintf(props, sizeof props, ", \"body_encoding\": \"gzip\"");
    assert_int_equal(decode_v2("", props, "W10=", &r, err, sizeof err), MSG_ERR_BODY_ENCODING);
    assert_string_equal(err, "unknown body_encoding 'gzip' (only base64 is supported)");
    msg_request_clear(&r);
    /* No body_encoding: the string is the body, escapes undone. */
    assert_int_equal(decode_str("{\"body\": \"[[\\\"\\u00e9\\\"], {}, {}]\", "
                                "\"headers\": {\"task\": \"t\", \"id\": \"i\"}}",
                                &r, err),
                     MSG_OK);
    assert_string_equal(r.body, "[[\"\xC3\xA9\"], {}, {}]");
    assert_int_equal(r.protocol, 2);
    msg_request_clear(&r);
}

static void test_v1(void **state)
{
    (void)state;
    struct msg_request r = {0};
    char err[256];
    /* taskset wins over group whatever the order; custom headers are not judged as task headers. */
    static const char *m1 = "{\"body\": \"{\\\"taskset\\\": \\\"ts\\\", \\\"task\\\": \\\"v1.t\\\", \\\"id\\\": "
                            "\\\"v1id\\\", \\\"group\\\": \\\"g\\\", \\\"args\\\": [1], \\\"kwargs\\\": {}, "
                            "\\\"retries\\\": 4, \\\"timelimit\\\": [3, 2.5], \\\"utc\\\": true, \\\"eta\\\": "
                            "\\\"2030-01-01T00:00:00+00:00\\\", \\\"chord\\\": null}\", "
                            "\"headers\": {\"retries\": \"custom\", \"id\": \"not-the-id\", \"redelivered\": true}, "
                            "\"properties\": {\"correlation_id\": \"corr\"}}";
    assert_int_equal(decode_str(m1, &r, err), MSG_OK);
    assert_int_equal(r.protocol, 1);
    assert_string_equal(r.task.s, "v1.t");
    assert_string_equal(r.id.s, "v1id");
    assert_string_equal(r.group.s, "ts");
    assert_true(r.retries == 4);
    assert_true(r.has_time_limit && r.time_limit == 3.0 && r.has_soft_time_limit && r.soft_time_limit == 2.5);
    assert_string_equal(r.eta.s, "2030-01-01T00:00:00+00:00");
    assert_true(r.redelivered);
    assert_null(r.argsrepr.s);
    assert_non_null(strstr(r.body, "\"taskset\": \"ts\""));
    msg_request_clear(&r);
    /* Without a "task" header, headers are custom: none of them leaks into the task fields. */
    assert_int_equal(decode_str("{\"body\": \"{\\\"task\\\": \\\"v1.t\\\"}\", \"headers\": {\"retries\": 5, "
                                "\"shadow\": \"s\", \"eta\": \"e\", \"timelimit\": [1, 2], \"ignore_result\": true, "
                                "\"group_index\": 3, \"origin\": \"o\", \"argsrepr\": \"a\", \"root_id\": \"r\"}, "
                                "\"properties\": {\"correlation_id\": \"corr\"}}",
                                &r, err),
                     MSG_OK);
    assert_true(r.retries == 0 && !r.has_time_limit && !r.ignore_result && !r.has_group_index);
    assert_null(r.shadow.s);
    assert_null(r.eta.s);
    assert_null(r.origin.s);
    assert_null(r.argsrepr.s);
    assert_null(r.root_id.s);
    assert_string_equal(r.id.s, "corr");
    msg_request_clear(&r);
    /* id falls back to correlation_id; a null taskset still wins. */
    assert_int_equal(decode_str("{\"body\": \"{\\\"task\\\": \\\"v1.t\\\", "
                                "\\\"group\\\": \\\"g\\\", \\\"taskset\\\": null}\", "
                                "\"properties\": {\"correlation_id\": \"corr\"}}",
                                &r, err),
                     MSG_OK);
    assert_string_equal(r.id.s, "corr");
    assert_null(r.group.s);
    msg_request_clear(&r);
    /* Wrong types in the body object. */
    assert_int_equal(decode_str("{\"body\": \"{\\\"task\\\": \\\"v1.t\\\", \\\"id\\\": \\\"i\\\", "
                                "\\\"kwargs\\\": []}\"}", &r,
                                err),
                     MSG_ERR_ENVELOPE);
    assert_string_equal(err, "v1 body field 'kwargs' must be an object");
    assert_string_equal(r.id.s, "i");
    msg_request_clear(&r);
    assert_int_equal(decode_str("{\"body\": \"{\\\"task\\\": 5, \\\"id\\\": \\\"i\\\"}\"}", &r, err), MSG_ERR_ENVELOPE);
    assert_string_equal(err, "v1 body field 'task' must be a string");
    msg_request_clear(&r);
    /* Not v1 either. */
    static const char *unknown[] = {"[]", "{}", "5", "\\\"task\\\"", "{\\\"Task\\\": \\\"x\\\"}"};
    for (size_t i = 0; i < sizeof unknown / sizeof unknown[0]; i++) {
        char m[256];
        snprintf(m, sizeof m, "{\"body\": \"%s\", \"properties\": {\"correlation_id\": \"cid\"}}", unknown[i]);
        assert_int_equal(decode_str(m, &r, err), MSG_ERR_UNKNOWN);
        assert_non_null(strstr(err, "unknown message"));
        assert_string_equal(r.id.s, "cid");
        assert_null(r.task.s);
        assert_int_equal(r.protocol, 0);
        msg_request_clear(&r);
    }
    /* An invalid body is a JSON error that names the body. */
    assert_int_equal(decode_str("{\"body\": \"{\\\"task\\\": \\\"x\\\"\"}", &r, err), MSG_ERR_JSON);
    assert_non_null(strstr(err, "invalid JSON in the body at byte"));
    msg_request_clear(&r);
    assert_int_equal(decode_str("{\"body\": \"{\\\"task\\\": \\\"x\\\"} x\"}", &r, err), MSG_ERR_JSON);
    msg_request_clear(&r);
    assert_int_equal(decode_str("{\"body\": \"\"}", &r, err), MSG_ERR_JSON);
    msg_request_clear(&r);
}

static void test_too_large(void **state)
{
    (void)state;
    struct msg_request r = {0};
    char err[256];
    const char *m = "{\"body\": \"[]\", \"headers\": {\"task\": \"t\", \"id\": \"i\"}}";
    size_t len = strlen(m);
    assert_int_equal(msg_decode(m, len, len - 1, &r, err, sizeof err), MSG_ERR_TOO_LARGE);
    assert_non_null(strstr(err, "over the limit"));
    assert_string_equal(r.id.s, "i"); /* still known, for the FAILURE result */
    assert_null(r.body);              /* never decoded */
    msg_request_clear(&r);
    assert_int_equal(msg_decode(m, len, len, &r, err, sizeof err), MSG_OK);
    msg_request_clear(&r);
    /* Bytes past len are never read: the same buffer cut short is truncated JSON. */
    assert_int_equal(msg_decode(m, len - 1, 0, &r, err, sizeof err), MSG_ERR_JSON);
    msg_request_clear(&r);
}

static void test_reuse_and_clear(void **state)
{
    (void)state;
    struct msg_request r = {0};
    char err[256];
    for (int i = 0; i < 3; i++) {
        assert_int_equal(decode_hdr(", \"retries\": 2, \"timelimit\": [1, 2], \"ignore_result\": true", &r, err),
                         MSG_OK);
        assert_true(r.retries == 2 && r.ignore_result && r.has_time_limit);
        msg_request_clear(&r);
        assert_null(r.arena);
        assert_null(r.task.s);
        assert_null(r.body);
        assert_true(r.retries == 0 && !r.ignore_result && !r.has_time_limit && r.protocol == 0);
    }
    /* Clearing a zeroed request is harmless. */
    msg_request_clear(&r);
}

/* A v2 envelope whose base64 body is the JSON array [[], {}, {}, "<n times c>"]; caller frees. */
static char *big_message(size_t n, char c, size_t *len)
{
    size_t blen = n + 20;
    char *body = malloc(blen + 1);
    assert_non_null(body);
    int head = snprintf(body, blen, "[[], {}, {}, \"");
    memset(body + head, c, n);
    strcpy(body + head + n, "\"]");
    blen = (size_t)head + n + 2;
    char *b64 = malloc(4 * ((blen + 2) / 3) + 1);
    assert_non_null(b64);
    base64_encode((const unsigned char *)body, blen, b64);
    char *m = malloc(strlen(b64) + 200);
    assert_non_null(m);
    *len = (size_t)sprintf(m, "{\"body\": \"%s\", \"content-encoding\": \"utf-8\", \"content-type\": "
                              "\"application/json\", \"headers\": {\"task\": \"t\", \"id\": \"i\"}, "
                              "\"properties\": {\"body_encoding\": \"base64\"}}", b64);
    free(b64);
    free(body);
    return m;
}

/* The buffer a big body was decoded into is kept for the next big message, which must see only its own bytes. */
static void test_big_buffer_kept_for_the_next(void **state)
{
    (void)state;
    struct msg_request r = {0};
    char err[256];
    size_t la, lb;
    char *a = big_message(3u << 20, 'a', &la), *b = big_message(2u << 20, 'b', &lb);
    assert_int_equal(msg_decode(a, la, 0, &r, err, sizeof err), MSG_OK);
    msg_request_clear(&r);
    assert_false(msg_spare_held()); /* not asked for */
    msg_spare_keep();
    assert_int_equal(msg_decode(a, la, 0, &r, err, sizeof err), MSG_OK);
    msg_request_clear(&r);
    assert_true(msg_spare_held());
    assert_int_equal(msg_decode(b, lb, 0, &r, err, sizeof err), MSG_OK);
    assert_false(msg_spare_held()); /* in use */
    assert_int_equal(r.body_len, (2u << 20) + 16);
    assert_int_equal(r.body[r.body_len], '\0');
    assert_memory_equal(r.body + r.body_len - 3, "b\"]", 3);
    assert_null(memchr(r.body, 'a', r.body_len)); /* nothing of the first message shows through */
    msg_request_clear(&r);
    assert_true(msg_spare_held());
    msg_spare_release();
    assert_false(msg_spare_held());
    /* Small messages neither keep nor use one. */
    assert_int_equal(decode_hdr("", &r, err), MSG_OK);
    msg_request_clear(&r);
    assert_false(msg_spare_held());
    free(a);
    free(b);
}

static void test_label(void **state)
{
    (void)state;
    struct msg_request r = {0};
    char err[256], l[64];
    assert_int_equal(decode_hdr("", &r, err), MSG_OK);
    msg_label(&r, l, sizeof l);
    assert_string_equal(l, "t.x[id-1]");
    msg_label(&r, l, 5);
    assert_string_equal(l, "t.x[");
    msg_request_clear(&r);

    struct msg_request empty = {0};
    msg_label(&empty, l, sizeof l);
    assert_string_equal(l, "<unknown>[?]");

    assert_int_equal(decode_str("{\"body\": \"[]\", "
                                "\"headers\": {\"task\": \"a\\nb\\u00e9\\u00e9\", \"id\": \"i\\u0007\"}}",
                                &r, err),
                     MSG_OK);
    msg_label(&r, l, sizeof l);
    assert_string_equal(l, "a?b\xC3\xA9\xC3\xA9[i?]");
    /* A cut never leaves half a UTF-8 sequence: "a?b" + "é" fits in 6 bytes + NUL, the second é not. */
    msg_label(&r, l, 7);
    assert_string_equal(l, "a?b\xC3\xA9");
    msg_label(&r, l, 6);
    assert_string_equal(l, "a?b\xC3\xA9");
    msg_label(&r, l, 5);
    assert_string_equal(l, "a?b");
    msg_label(&r, l, 1);
    assert_string_equal(l, "");
    msg_request_clear(&r);
}

static void test_parse_time(void **state)
{
    (void)state;
    static const struct {
        const char *s;
        double want; /* -1: refused */
    } cases[] = {
        /* What Celery clients send: isoformat() with an offset, microseconds left out when 0. */
        {"2026-11-22T13:06:38.426648+00:00", 1795352798.426648},
        {"2026-11-22T13:06:38+00:00", 1795352798.0},
        {"2026-11-22T13:06:38Z", 1795352798.0},
        {"2026-11-22T13:06:38", 1795352798.0}, /* naive: UTC */
        {"2026-11-22 13:06:38", 1795352798.0},
        {"2026-11-22T15:06:38+02:00", 1795352798.0},
        {"2026-11-22T08:36:38-04:30", 1795352798.0},
        {"2026-11-22T13:06:38.5", 1795352798.5}, /* a decimal fraction */
        {"2026-11-22T13:06", 1795352760.0},
        {"2026-11-22", 1795305600.0},
        {"2026-1-2", 1767312000.0},
        {"2026", 1767225600.0},
        {"2024-02-29T12:00:00+00:00", 1709208000.0},
        {"2000-02-29T00:00:00", 951782400.0},
        {"1970-01-01T00:00:00+00:00", 0.0},
        {"1970-01-01T01:00:00+01:00", 0.0},
        {"1969-12-31T23:59:59", 0.0}, /* before 1970: simply in the past */
        {"0001-01-01T00:00:00", 0.0},
        {"9999-12-31T23:59:59+00:00", 253402300799.0},
        /* Refused. */
        {"", -1},
        {"now", -1},
        {"26-11-22T13:06:38", -1},
        {"0000-01-01T00:00:00", -1},
        {"2026-13-01T00:00:00", -1},
        {"2026-00-01T00:00:00", -1},
        {"2026-04-31T00:00:00", -1},
        {"2026-02-29T00:00:00", -1},
        {"1900-02-29T00:00:00", -1},
        {"2026-11-22T24:00:00", -1},
        {"2026-11-22T13:60:00", -1},
        {"2026-11-22T13:06:60", -1},
        {"2026-11-22T13:6:38", -1},
        {"2026-11-22T13", -1},
        {"2026-11-22T13:06:38.", -1},
        {"2026-11-22T13:06:38+0000", -1},
        {"2026-11-22T13:06:38+24:00", -1},
        {"2026-11-22T13:06:38+00:00x", -1},
        {"2026-11-22T13:06:38 ", -1},
        {"2026-11-22X13:06:38", -1},
        {" 2026-11-22T13:06:38", -1},
        {"-2026-11-22", -1},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        double got = msg_parse_time(cases[i].s, strlen(cases[i].s));
        if (fabs(got - cases[i].want) > 1e-6)
            fail_msg("msg_parse_time(\"%s\") = %.6f, want %.6f", cases[i].s, got, cases[i].want);
    }
    /* Only s[0..len) is read: a prefix that is a time on its own parses, the rest is not looked at. */
    assert_true(msg_parse_time("2026-11-22T13:06:38+00:00garbage", 25) == 1795352798.0);
    assert_true(msg_parse_time(NULL, 0) == -1);

    /* The captured eta message carries a time this parser reads. */
    size_t len = 0;
    char *raw = read_file(DATA_DIR "/eta/message.json", &len);
    assert_non_null(raw);
    struct msg_request r = {0};
    char err[256];
    assert_int_equal(msg_decode(raw, len, 0, &r, err, sizeof err), MSG_OK);
    assert_non_null(r.eta.s);
    assert_true(fabs(msg_parse_time(r.eta.s, r.eta.len) - 1893553445.6) < 1e-6);
    msg_request_clear(&r);
    free(raw);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_data_cases),     cmocka_unit_test(test_base64_vectors),
        cmocka_unit_test(test_base64_roundtrip), cmocka_unit_test(test_base64_long), cmocka_unit_test(test_escapes),
        cmocka_unit_test(test_surrogates),     cmocka_unit_test(test_utf8_validation),
        cmocka_unit_test(test_numbers),        cmocka_unit_test(test_depth),
        cmocka_unit_test(test_structure_errors), cmocka_unit_test(test_errors_keep_id),
        cmocka_unit_test(test_content_type),   cmocka_unit_test(test_body_encoding),
        cmocka_unit_test(test_v1),             cmocka_unit_test(test_too_large),
        cmocka_unit_test(test_reuse_and_clear), cmocka_unit_test(test_big_buffer_kept_for_the_next),
        cmocka_unit_test(test_label),
        cmocka_unit_test(test_parse_time),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
