/* metrics: see metrics.h. */
#include "metrics.h"

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

static const double runtime_bounds[] = {0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60, 300};
#define NBOUNDS (sizeof runtime_bounds / sizeof runtime_bounds[0])

struct histogram {
    unsigned long long le[NBOUNDS]; /* cumulative at render time; here per bucket */
    unsigned long long count;
    double sum;
};

struct task_metrics {
    char *name; /* owned */
    unsigned long long counts[METRICS_NEVENTS];
    struct histogram runtime;
};

struct metrics {
    struct task_metrics tasks[METRICS_TASKS + 1]; /* the last one is "other" */
    size_t ntasks;
    struct histogram latency;
};

struct metrics *metrics_new(void)
{
    struct metrics *m = calloc(1, sizeof *m);
    if (!m)
        abort();
    m->tasks[METRICS_TASKS].name = strdup("other");
    if (!m->tasks[METRICS_TASKS].name)
        abort();
    return m;
}

void metrics_free(struct metrics *m)
{
    if (!m)
        return;
    for (size_t i = 0; i <= METRICS_TASKS; i++)
        free(m->tasks[i].name);
    free(m);
}

static struct task_metrics *task(struct metrics *m, const char *name)
{
    if (!name)
        name = "<unknown>";
    for (size_t i = 0; i < m->ntasks; i++)
        if (strcmp(m->tasks[i].name, name) == 0)
            return &m->tasks[i];
    if (m->ntasks == METRICS_TASKS)
        return &m->tasks[METRICS_TASKS];
    struct task_metrics *t = &m->tasks[m->ntasks++];
    t->name = strdup(name);
    if (!t->name)
        abort();
    return t;
}

static void observe(struct histogram *h, double v)
{
    for (size_t i = 0; i < NBOUNDS; i++) {
        if (v <= runtime_bounds[i]) {
            h->le[i]++;
            break;
        }
    }
    h->count++;
    h->sum += v;
}

void metrics_count(struct metrics *m, const char *name, enum metrics_event ev)
{
    task(m, name)->counts[ev]++;
}

void metrics_runtime(struct metrics *m, const char *name, double seconds)
{
    observe(&task(m, name)->runtime, seconds);
}

void metrics_queue_latency(struct metrics *m, double seconds)
{
    observe(&m->latency, seconds < 0 ? 0 : seconds);
}

/* A label value: \, " and newline escaped as the format requires. */
static void label(struct buf *out, const char *s)
{
    for (; *s; s++) {
        if (*s == '\\' || *s == '"')
            buf_append_char(out, '\\');
        if (*s == '\n')
            buf_append_str(out, "\\n");
        else
            buf_append_char(out, *s);
    }
}

static void histogram(struct buf *out, const char *metric, const char *task_name, const struct histogram *h)
{
    unsigned long long cum = 0;
    for (size_t i = 0; i <= NBOUNDS; i++) {
        buf_printf(out, "%s_bucket{", metric);
        if (task_name) {
            buf_append_str(out, "task=\"");
            label(out, task_name);
            buf_append_str(out, "\",");
        }
        if (i < NBOUNDS) {
            cum += h->le[i];
            buf_printf(out, "le=\"%g\"} %llu\n", runtime_bounds[i], cum);
        } else {
            buf_printf(out, "le=\"+Inf\"} %llu\n", h->count);
        }
    }
    const char *suffix[] = {"_sum", "_count"};
    for (size_t k = 0; k < 2; k++) {
        buf_printf(out, "%s%s", metric, suffix[k]);
        if (task_name) {
            buf_append_str(out, "{task=\"");
            label(out, task_name);
            buf_append_str(out, "\"}");
        }
        if (k == 0)
            buf_printf(out, " %.9g\n", h->sum);
        else
            buf_printf(out, " %llu\n", h->count);
    }
}

void metrics_render(const struct metrics *m, const struct metrics_gauges *g, struct buf *out)
{
    static const char *const names[METRICS_NEVENTS] = {"received", "succeeded", "failed", "retried", "revoked"};
    size_t n = m->ntasks;
    bool other = false;
    for (size_t e = 0; e < METRICS_NEVENTS; e++)
        other |= m->tasks[METRICS_TASKS].counts[e] > 0;
    for (size_t e = 0; e < METRICS_NEVENTS; e++) {
        buf_printf(out, "# HELP celeriac_tasks_%s_total Tasks %s, per task name.\n", names[e], names[e]);
        buf_printf(out, "# TYPE celeriac_tasks_%s_total counter\n", names[e]);
        for (size_t i = 0; i <= METRICS_TASKS; i++) {
            if (i >= n && !(i == METRICS_TASKS && other))
                continue;
            buf_printf(out, "celeriac_tasks_%s_total{task=\"", names[e]);
            label(out, m->tasks[i].name);
            buf_printf(out, "\"} %llu\n", m->tasks[i].counts[e]);
        }
    }
    buf_append_str(out, "# HELP celeriac_task_runtime_seconds Task runtime in the pool process, per task name.\n"
                        "# TYPE celeriac_task_runtime_seconds histogram\n");
    for (size_t i = 0; i <= METRICS_TASKS; i++)
        if (i < n || (i == METRICS_TASKS && other))
            histogram(out, "celeriac_task_runtime_seconds", m->tasks[i].name, &m->tasks[i].runtime);
    buf_append_str(out, "# HELP celeriac_queue_latency_seconds Time from a task reaching the worker (or its ETA) "
                        "to a pool process taking it.\n# TYPE celeriac_queue_latency_seconds histogram\n");
    histogram(out, "celeriac_queue_latency_seconds", NULL, &m->latency);
    buf_printf(out,
               "# HELP celeriac_pool_processes Pool processes by state.\n# TYPE celeriac_pool_processes gauge\n"
               "celeriac_pool_processes{state=\"busy\"} %d\nceleriac_pool_processes{state=\"idle\"} %d\n"
               "# HELP celeriac_prefetched_messages Messages fetched and not yet acknowledged.\n"
               "# TYPE celeriac_prefetched_messages gauge\nceleriac_prefetched_messages %d\n"
               "# HELP celeriac_eta_held_messages ETA/countdown messages held until due.\n"
               "# TYPE celeriac_eta_held_messages gauge\nceleriac_eta_held_messages %d\n"
               "# HELP celeriac_broker_reconnects_total Broker connections re-established after a loss.\n"
               "# TYPE celeriac_broker_reconnects_total counter\nceleriac_broker_reconnects_total %lu\n"
               "# HELP celeriac_broker_up Whether the broker connection is up.\n"
               "# TYPE celeriac_broker_up gauge\nceleriac_broker_up %d\n"
               "# HELP celeriac_backend_up Whether the result backend connection is up (1 when none is used).\n"
               "# TYPE celeriac_backend_up gauge\nceleriac_backend_up %d\n"
               "# HELP celeriac_ready Whether /readyz answers 200.\n# TYPE celeriac_ready gauge\nceleriac_ready %d\n",
               g->pool_busy, g->pool_idle, g->prefetched, g->eta_held, g->broker_reconnects, g->broker_up,
               g->backend_up, g->ready);
}
