/* celeriac: command line, logging set-up and wiring; the work is in consumer.c (worker) and sdk.c (the task
 * commands). */
#include <stdio.h>
#include <stdlib.h>

#include "config.h"
#include "consumer.h"
#include "db.h"
#include "log.h"
#include "sdk.h"

int main(int argc, char **argv)
{
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
