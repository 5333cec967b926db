/* taskdir: the worker's --tasks PATH. Loads the task modules there (building a directory of C files first,
 * into a private directory), makes them the registry's loaded tasks, and in dev mode watches the directory
 * (inotify) to rebuild and swap in a new generation when a .c or .h file changes. Main process only. */
#ifndef CELERIAC_TASKDIR_H
#define CELERIAC_TASKDIR_H

#include <stdbool.h>
#include <stddef.h>

struct taskdir;

/* Loads path (see above) and registers its tasks. watch: dev mode (path must be a directory of C files).
 * Returns NULL with one line in err (compiler output is logged). Free with taskdir_close, which unregisters. */
struct taskdir *taskdir_open(const char *path, bool watch, char *err, size_t errlen);
void taskdir_close(struct taskdir *t);

/* The inotify descriptor to poll for reading (dev mode), else -1. */
int taskdir_fd(const struct taskdir *t);
/* Reads the pending change notifications; a change to a .c or .h file schedules a rebuild shortly after (so
 * that an editor's burst of writes gives one rebuild). now: monotonic seconds. */
void taskdir_on_readable(struct taskdir *t, double now);
/* Milliseconds until a scheduled rebuild, or -1 when none. */
int taskdir_next_ms(const struct taskdir *t, double now);
/* Starts a scheduled rebuild when due, in a background builder process, and installs its generation once it is
 * built (taskdir_next_ms asks to be called again meanwhile). Returns 1 when a new generation is registered
 * (the caller restarts the pool so that new tasks run it), 0 when nothing happened yet, -1 when the build or
 * load failed (logged; the previous generation stays registered). */
int taskdir_tick(struct taskdir *t, double now);
/* Rebuilds (for a source directory) or reloads now, in this process, dropping a background build under way
 * (pool_restart control). */
int taskdir_reload(struct taskdir *t);
/* Modules and tasks of the generation in use. */
size_t taskdir_task_count(const struct taskdir *t);

#endif
