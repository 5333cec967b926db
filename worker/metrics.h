/* metrics: counters and histograms for /metrics, in Prometheus' text exposition format (version 0.0.4).
 * Pure; main process only. Task names are labels: at most METRICS_TASKS distinct names are tracked (a worker
 * knows a fixed set of native tasks, but unknown names arrive too); later names count under "other". */
#ifndef CELERIAC_METRICS_H
#define CELERIAC_METRICS_H

#include "buf.h"

#define METRICS_TASKS 64

enum metrics_event {
    METRICS_RECEIVED,
    METRICS_SUCCEEDED,
    METRICS_FAILED,
    METRICS_RETRIED,
    METRICS_REVOKED,
    METRICS_NEVENTS
};

struct metrics;

struct metrics *metrics_new(void); /* free with metrics_free */
void metrics_free(struct metrics *m);
void metrics_count(struct metrics *m, const char *task, enum metrics_event ev); /* task borrowed, NULL ok */
void metrics_runtime(struct metrics *m, const char *task, double seconds);
/* Time from a message reaching the worker (or its ETA) to a process taking it. */
void metrics_queue_latency(struct metrics *m, double seconds);

/* The gauges the consumer knows at render time. */
struct metrics_gauges {
    int pool_busy, pool_idle;
    int prefetched;      /* held: fetched and not yet acknowledged */
    int eta_held;
    unsigned long broker_reconnects;
    int broker_up, backend_up, ready;
};

/* Appends the whole exposition to out. */
void metrics_render(const struct metrics *m, const struct metrics_gauges *g, struct buf *out);

#endif
