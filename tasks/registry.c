/* registry: the one table of built-in native tasks, and the tasks of the loaded modules. Adding a built-in
 * means adding a row here, kept sorted by name (a unit test checks the order, which task_registry_find's
 * binary search relies on). The docs are the stubs' docstrings (`celeriac stubs`). */
#include "task.h"

#include "db.h"

#include <stdlib.h>
#include <string.h>

#define TASK(n, f, p, d) {.name = (n), .fn = (f), .params = (p), .doc = (d)}
/* The same, with one big list argument handed over as text (task_def.raw_param). */
#define TASK_RAW(n, f, p, raw, d) {.name = (n), .fn = (f), .params = (p), .doc = (d), .raw_param = (raw)}

static const struct task_def registry[] = {
    TASK("native.add", task_builtin_add, "x, y",
         "-> x + y (int or float); TypeError for a non-number, OverflowError past int64."),
    TASK("native.echo", task_builtin_echo, "*args, **kwargs",
         "-> {\"args\": [...], \"kwargs\": {...}}, every JSON value kept."),
    TASK("native.fail", task_builtin_fail, "message", "Always fails with ValueError(message)."),
    TASK("native.fib", task_builtin_fib, "n",
         "-> the n-th Fibonacci number by naive recursion; ValueError unless 0 <= n <= 92."),
    TASK("native.fib_tree", task_builtin_fib_tree, "n, cutoff",
         "-> fib(n), computed as a tree of subtasks above the cutoff, joined by continuations (no task waits)."),
    TASK("native.incr", task_builtin_incr, "key", "INCR key in the broker's Redis database (the result backend's when the broker is not Redis), -> the new value."),
    TASK("native.noop", task_builtin_noop, "", "-> None"),
    TASK("native.pg_aggregate", db_task_aggregate, "table, group_by, column",
         "-> [[group, count, sum, min, max], ...] of column per value of group_by (a column, a list of columns, or "
         "None for the whole table), ordered by group, computed by PostgreSQL."),
    TASK_RAW("native.pg_bulk_delete", db_task_bulk_delete, "table, key_columns, keys", "keys",
         "Deletes the rows whose key_columns equal one of keys (lists; bare values for one key column), in one "
         "transaction -> the number deleted."),
    TASK_RAW("native.pg_bulk_insert", db_task_bulk_insert, "table, columns, rows", "rows",
         "COPY rows (lists, one value per column) into table, in one transaction -> the number inserted. The "
         "table must be on the worker's allow-list (--pg-tables), else PermissionError."),
    TASK_RAW("native.pg_bulk_upsert", db_task_bulk_upsert, "table, columns, rows, key_columns", "rows",
         "INSERT ... ON CONFLICT (key_columns) DO UPDATE of rows, in one transaction -> {\"inserted\": n, "
         "\"updated\": m}."),
    TASK("native.retry_n", task_builtin_retry_n, "n, max_retries=3",
         "-> n, after retrying itself (0.1 s countdown) until its retries reach n; MaxRetriesExceededError when "
         "n > max_retries (None: no limit)."),
    TASK("native.sleep_ms", task_builtin_sleep_ms, "ms", "Sleeps ms milliseconds, -> ms."),
    TASK("native.xsum", task_builtin_xsum, "values", "-> the sum of a list of numbers."),
};

#define REGISTRY_SIZE (sizeof registry / sizeof registry[0])

/* Tasks that break things on purpose, for testing isolation; only with `--enable-test-tasks`. */
static const struct task_def test_tasks[] = {
    TASK("native.crash", task_builtin_crash, "how", "kills its own process: 'segfault', 'abort' or 'exit'"),
};

/* Process-wide because the registry is: set in the main process at start-up (and by a reload in dev mode),
 * before the pool processes that use them are forked, and only read in those. */
static bool test_tasks_enabled;
static const struct task_def *const *loaded; /* borrowed from the module loader, sorted by name */
static size_t nloaded;

void task_registry_enable_test_tasks(bool enabled)
{
    test_tasks_enabled = enabled;
}

void task_registry_use(const struct task_def *const *defs, size_t n)
{
    loaded = defs;
    nloaded = defs ? n : 0;
}

static int compare_name(const void *key, const void *elem)
{
    return strcmp(key, ((const struct task_def *)elem)->name);
}

static int compare_loaded(const void *key, const void *elem)
{
    return strcmp(key, (*(const struct task_def *const *)elem)->name);
}

bool task_registry_is_builtin(const char *name)
{
    return bsearch(name, registry, REGISTRY_SIZE, sizeof registry[0], compare_name) != NULL;
}

const struct task_def *task_registry_find(const char *name)
{
    if (!name)
        return NULL;
    const struct task_def *t = bsearch(name, registry, REGISTRY_SIZE, sizeof registry[0], compare_name);
    if (!t && nloaded) {
        const struct task_def *const *l = bsearch(name, loaded, nloaded, sizeof *loaded, compare_loaded);
        t = l ? *l : NULL;
    }
    for (size_t i = 0; !t && test_tasks_enabled && i < sizeof test_tasks / sizeof test_tasks[0]; i++)
        if (strcmp(test_tasks[i].name, name) == 0)
            t = &test_tasks[i];
    return t;
}

void task_registry_each(void (*fn)(const struct task_def *task, void *arg), void *arg)
{
    /* Merge the two sorted lists, so that callers see one list in name order. */
    size_t i = 0, j = 0;
    while (i < REGISTRY_SIZE || j < nloaded) {
        if (j == nloaded || (i < REGISTRY_SIZE && strcmp(registry[i].name, loaded[j]->name) < 0))
            fn(&registry[i++], arg);
        else
            fn(loaded[j++], arg);
    }
    for (size_t k = 0; test_tasks_enabled && k < sizeof test_tasks / sizeof test_tasks[0]; k++)
        fn(&test_tasks[k], arg);
}
