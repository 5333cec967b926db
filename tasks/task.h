/* task: the worker's side of the task contract (the public side, for task modules, is celeriac.h): the
 * binder that matches a call to a task's parameters, the registry of built-in and loaded tasks, and the
 * built-in tasks.
 *
 * A task is a function that receives its arguments already bound and checked against its declared
 * parameters (so wrong counts never reach it), and either succeeds with a JSON result or fails with a Python
 * exception type name and message. It runs in a pool child process; it may block, and it may use the
 * services the context offers. It never sees the broker or the result backend. */
#ifndef CELERIAC_TASK_H
#define CELERIAC_TASK_H

#include "celeriac.h"

/* Releases what task_fail, task_subtask and task_continue_with stored, leaving the request fields alone. */
void task_ctx_reset(struct task_ctx *ctx);

/* The registry: built-in tasks, then those of the loaded modules (task_registry_use). Returns NULL for an
 * unknown name. */
const struct task_def *task_registry_find(const char *name);
/* Calls fn(task, arg) for every registered task, in name order. */
void task_registry_each(void (*fn)(const struct task_def *task, void *arg), void *arg);
/* Makes defs (n pointers, sorted by name, none a built-in's name; borrowed until the next call) the loaded
 * tasks, replacing the previous ones; NULL, 0: none. Main process: before forking, or followed by
 * pool_restart. */
void task_registry_use(const struct task_def *const *defs, size_t n);
/* Whether name is a built-in task's (loaded modules may not take those names). */
bool task_registry_is_builtin(const char *name);
/* Where the JSON text of task->raw_param is in a v2 body [args, kwargs, embed] (body[0..len)): true with the
 * span [*start, *end) when it is there (by position or by keyword), false otherwise (then the body is parsed
 * as a whole and the task gets the argument as usual). */
bool task_raw_arg_locate(const struct task_def *task, const char *body, size_t len, size_t *start, size_t *end);
/* Whether params follows the grammar below (NULL counts as ""). */
bool task_params_valid(const char *params);

/* Binds the caller's args (array, borrowed) and kwargs (object, borrowed) to task->params and calls it.
 * A mismatch fails the task with TypeError worded as Python words it, e.g.
 * "add() missing 1 required positional argument: 'y'", "add() takes 2 positional arguments but 3 were given",
 * "add() got an unexpected keyword argument 'z'", "add() got multiple values for argument 'x'". */
enum task_outcome task_invoke(const struct task_def *task, struct task_ctx *ctx, json_t *args, json_t *kwargs,
                              json_t **result);

/* Binding details (tasks/task.c), fixed so that clients can rely on them:
 * - params grammar: comma-separated `name`, `name=default`, then optionally `*name`, then optionally `**name`.
 *   A default is a JSON literal (1, 2.5, "s", null, true, false; None/True/False are accepted too). Keyword-only
 *   parameters (after *args) are not supported. A malformed params string fails every call with SystemError.
 * - checks run in CPython 3.11's order: keywords first (unexpected / multiple values, in the kwargs' order),
 *   then too many positionals, then missing ones; the messages are CPython's, naming the part of the task
 *   name after the last '.'.
 * - args that is not an array, or kwargs not an object, is a TypeError ("add() argument after ** must be a
 *   mapping, not list"); NULL stands for an empty array / object.
 * - the task receives kwargs == NULL unless it declares **kwargs; then it gets the keywords that matched no
 *   named parameter (the caller's object itself when the task has no named parameters).
 * - when the task fails, *result is NULL; when a task returns TASK_FAILURE without calling task_fail, the
 *   failure is reported as SystemError so that a result is always well formed. */

/* The built-in tasks (tasks/builtins.c), listed in the registry table in tasks/registry.c. They expect the
 * bound-argument convention above and are exposed so that tests can call them directly. Numbers follow Python:
 * bool counts as an int (True + 1 == 2); ints are int64 and leaving that range is an OverflowError instead of
 * Python's big ints; a float result that is not finite (1e308 + 1e308) is an OverflowError too, because JSON
 * (and jansson) cannot carry inf. */
enum task_outcome task_builtin_noop(struct task_ctx *ctx, json_t *args, json_t *kwargs, json_t **result);
enum task_outcome task_builtin_add(struct task_ctx *ctx, json_t *args, json_t *kwargs, json_t **result);
enum task_outcome task_builtin_echo(struct task_ctx *ctx, json_t *args, json_t *kwargs, json_t **result);
enum task_outcome task_builtin_fib(struct task_ctx *ctx, json_t *args, json_t *kwargs, json_t **result);
enum task_outcome task_builtin_sleep_ms(struct task_ctx *ctx, json_t *args, json_t *kwargs, json_t **result);
enum task_outcome task_builtin_fail(struct task_ctx *ctx, json_t *args, json_t *kwargs, json_t **result);
enum task_outcome task_builtin_xsum(struct task_ctx *ctx, json_t *args, json_t *kwargs, json_t **result);
enum task_outcome task_builtin_incr(struct task_ctx *ctx, json_t *args, json_t *kwargs, json_t **result);
enum task_outcome task_builtin_retry_n(struct task_ctx *ctx, json_t *args, json_t *kwargs, json_t **result);
enum task_outcome task_builtin_fib_tree(struct task_ctx *ctx, json_t *args, json_t *kwargs, json_t **result);
enum task_outcome task_builtin_crash(struct task_ctx *ctx, json_t *args, json_t *kwargs, json_t **result);

/* Registers native.crash (off by default: `celeriac worker --enable-test-tasks`). Call before forking. */
void task_registry_enable_test_tasks(bool enabled);

#endif
