/* config: the command line and environment -> struct config, and Redis URL parsing.
 *
 * Pure apart from reading the hostname and the number of cores for defaults. Flags mirror `celery worker`
 * (same names, same meaning); CELERY_BROKER_URL and CELERY_RESULT_BACKEND are read as Celery reads them,
 * and a flag wins over its environment variable. The options live in one table in config.c. */
#ifndef CELERIAC_CONFIG_H
#define CELERIAC_CONFIG_H

#include <stdbool.h>
#include <stddef.h>

enum log_level { LOG_DEBUG = 10, LOG_INFO = 20, LOG_WARNING = 30, LOG_ERROR = 40, LOG_CRITICAL = 50 };

/* A parsed redis:// or redis+socket:// URL. Strings owned, freed by redis_url_clear. */
struct redis_url {
    char *host;      /* NULL for a unix socket */
    int port;        /* 6379 by default */
    char *socket;    /* path for redis+socket:// (and unix://), else NULL */
    char *username;  /* NULL unless given (Redis 6 ACL user) */
    char *password;  /* NULL unless given */
    int db;          /* database number, 0 by default; for sockets from ?virtual_host=N (or ?db=N) */
};

/* Accepts redis://[[user]:password@]host[:port][/db] (host may be [v6addr]), rediss:// is refused with an
 * error naming it, redis+socket:///path[?virtual_host=N] and unix:///path[?db=N].
 * Returns 0, or -1 with one line in err ("invalid Redis URL 'redis://h:x': port is not a number"); the URL
 * is echoed with its password masked. As kombu: user, password, host and socket path are percent-decoded, an
 * empty host means 127.0.0.1, "/", "" and "//N" are databases 0, 0 and N. Stricter than kombu where kombu only
 * fails later: a database that is not a number, port 0, and query parameters other than virtual_host/db on
 * socket URLs (kombu rejects ?virtual_host and ?db on tcp URLs too) are errors here.
 * url and err borrowed; *out is overwritten (not freed first) and freed by the caller with redis_url_clear,
 * even on failure (it is then empty). */
int redis_url_parse(const char *url, struct redis_url *out, char *err, size_t errlen);
/* Frees the strings and zeroes *u (borrowed). Safe on a zeroed or already cleared struct. */
void redis_url_clear(struct redis_url *u);
/* The URL with any password replaced by "**", for logs (url borrowed). Caller frees with free(). Works on
 * malformed URLs too: everything between the first ':' after "://" and the LAST '@' is masked, so a password
 * holding an unescaped '/', '?' or '#' is still hidden (at worst more than the password is masked). */
char *redis_url_redact(const char *url);

struct config {
    /* `celeriac worker` options; defaults in brackets. */
    char **queues;              /* -Q/--queues, comma-separated, repeatable ["celery"]; NULL-terminated */
    size_t nqueues;
    int concurrency;            /* -c/--concurrency [number of online cores]; 0 means the default, as in Celery */
    char *node_name;            /* -n/--hostname ["celeriac@<hostname>"], %h %n %d expanded as Celery does */
    bool send_events;           /* -E/--task-events */
    enum log_level log_level;   /* -l/--loglevel debug|info|warning|error|critical (any case) [warning] */
    int prefetch_multiplier;    /* --prefetch-multiplier [4]; 0 means the default, as `celery worker` does */
    bool acks_late;             /* --acks-late */
    bool track_started;         /* --track-started (task_track_started) */
    char *broker_url;           /* -b/--broker, else $CELERY_BROKER_URL ["redis://127.0.0.1:6379/0"] */
    char *result_backend;       /* --result-backend, else $CELERY_RESULT_BACKEND [NULL: results not stored] */
    double visibility_timeout;  /* --visibility-timeout seconds [3600] */
    int max_tasks_per_child;    /* --max-tasks-per-child, 0 = unlimited */
    int max_memory_per_child;   /* --max-memory-per-child KiB resident, 0 = unlimited (Celery's meaning) */
    long max_message_size;      /* --max-message-size bytes [64 MiB] */
    bool enable_test_tasks;     /* --enable-test-tasks: native.crash */
    double time_limit;          /* --time-limit seconds, 0 = none; a message's timelimit header wins */
    double soft_time_limit;     /* --soft-time-limit seconds, 0 = none; likewise */
    long max_eta_reserved;      /* --max-eta-reserved [1000]: ETA tasks held at most, 0 = no cap (stock Celery) */
    char *default_queue;        /* --default-queue ["celery"]: Celery's task_default_queue, see canvas.h */
    long result_expires;        /* --result-expires seconds [86400]; 0 = never expire (SET instead of SETEX) */
    char *database_url;         /* --database-url, else $DATABASE_URL: libpq URI or keyword string [NULL: libpq's
                                 * defaults]; checked by db_configure, not here, and never logged unredacted */
    char *pg_tables;            /* --pg-tables, else $CELERIAC_PG_TABLES: tables the db tasks may touch [none] */
    int http_port;              /* --http-port: /healthz, /readyz, /metrics [0: no HTTP server] */
    char *http_bind;            /* --http-bind IPv4 address for it ["0.0.0.0"] */
    char *tasks_path;           /* --tasks, else $CELERIAC_TASKS: task modules to load (worker/taskdir.h) [none] */
    bool dev;                   /* --dev: rebuild and swap the --tasks modules on change */
    char *autoscale;            /* --autoscale MAX[,MIN] as given [NULL: a fixed pool of --concurrency] */
    int autoscale_max;          /* parsed from it: 1..256 */
    int autoscale_min;          /* 1..max (Celery's 0 is taken as 1: a worker keeps one process) */
};

enum config_outcome {
    CONFIG_RUN = 0,   /* run the worker with *out */
    CONFIG_EXIT = 1,  /* --help or --version was printed to stdout: exit 0 */
    CONFIG_ERROR = -1 /* bad flag, value or URL: err holds one line; exit 2 */
};

/* Parses argv (argv[1] must be "worker", or --help/--version) and the environment (getenv).
 * Validates both URLs with redis_url_parse. *out is owned by the caller, freed with config_clear.
 * Options may come before or after "worker" (`celeriac -b URL worker` as `celery -b URL worker`); "--" ends
 * them. argv and err are borrowed, argv is not reordered. err gets a full line without newline, ready to
 * print: "celeriac: error: option -c expects a non-negative integer, got 'x'". On CONFIG_EXIT and
 * CONFIG_ERROR *out is left empty (config_clear is still safe). */
int config_parse(int argc, char **argv, struct config *out, char *err, size_t errlen);
/* Frees what *c owns and zeroes it (c borrowed). Safe to call twice. */
void config_clear(struct config *c);

#endif
