/* broker: the pure parts of the Redis transport (key naming). The transport itself is exercised against a
 * real redis-server by the integration tests. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <string.h>

#include "broker.h"

static void test_priority_steps_round_down(void **state)
{
    (void)state;
    /* kombu: priority clamped to 0..9, rounded down to 0/3/6/9; step 0 is the bare queue name. */
    static const struct {
        int priority;
        const char *key;
        size_t len;
    } cases[] = {
        {0, "celery", 6},           {1, "celery", 6},           {2, "celery", 6},
        {3, "celery\x06\x16" "3", 9}, {5, "celery\x06\x16" "3", 9}, {6, "celery\x06\x16" "6", 9},
        {8, "celery\x06\x16" "6", 9}, {9, "celery\x06\x16" "9", 9}, {10, "celery\x06\x16" "9", 9},
        {255, "celery\x06\x16" "9", 9}, {-4, "celery", 6},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        char key[64];
        size_t n = broker_priority_key(key, sizeof key, "celery", cases[i].priority);
        assert_int_equal(n, cases[i].len);
        assert_memory_equal(key, cases[i].key, cases[i].len + 1);
    }
}

static void test_priority_key_of_other_queue_names(void **state)
{
    (void)state;
    char key[64];
    assert_int_equal(broker_priority_key(key, sizeof key, "native", 7), 9);
    assert_memory_equal(key, "native\x06\x16" "6", 10);
    assert_int_equal(broker_priority_key(key, sizeof key, "", 4), 3);
    assert_memory_equal(key, "\x06\x16" "3", 4);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_priority_steps_round_down),
        cmocka_unit_test(test_priority_key_of_other_queue_names),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
