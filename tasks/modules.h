/* modules: task modules, i.e. shared objects built against celeriac.h, compiled from C files with the system
 * compiler and loaded with dlopen. Main process only (the pool processes inherit what is loaded by fork). */
#ifndef CELERIAC_MODULES_H
#define CELERIAC_MODULES_H

#include <stdbool.h>
#include <stddef.h>

#include "task.h"

/* Compiles every src_dir/NAME.c into out_dir/NAME.so (out_dir must exist; src_dir's own .so files are
 * replaced atomically when out_dir is src_dir). The compiler is $CC, else cc; its output (warnings, errors
 * with file and line) goes to *diag (caller frees; NULL when it printed nothing). Returns how many modules
 * were built, or -1 when one failed to compile or none could be started (then *diag says why). */
int task_modules_build(const char *src_dir, const char *out_dir, char **diag);

/* Whether dir holds at least one .c file (a source directory, built before loading). */
bool task_modules_has_sources(const char *dir);

/* Loaded modules: one generation, used together. */
struct task_modules;

/* Loads path: a .so file, or every .so in a directory (not recursive). Each must carry a CELERIAC_MODULE table
 * of celeriac.h's ABI version, with valid rows whose names clash neither with a built-in nor with each other.
 * Returns the modules (free with task_modules_free), or NULL with one line in err. Zero modules is an error. */
struct task_modules *task_modules_load(const char *path, char *err, size_t errlen);
/* The loaded tasks, sorted by name, for task_registry_use; borrowed from m. */
const struct task_def *const *task_modules_defs(const struct task_modules *m, size_t *n);
size_t task_modules_count(const struct task_modules *m);
/* dlcloses them: nothing may use their tasks afterwards (in this process). */
void task_modules_free(struct task_modules *m);

/* Writes celeriac.h (the copy built into this binary) into dir as dir/celeriac.h. Returns 0 or -1 (errno). */
int task_modules_write_header(const char *dir);

#endif
