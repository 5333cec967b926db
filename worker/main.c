/* celeriac: command line, logging set-up and wiring; the work is in consumer.c. */
#include <stdio.h>

#include "config.h"
#include "consumer.h"
#include "log.h"

int main(int argc, char **argv)
{
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
    log_init(cfg.log_level, "MainProcess");
    int code = consumer_run(&cfg);
    config_clear(&cfg);
    return code;
}
