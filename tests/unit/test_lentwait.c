/* Unit tests for worker/lentwait.c: what a pool process may run by itself when the lent wait brings it a
 * message (the gate), on captured stock-Celery messages (tests/data/messages) renamed to a built-in task. Runs
 * from the repo root. The wait itself is covered by the integration tests (real Redis). */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "lentwait.h"

#define DATA_DIR "tests/data/messages"

/* DATA_DIR/<name>/message.json with "tasks.add" renamed `task` (when given). Caller frees. */
static char *message(const char *name, const char *task, size_t *len)
{
    char path[256];
    snprintf(path, sizeof path, DATA_DIR "/%s/message.json", name);
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    char raw[16384];
    size_t n = fread(raw, 1, sizeof raw - 1, f);
    fclose(f);
    raw[n] = '\0';
    char *out = calloc(1, n + 64);
    assert_non_null(out);
    const char *at = task ? strstr(raw, "\"tasks.add\"") : NULL;
    if (at) {
        size_t head = (size_t)(at - raw);
        memcpy(out, raw, head);
        int w = sprintf(out + head, "\"%s\"", task);
        strcpy(out + head + (size_t)w, at + strlen("\"tasks.add\""));
    } else {
        memcpy(out, raw, n);
    }
    *len = strlen(out);
    return out;
}

/* Whether the gate admits fixture `name` (renamed `task`, when given). */
static bool admitted(const struct lent_gate *g, const char *name, const char *task)
{
    size_t len;
    char *m = message(name, task, &len);
    bool yes = lent_gate_admits(g, m, len) != NULL;
    free(m);
    return yes;
}

static int gate_setup(void **state)
{
    struct lent_gate *g = lent_gate_new();
    assert_non_null(g);
    *state = g;
    return 0;
}

static int gate_teardown(void **state)
{
    lent_gate_free(*state);
    return 0;
}

static void test_closed_until_opened(void **state)
{
    struct lent_gate *g = *state;
    size_t len;
    char *m = message("plain-args", "native.add", &len);
    assert_null(lent_gate_admits(g, m, len));
    lent_gate_set(g, true, 0);
    const struct task_def *def = lent_gate_admits(g, m, len);
    assert_non_null(def);
    lent_gate_set(g, false, 0); /* rate or time limits set by control: every message is the main process's */
    assert_null(lent_gate_admits(g, m, len));
    free(m);
}

static void test_only_what_runs_now(void **state)
{
    struct lent_gate *g = *state;
    lent_gate_set(g, true, 0);
    assert_true(admitted(g, "plain-args", "native.add"));
    assert_false(admitted(g, "plain-args", "tasks.add")); /* not registered: NotRegistered is the main's to send */
    const char *timed[] = {"countdown", "eta", "expires-seconds", "expires-datetime"};
    for (size_t i = 0; i < sizeof timed / sizeof *timed; i++)
        assert_false(admitted(g, timed[i], "native.add"));
    assert_false(admitted(g, "bad-invalid-json", NULL));
    assert_false(admitted(g, "pickle", NULL));
}

static void test_size_limit(void **state)
{
    struct lent_gate *g = *state;
    size_t len;
    char *m = message("plain-args", "native.add", &len);
    lent_gate_set(g, true, len - 1); /* --max-message-size below it: the main process refuses it */
    assert_null(lent_gate_admits(g, m, len));
    lent_gate_set(g, true, len);
    assert_non_null(lent_gate_admits(g, m, len));
    free(m);
}

static void test_revoked_ids_stay_out(void **state)
{
    struct lent_gate *g = *state;
    lent_gate_set(g, true, 0);
    size_t len;
    char *m = message("plain-args", "native.add", &len);
    lent_gate_revoke(g, "c0ffee00-0000-4000-8000-000000000002"); /* another id */
    assert_non_null(lent_gate_admits(g, m, len));
    lent_gate_revoke(g, "c0ffee00-0000-4000-8000-000000000001"); /* its own */
    assert_null(lent_gate_admits(g, m, len));
    free(m);
    /* Marks are bits: many revoked ids still leave most others admitted (a false hit only costs speed). */
    struct lent_gate *h = lent_gate_new();
    assert_non_null(h);
    lent_gate_set(h, true, 0);
    char id[64];
    for (int i = 0; i < 50000; i++) {
        snprintf(id, sizeof id, "revoked-%d", i);
        lent_gate_revoke(h, id);
    }
    m = message("plain-args", "native.add", &len);
    char *at = strstr(m, "c0ffee00-0000-4000-8000-000000000001");
    assert_non_null(at);
    int admitted = 0;
    for (int i = 0; i < 1000; i++) {
        char other[40];
        snprintf(other, sizeof other, "c0ffee00-0000-4000-8000-%012d", 100000 + i);
        char *p = m;
        while ((p = strstr(p, "c0ffee00-0000-4000-8000-")) != NULL) { /* the id, wherever the message has it */
            memcpy(p, other, 36);
            p += 36;
        }
        admitted += lent_gate_admits(h, m, len) != NULL;
    }
    assert_true(admitted > 900);
    free(m);
    lent_gate_free(h);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_closed_until_opened, gate_setup, gate_teardown),
        cmocka_unit_test_setup_teardown(test_only_what_runs_now, gate_setup, gate_teardown),
        cmocka_unit_test_setup_teardown(test_size_limit, gate_setup, gate_teardown),
        cmocka_unit_test_setup_teardown(test_revoked_ids_stay_out, gate_setup, gate_teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
