/* consumer: the worker's main loop. Takes messages from the broker within the prefetch budget, hands them to
 * the pool, stores results, acknowledges, and shuts down warm (SIGTERM/SIGINT) or cold (second signal, SIGQUIT).
 * Runs in the main process only. */
#ifndef CELERIAC_CONSUMER_H
#define CELERIAC_CONSUMER_H

#include "config.h"

/* Runs until shutdown. Returns the process exit code: 0 after a warm shutdown, 1 after a cold one or when
 * the broker or backend could not be reached at start-up. */
int consumer_run(const struct config *cfg);

#endif
