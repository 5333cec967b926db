/* log: lines on stderr in Celery's shape, e.g.
 *   [2026-11-22 13:07:10,555: INFO/MainProcess] Task native.add[<id>] succeeded in 0.00012s: 3
 *
 * stderr is fully buffered here and flushed once per pass of the main loop (log_flush), because a worker
 * logging every task at INFO would otherwise spend a write(2) per line. Pool children flush after each batch.
 * State is per process (level and process name) and set once at start-up or right after fork. */
#ifndef CELERIAC_LOG_H
#define CELERIAC_LOG_H

#include "config.h"

/* level: lines below it are dropped. process_name: borrowed, must outlive logging ("MainProcess",
 * "ForkPoolWorker-1"). */
void log_init(enum log_level level, const char *process_name);
void log_set_process(const char *process_name);
int log_enabled(enum log_level level);
void log_msg(enum log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void log_flush(void);

#define log_debug(...) log_msg(LOG_DEBUG, __VA_ARGS__)
#define log_info(...) log_msg(LOG_INFO, __VA_ARGS__)
#define log_warning(...) log_msg(LOG_WARNING, __VA_ARGS__)
#define log_error(...) log_msg(LOG_ERROR, __VA_ARGS__)
#define log_critical(...) log_msg(LOG_CRITICAL, __VA_ARGS__)

#endif
