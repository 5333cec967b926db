#include "log.h"

#include <stdarg.h>
#include <stdio.h>
#include <sys/time.h>
#include <time.h>

/* Process-wide on purpose: every module logs, and threading a logger through each call would buy nothing
 * in a single-threaded process. Written only at start-up and right after fork. */
static enum log_level current_level = LOG_WARNING;
static const char *current_process = "MainProcess";
static char stderr_buffer[1 << 16];

void log_init(enum log_level level, const char *process_name)
{
    current_level = level;
    current_process = process_name;
    setvbuf(stderr, stderr_buffer, _IOFBF, sizeof stderr_buffer);
}

void log_set_process(const char *process_name)
{
    current_process = process_name;
}

int log_enabled(enum log_level level)
{
    return level >= current_level;
}

static const char *level_name(enum log_level level)
{
    switch (level) {
    case LOG_DEBUG: return "DEBUG";
    case LOG_INFO: return "INFO";
    case LOG_WARNING: return "WARNING";
    case LOG_ERROR: return "ERROR";
    case LOG_CRITICAL: return "CRITICAL";
    }
    return "INFO";
}

void log_msg(enum log_level level, const char *fmt, ...)
{
    if (level < current_level)
        return;
    struct timeval tv;
    gettimeofday(&tv, NULL);
    struct tm tm;
    localtime_r(&tv.tv_sec, &tm);
    char stamp[32];
    strftime(stamp, sizeof stamp, "%Y-%m-%d %H:%M:%S", &tm);
    fprintf(stderr, "[%s,%03ld: %s/%s] ", stamp, (long)(tv.tv_usec / 1000), level_name(level), current_process);
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    if (level >= LOG_ERROR)
        fflush(stderr); /* errors must survive a crash that follows them */
}

void log_flush(void)
{
    fflush(stderr);
}
