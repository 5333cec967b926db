/* registry: the one table of built-in native tasks. Adding a task means adding a row here, kept sorted by
 * name (a unit test checks the order, which task_registry_find's binary search relies on). */
#include "task.h"

#include "db.h"

#include <stdlib.h>
#include <string.h>

static const struct task_def registry[] = {
    {"native.add", task_builtin_add, "x, y", "x + y for ints and floats"},
    {"native.echo", task_builtin_echo, "*args, **kwargs", "{\"args\": args, \"kwargs\": kwargs}, values kept exactly"},
    {"native.fail", task_builtin_fail, "message", "fails with ValueError(message)"},
    {"native.fib", task_builtin_fib, "n", "the n-th Fibonacci number by naive recursion, 0 <= n <= 92"},
    {"native.fib_tree", task_builtin_fib_tree, "n, cutoff",
     "fib(n) as a tree of subtasks above the cutoff, joined without waiting (continuations)"},
    {"native.incr", task_builtin_incr, "key", "INCR key in the broker's Redis database, returns the new value"},
    {"native.noop", task_builtin_noop, "", "does nothing, returns None"},
    {"native.pg_aggregate", db_task_aggregate, "table, group_by, column",
     "[[group, count, sum, min, max], ...] of column per group, computed by PostgreSQL"},
    {"native.pg_bulk_delete", db_task_bulk_delete, "table, key_columns, keys",
     "deletes the rows whose key_columns match one of keys, in one transaction; returns the count"},
    {"native.pg_bulk_insert", db_task_bulk_insert, "table, columns, rows",
     "inserts rows through COPY, in one transaction; returns the count"},
    {"native.pg_bulk_upsert", db_task_bulk_upsert, "table, columns, rows, key_columns",
     "INSERT ... ON CONFLICT (key_columns) DO UPDATE of rows via COPY; returns {inserted, updated}"},
    {"native.retry_n", task_builtin_retry_n, "n, max_retries=3",
     "retries itself (0.1 s countdown) until its retries reach n, then returns n"},
    {"native.sleep_ms", task_builtin_sleep_ms, "ms", "sleeps ms milliseconds, returns ms"},
    {"native.xsum", task_builtin_xsum, "values", "the sum of a list of numbers"},
};

#define REGISTRY_SIZE (sizeof registry / sizeof registry[0])

/* Tasks that break things on purpose, for testing isolation; only with `--enable-test-tasks`. */
static const struct task_def test_tasks[] = {
    {"native.crash", task_builtin_crash, "how", "kills its own process: 'segfault', 'abort' or 'exit'"},
};

/* Whether test_tasks are registered. Process-wide because the registry is: set once at start-up, before
 * the pool forks, and only read afterwards. */
static bool test_tasks_enabled;

void task_registry_enable_test_tasks(bool enabled)
{
    test_tasks_enabled = enabled;
}

static int compare_name(const void *key, const void *elem)
{
    return strcmp(key, ((const struct task_def *)elem)->name);
}

const struct task_def *task_registry_find(const char *name)
{
    if (!name)
        return NULL;
    const struct task_def *t = bsearch(name, registry, REGISTRY_SIZE, sizeof registry[0], compare_name);
    for (size_t i = 0; !t && test_tasks_enabled && i < sizeof test_tasks / sizeof test_tasks[0]; i++)
        if (strcmp(test_tasks[i].name, name) == 0)
            t = &test_tasks[i];
    return t;
}

void task_registry_each(void (*fn)(const struct task_def *task, void *arg), void *arg)
{
    for (size_t i = 0; i < REGISTRY_SIZE; i++)
        fn(&registry[i], arg);
    for (size_t i = 0; test_tasks_enabled && i < sizeof test_tasks / sizeof test_tasks[0]; i++)
        fn(&test_tasks[i], arg);
}
