/* celeriac: command line, logging set-up and wiring; the work is in consumer.c (worker) and sdk.c (the task
 * commands). */
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>

#include "config.h"
#include "consumer.h"
#include "db.h"
#include "log.h"
#include "sdk.h"

int main(int argc, char **argv)
{
    /* Large buffers (a 48 MB message read from Redis grows hiredis's buffer a megabyte at a time) must stay
     * mmapped, where realloc is a page remap, instead of moving to the heap once glibc's dynamic threshold
     * has risen, where every growth copies the whole buffer: measured ~0.5 s of memmove per 48 MB message. */
    mallopt(M_MMAP_THRESHOLD, 256 * 1024);
    if (argc > 1 && sdk_is_command(argv[1])) {
        log_init(LOG_WARNING, "MainProcess");
        int code = sdk_main(argc, argv);
        log_flush();
        return code;
    }
    struct config cfg = {0};
    char err[512];
    int rc = config_parse(argc, argv, &cfg, err, sizeof err);
    if (rc == CONFIG_EXIT)
        return 0;
    if (rc == CONFIG_ERROR) {
        fprintf(stderr, "%s\n", err);
        config_clear(&cfg);
        return 2;
    }
    /* Before the pool forks: every child inherits db/'s configuration and opens its own connection. */
    if (db_configure(cfg.database_url, cfg.pg_tables, err, sizeof err) < 0) {
        fprintf(stderr, "celeriac: error: %s\n", err);
        config_clear(&cfg);
        return 2;
    }
    log_init(cfg.log_level, "MainProcess");
    if (cfg.pg_tables) {
        char *dsn = cfg.database_url ? db_dsn_redact(cfg.database_url) : NULL;
        log_info("native.pg_* tasks: database %s, tables %s", dsn ? dsn : "from libpq's PG* variables", cfg.pg_tables);
        free(dsn);
    }
    int code = consumer_run(&cfg);
    db_shutdown();
    config_clear(&cfg);
    return code;
}
