/* remote: the remote-control commands of the pidbox (doc 9.3, 10), as stock `celery inspect` / `celery control`
 * and Flower send them: each reads or steers the consumer's state (consumer_int.h) and returns the reply. */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "amqp_broker.h"
#include "buf.h"
#include "consumer_int.h"
#include "control.h"
#include "lentwait.h"
#include "log.h"
#include "pool.h"
#include "result.h"
#include "revoked.h"
#include "taskdir.h"


/* Request info for a job (doc 9.3); child < 0: not handed to a process yet. */
static json_t *job_info(const struct consumer *c, const struct job *j, int child, bool running, double started)
{
    double time_start = -1;
    if (running) /* pool_running's clock is monotonic; inspect shows epoch seconds */
        time_start = epoch_now() - (pool_clock() - started);
    return control_request_info(&j->req, c->cfg->node_name, j->acked,
                                running && child >= 0 ? (int)pool_child_pid(c->pool, child) : 0, time_start);
}


static json_t *cmd_active(struct consumer *c, const json_t *args)
{
    (void)args;
    json_t *out = json_array();
    for (int i = 0; i < pool_capacity(c->pool); i++) {
        double started;
        struct job *j = running_job(c, i, &started);
        if (j)
            json_array_append_new(out, job_info(c, j, i, true, started));
    }
    return out;
}

/* Prefetched, not running, not waiting for an ETA: the ready list and what children have queued. */
static json_t *cmd_reserved(struct consumer *c, const json_t *args)
{
    (void)args;
    json_t *out = json_array();
    for (int i = 0; i < pool_capacity(c->pool); i++) {
        double started;
        struct job *run = running_job(c, i, &started);
        for (struct job *j = c->children[i].jobs.head; j; j = j->next)
            if (j != run)
                json_array_append_new(out, job_info(c, j, i, false, 0));
    }
    for (struct job *j = c->throttled.head; j; j = j->next)
        json_array_append_new(out, job_info(c, j, -1, false, 0));
    for (struct job *j = c->ready.head; j; j = j->next)
        json_array_append_new(out, job_info(c, j, -1, false, 0));
    return out;
}

static json_t *cmd_scheduled(struct consumer *c, const json_t *args)
{
    (void)args;
    json_t *out = json_array();
    for (size_t i = 0; i < c->eta.n; i++) {
        const struct job *j = c->eta.v[i];
        /* priority: Celery's timer priority, always 6 for ETA entries (not the message's). */
        json_array_append_new(out, json_pack("{s:s, s:i, s:o}", "eta", j->req.eta.s ? j->req.eta.s : "", "priority",
                                             6, "request", job_info(c, j, -1, false, 0)));
    }
    return out;
}

static json_t *cmd_ping(struct consumer *c, const json_t *args)
{
    (void)c, (void)args;
    return json_pack("{s:s}", "ok", "pong");
}

static json_t *cmd_clock(struct consumer *c, const json_t *args)
{
    (void)args;
    return json_pack("{s:I}", "clock", (json_int_t)c->clock);
}

static void add_task_name(const struct task_def *t, void *arg)
{
    json_array_append_new(arg, json_string(t->name));
}

static json_t *cmd_registered(struct consumer *c, const json_t *args)
{
    (void)c, (void)args;
    json_t *out = json_array();
    task_registry_each(add_task_name, out); /* in name order already, as Celery sorts them */
    return out;
}

static json_t *cmd_active_queues(struct consumer *c, const json_t *args)
{
    (void)args;
    json_t *out = json_array();
    for (size_t i = 0; i < broker_queue_count(c->broker); i++) {
        bool consumed;
        const char *name = broker_queue_name(c->broker, i, &consumed);
        if (consumed)
            json_array_append_new(out, control_queue_dict(name));
    }
    return out;
}

static json_t *cmd_revoked(struct consumer *c, const json_t *args)
{
    (void)args;
    return revoked_list(c->revoked, epoch_now());
}

/* Celery's prefork pool human_write_stats(): tasks written per process, as shares of the total (indexes that
 * got none are not listed, as in its Counter), the scheduling strategy, and the inqueues. */
static json_t *pool_write_stats(const struct consumer *c)
{
    unsigned long total = 0, listed = 0;
    for (int i = 0; i < c->nchildren; i++)
        total += c->children[i].writes;
    struct buf all = {0}, raw = {0};
    int live = 0, writing = 0;
    for (int i = 0; i < pool_capacity(c->pool); i++) {
        live += pool_child_alive(c->pool, i);
        writing += pool_child_writing(c->pool, i);
    }
    for (int i = 0; i < c->nchildren; i++) {
        unsigned long v = c->children[i].writes;
        if (!v)
            continue;
        buf_printf(&all, "%s%.2f", listed ? ", " : "", (double)v / (double)total);
        buf_printf(&raw, "%s%lu", listed ? ", " : "", v);
        listed++;
    }
    char avg[32];
    snprintf(avg, sizeof avg, "%.2f", listed ? 1.0 / (double)listed : 0.0);
    json_t *out = json_pack("{s:I, s:s, s:s, s:s, s:s, s:{s:i, s:i}}", "total", (json_int_t)total, "avg", avg, "all",
                            all.data ? all.data : "", "raw", raw.data ? raw.data : "", "strategy", "fair", "inqueues",
                            "total", live, "active", writing);
    buf_free(&all);
    buf_free(&raw);
    return out;
}

static json_t *cmd_stats(struct consumer *c, const json_t *args)
{
    (void)args;
    char clock[32], vhost[16];
    snprintf(clock, sizeof clock, "%lld", c->clock); /* a string in stats, an int in clock (doc 11.12) */
    snprintf(vhost, sizeof vhost, "%d", c->broker_url.db);
    bool amqp = c->broker_ep.kind == BROKER_AMQP;
    json_t *pids = json_array();
    for (int i = 0; i < pool_capacity(c->pool); i++)
        if (pool_child_alive(c->pool, i))
            json_array_append_new(pids, json_integer(pool_child_pid(c->pool, i)));
    json_t *mtpc = c->cfg->max_tasks_per_child ? json_integer(c->cfg->max_tasks_per_child) : json_string("N/A");
    json_t *out = json_pack(
        "{s:O, s:i, s:s, s:I, s:{s:i, s:o, s:o, s:b, s:[f, f], s:o}, "
        "s:{s:s, s:s?, s:s, s:i, s:b, s:b, s:s, s:i, s:{}, s:n, s:n, s:f, s:s, s:[]}, s:i, s:o}",
        "total", c->totals, "pid", (int)getpid(), "clock", clock, "uptime", (json_int_t)(epoch_now() - c->started_at),
        "pool", "max-concurrency", pool_size(c->pool), "processes", pids, "max-tasks-per-child", mtpc,
        "put-guarded-by-semaphore", 0, "timeouts", c->cfg->soft_time_limit, c->cfg->time_limit, "writes",
        pool_write_stats(c),
        "broker", "hostname", c->broker_url.host ? c->broker_url.host : c->broker_url.socket, "userid",
        c->broker_url.username, "virtual_host", amqp ? c->broker_ep.vhost : vhost, "port", c->broker_url.port, "insist",
        0, "ssl", amqp && c->broker_ep.tls, "transport",
        amqp ? "amqp" : c->broker_url.socket ? "redis+socket" : "redis", "connect_timeout", 4, "transport_options",
        "login_method", "uri_prefix", "heartbeat", 120.0, "failover_strategy", "round-robin", "alternates", "prefetch_count",
        c->prefetch, "rusage", control_rusage());
    if (!out)
        abort();
    if (c->autoscale_max) /* Celery's Autoscaler.info() */
        json_object_set_new(out, "autoscaler",
                            json_pack("{s:i, s:i, s:i, s:i}", "max", c->autoscale_max, "min", c->autoscale_min,
                                      "current", pool_size(c->pool), "qty", reserved_count(c)));
    return out;
}

static json_t *cmd_conf(struct consumer *c, const json_t *args)
{
    (void)args;
    const struct config *cfg = c->cfg;
    /* Celery's setting names, passwords masked as `celery inspect conf` masks them. */
    return json_pack("{s:s, s:s?, s:i, s:i, s:b, s:b, s:b, s:s, s:{s:f}, s:I}", "broker_url", c->broker_display,
                     "result_backend", c->backend_display, "worker_concurrency", cfg->concurrency,
                     "worker_prefetch_multiplier", cfg->prefetch_multiplier, "task_acks_late", cfg->acks_late,
                     "task_track_started", cfg->track_started, "worker_send_task_events", c->task_events,
                     "task_default_queue", cfg->default_queue, "broker_transport_options", "visibility_timeout",
                     cfg->visibility_timeout, "result_expires", (json_int_t)cfg->result_expires);
}

static json_t *cmd_report(struct consumer *c, const json_t *args)
{
    (void)args;
    struct buf text = {0};
    buf_printf(&text,
               "software -> celeriac:%s (speaks Celery 5.2.6's protocol) kombu-redis\n"
               "platform -> system:Linux impl:C\nloader -> none (native tasks)\nsettings -> transport:%s "
               "results:%s\n\nbroker_url: '%s'\nresult_backend: %s\n",
               CELERIAC_VERSION, c->broker_ep.kind == BROKER_AMQP ? "amqp" : "redis", c->backend ? "redis" : "disabled",
               c->broker_display, c->backend_display ? c->backend_display : "None");
    json_t *out = json_pack("{s:s}", "ok", text.data);
    buf_free(&text);
    return out;
}

static json_t *cmd_hello(struct consumer *c, const json_t *args)
{
    const char *from = json_string_value(json_object_get(args, "from_node"));
    if (from && strcmp(from, c->cfg->node_name) == 0)
        return NULL; /* our own broadcast: Celery answers None */
    const json_t *theirs = json_object_get(args, "revoked");
    const char *id;
    const json_t *v;
    double now = epoch_now();
    json_object_foreach((json_t *)theirs, id, v) {
        revoked_add(c->revoked, id, now); /* mingle: merge what the other node knows */
        lent_gate_revoke(pool_gate(c->pool), id);
    }
    return json_pack("{s:o, s:I}", "revoked", revoked_map(c->revoked, now), "clock", (json_int_t)c->clock);
}

static json_t *cmd_shutdown(struct consumer *c, const json_t *args)
{
    (void)c, (void)args;
    log_warning("Got shutdown from remote");
    consumer_request_stop(); /* the loop starts a warm shutdown, as on SIGTERM */
    return NULL;
}

static json_t *cmd_heartbeat(struct consumer *c, const json_t *args)
{
    (void)args;
    worker_event(c, "worker-heartbeat");
    return NULL;
}

static json_t *cmd_enable_events(struct consumer *c, const json_t *args)
{
    (void)args;
    bool was = c->task_events;
    c->task_events = true;
    if (!was)
        log_info("Events of group {task} enabled by remote.");
    return json_pack("{s:s}", "ok", was ? "task events already enabled" : "task events enabled");
}

static json_t *cmd_disable_events(struct consumer *c, const json_t *args)
{
    (void)args;
    bool was = c->task_events;
    c->task_events = false;
    if (was)
        log_info("Events of group {task} disabled by remote.");
    return json_pack("{s:s}", "ok", was ? "task events disabled" : "task events already disabled");
}

/* "SIGTERM", "TERM", "sigkill", "9" -> the number; 0 when unknown. */
static int parse_signal(const char *name)
{
    if (!name)
        return SIGTERM;
    char *end;
    long n = strtol(name, &end, 10);
    if (*name && !*end)
        return n > 0 && n < NSIG ? (int)n : 0;
    if (strncasecmp(name, "SIG", 3) == 0)
        name += 3;
    for (int sig = 1; sig < NSIG; sig++) {
        const char *abbrev = sigabbrev_np(sig);
        if (abbrev && strcasecmp(abbrev, name) == 0)
            return sig;
    }
    return 0;
}

/* Settles, at once, a revoked job that waits in the ETA heap or the ready list, so its client does not wait
 * for the ETA to learn it is REVOKED. Returns whether one was found. */
static bool revoke_waiting(struct consumer *c, const char *id)
{
    for (size_t i = 0; i < c->eta.n; i++) {
        if (c->eta.v[i]->req.id.s && strcmp(c->eta.v[i]->req.id.s, id) == 0) {
            struct job *j = eta_remove(&c->eta, i);
            c->held++; /* settling acks it, which counts it out of held */
            settle_revoked(c, j, "revoked", 0);
            return true;
        }
    }
    struct job_list *lists[] = {&c->ready, &c->throttled};
    for (size_t k = 0; k < 2; k++) {
        struct job_list *l = lists[k];
        struct job *prev = NULL;
        for (struct job *j = l->head; j; prev = j, j = j->next) {
            if (!j->req.id.s || strcmp(j->req.id.s, id) != 0)
                continue;
            if (prev)
                prev->next = j->next;
            else
                l->head = j->next;
            if (l->tail == j)
                l->tail = prev;
            l->len--;
            j->next = NULL;
            settle_revoked(c, j, "revoked", 0);
            return true;
        }
    }
    return false;
}

static json_t *cmd_revoke(struct consumer *c, const json_t *args)
{
    const json_t *ids = json_object_get(args, "task_id");
    json_t *list = json_is_string(ids) ? json_pack("[O]", ids) : json_is_array(ids) ? json_incref((json_t *)ids)
                                                                                     : json_array();
    bool terminate = json_is_true(json_object_get(args, "terminate"));
    int sig = parse_signal(json_string_value(json_object_get(args, "signal")));
    if (terminate && !sig) {
        json_decref(list);
        return json_pack("{s:s}", "error", "ValueError('unknown signal')");
    }
    double now = epoch_now();
    struct buf joined = {0}, killed = {0};
    size_t i;
    const json_t *v;
    json_array_foreach(list, i, v) {
        const char *id = json_string_value(v);
        if (!id)
            continue;
        buf_printf(&joined, "%s%s", joined.len ? ", " : "", id);
        revoked_add(c->revoked, id, now);
        lent_gate_revoke(pool_gate(c->pool), id);
        revoked_store_add(c, id, now);
        revoke_waiting(c, id);
        for (int k = 0; !terminate && k < pool_capacity(c->pool); k++) {
            double started;
            struct job *j = running_job(c, k, &started);
            if (j && j->req.id.s && strcmp(j->req.id.s, id) == 0)
                pool_flag_revoked(c->pool, k, j->seq); /* a task that looks (task_should_stop) stops */
        }
        for (int k = 0; terminate && k < pool_capacity(c->pool); k++) {
            double started;
            struct job *j = running_job(c, k, &started);
            if (!j || !j->req.id.s || strcmp(j->req.id.s, id) != 0 || c->children[k].revoked_seq)
                continue;
            log_info("Terminating %s (Signals.SIG%s)", id, sigabbrev_np(sig) ? sigabbrev_np(sig) : "?");
            c->children[k].revoked_seq = j->seq;
            c->children[k].revoke_signal = sig;
            kill(pool_child_pid(c->pool, k), sig); /* on_child_exit settles it as REVOKED "terminated" */
            buf_printf(&killed, "%s%s", killed.len ? ", " : "", id);
        }
    }
    log_info("Tasks flagged as revoked: %s", joined.len ? joined.data : "");
    json_t *out;
    if (terminate) {
        struct buf msg = {0};
        buf_printf(&msg, "terminate: %s", killed.len ? killed.data : "tasks unknown");
        out = json_pack("{s:s}", "ok", msg.data);
        buf_free(&msg);
    } else {
        struct buf msg = {0};
        buf_printf(&msg, "tasks %s flagged as revoked", joined.len ? joined.data : "");
        out = json_pack("{s:s}", "ok", msg.data);
        buf_free(&msg);
    }
    buf_free(&joined);
    buf_free(&killed);
    json_decref(list);
    return out;
}

static json_t *cmd_query_task(struct consumer *c, const json_t *args)
{
    const json_t *ids = json_object_get(args, "ids");
    json_t *out = json_object();
    size_t k;
    const json_t *v;
    json_array_foreach(ids, k, v) {
        const char *id = json_string_value(v);
        for (int i = 0; id && i < pool_capacity(c->pool); i++) {
            double started;
            struct job *run = running_job(c, i, &started);
            for (struct job *j = c->children[i].jobs.head; j; j = j->next)
                if (j->req.id.s && strcmp(j->req.id.s, id) == 0)
                    json_object_set_new(out, id, json_pack("[s, o]", j == run ? "active" : "reserved",
                                                           job_info(c, j, i, j == run, started)));
        }
        for (struct job *j = c->ready.head; id && j; j = j->next)
            if (j->req.id.s && strcmp(j->req.id.s, id) == 0)
                json_object_set_new(out, id, json_pack("[s, o]", "reserved", job_info(c, j, -1, false, 0)));
    }
    return out;
}

static json_t *ok_reply(const char *text)
{
    return json_pack("{s:s}", "ok", text);
}

static json_t *error_reply(const char *text)
{
    return json_pack("{s:s}", "error", text);
}

static json_t *cmd_rate_limit(struct consumer *c, const json_t *args)
{
    const char *name = json_string_value(json_object_get(args, "task_name"));
    const json_t *rl = json_object_get(args, "rate_limit");
    char text[64] = "";
    if (json_is_string(rl))
        snprintf(text, sizeof text, "%s", json_string_value(rl));
    else if (json_is_number(rl))
        snprintf(text, sizeof text, "%g", json_number_value(rl));
    double rate = parse_rate(text);
    if (rate < 0) {
        struct buf msg = {0};
        buf_printf(&msg, "Invalid rate limit string: %s", text);
        json_t *out = error_reply(msg.data);
        buf_free(&msg);
        return out;
    }
    if (!name || !task_registry_find(name)) {
        log_error("Rate limit attempt for unknown task %s", name ? name : "None");
        return error_reply("unknown task");
    }
    struct task_limits *l = task_limits(c, name, rate > 0);
    if (!l)
        return rate > 0 ? error_reply("too many task limits") : ok_reply("rate limit disabled successfully");
    l->rate = rate;
    l->tokens = 1.0;
    l->last = epoch_now();
    log_info("New rate limit for tasks of type %s: %s.", name, rate > 0 ? text : "None");
    return ok_reply(rate > 0 ? "new rate limit set successfully" : "rate limit disabled successfully");
}

static json_t *cmd_time_limit(struct consumer *c, const json_t *args)
{
    const char *name = json_string_value(json_object_get(args, "task_name"));
    const json_t *hard = json_object_get(args, "hard"), *soft = json_object_get(args, "soft");
    if (!name || !task_registry_find(name)) {
        log_error("Change time limit attempt for unknown task %s", name ? name : "None");
        return error_reply("unknown task");
    }
    struct task_limits *l = task_limits(c, name, true);
    if (!l)
        return error_reply("too many task limits");
    l->hard_limit = json_is_number(hard) ? json_number_value(hard) : 0;
    l->soft_limit = json_is_number(soft) ? json_number_value(soft) : 0;
    log_info("New time limits for tasks of type %s: soft=%g hard=%g", name, l->soft_limit, l->hard_limit);
    return ok_reply("time limits set successfully");
}

/* Celery's _update_prefetch_count: the prefetch follows the number of processes (the autoscaler's maximum,
 * with --autoscale). */
static void prefetch_follow_pool(struct consumer *c)
{
    if (c->cfg->prefetch_multiplier > 0)
        c->prefetch = (c->autoscale_max ? c->autoscale_max : pool_size(c->pool)) * c->cfg->prefetch_multiplier;
}

static json_t *cmd_autoscale(struct consumer *c, const json_t *args)
{
    if (!c->autoscale_max)
        return error_reply("ValueError('Autoscale not enabled')"); /* as a stock worker without --autoscale */
    const json_t *mx = json_object_get(args, "max"), *mn = json_object_get(args, "min");
    int max = json_is_integer(mx) ? (int)json_integer_value(mx) : c->autoscale_max;
    int min = json_is_integer(mn) ? (int)json_integer_value(mn) : c->autoscale_min;
    if (min < 1)
        min = 1;
    if (max < min || max > POOL_MAX)
        return error_reply("ValueError('autoscale: expected 1 <= min <= max <= 256')");
    /* As Celery's Autoscaler.update: the new bounds apply to the pool at once. */
    int procs = pool_size(c->pool);
    if (max < procs)
        pool_shrink(c->pool, procs - max);
    else if (min > procs && pool_grow(c->pool, min - procs) < 0)
        log_error("autoscale: cannot start a pool process: %s", strerror(errno));
    children_fit(c);
    c->autoscale_max = max;
    c->autoscale_min = min;
    prefetch_follow_pool(c);
    char text[64];
    snprintf(text, sizeof text, "autoscale now max=%d min=%d", max, min);
    log_info("%s", text);
    return ok_reply(text);
}

static int control_count(const json_t *args)
{
    const json_t *n = json_object_get(args, "n");
    return json_is_integer(n) ? (int)json_integer_value(n) : 1;
}

static json_t *cmd_pool_grow(struct consumer *c, const json_t *args)
{
    if (c->autoscale_max)
        return error_reply("pool_grow is not supported with autoscale. Adjust autoscale range instead.");
    int n = control_count(args);
    if (n < 0 || n + pool_size(c->pool) > POOL_MAX)
        return error_reply("ValueError('pool_grow: at most 256 processes')");
    if (pool_grow(c->pool, n) < 0)
        log_error("pool_grow: cannot start a pool process: %s", strerror(errno));
    children_fit(c);
    prefetch_follow_pool(c);
    log_info("Pool grown by %d: %d processes, prefetch %d", n, pool_size(c->pool), c->prefetch);
    return ok_reply("pool will grow");
}

static json_t *cmd_pool_shrink(struct consumer *c, const json_t *args)
{
    if (c->autoscale_max)
        return error_reply("pool_shrink is not supported with autoscale. Adjust autoscale range instead.");
    int n = control_count(args);
    if (n < 0 || n >= pool_size(c->pool))
        return error_reply("ValueError(\"Can't shrink pool below one process\")");
    pool_shrink(c->pool, n);
    prefetch_follow_pool(c);
    log_info("Pool shrunk by %d: %d processes, prefetch %d", n, pool_size(c->pool), c->prefetch);
    return ok_reply("pool will shrink");
}

static json_t *cmd_pool_restart(struct consumer *c, const json_t *args)
{
    (void)args;
    /* With --tasks, the modules are rebuilt (or reloaded) first, so that the new processes run them: the
     * native counterpart of pool_restart(reload=True). A failed build keeps the old ones serving. */
    if (c->taskdir)
        taskdir_reload(c->taskdir);
    tasks_loaded(c, true);
    log_info("Pool restart: each process is replaced once its current tasks are done");
    return ok_reply("reload started");
}

/* add_consumer / cancel_consumer: the queue is consumed the default way (exchange and routing key named as
 * the queue); exchange, exchange_type and routing_key arguments are not used, since on Redis a task's queue is
 * the list it was pushed to. */
static json_t *queue_reply(const char *prefix, const char *queue)
{
    struct buf msg = {0};
    buf_printf(&msg, "%s%s", prefix, queue);
    json_t *out = ok_reply(msg.data);
    buf_free(&msg);
    return out;
}

static json_t *cmd_add_consumer(struct consumer *c, const json_t *args)
{
    const char *queue = json_string_value(json_object_get(args, "queue"));
    if (!queue || !*queue)
        return error_reply("ValueError('queue name required')");
    if (broker_add_queue(c->broker, queue) < 0)
        return error_reply(broker_errstr(c->broker));
    log_info("Started consuming from %s", queue);
    return queue_reply("add consumer ", queue);
}

static json_t *cmd_cancel_consumer(struct consumer *c, const json_t *args)
{
    const char *queue = json_string_value(json_object_get(args, "queue"));
    if (queue && broker_cancel_queue(c->broker, queue) == 0)
        log_info("Stopped consuming from %s", queue);
    /* Stock answers the same whether or not it consumed from it. */
    return queue_reply("no longer consuming from ", queue ? queue : "None");
}

struct control_command {
    const char *name;
    json_t *(*fn)(struct consumer *c, const json_t *args); /* new reference; NULL is a null reply */
};

/* What stock `celery inspect` / `celery control` and Flower send (doc 9.3, 10). */
static const struct control_command control_commands[] = {
    {"active", cmd_active},
    {"active_queues", cmd_active_queues},
    {"add_consumer", cmd_add_consumer},
    {"autoscale", cmd_autoscale},
    {"cancel_consumer", cmd_cancel_consumer},
    {"clock", cmd_clock},
    {"conf", cmd_conf},
    {"disable_events", cmd_disable_events},
    {"enable_events", cmd_enable_events},
    {"heartbeat", cmd_heartbeat},
    {"hello", cmd_hello},
    {"ping", cmd_ping},
    {"pool_grow", cmd_pool_grow},
    {"pool_restart", cmd_pool_restart},
    {"pool_shrink", cmd_pool_shrink},
    {"query_task", cmd_query_task},
    {"rate_limit", cmd_rate_limit},
    {"registered", cmd_registered},
    {"report", cmd_report},
    {"reserved", cmd_reserved},
    {"revoke", cmd_revoke},
    {"revoked", cmd_revoked},
    {"scheduled", cmd_scheduled},
    {"shutdown", cmd_shutdown},
    {"stats", cmd_stats},
    {"time_limit", cmd_time_limit},
};

void remote_on_control(void *arg, const char *channel, const char *data, size_t len)
{
    (void)channel;
    struct consumer *c = arg;
    struct control_request req;
    if (control_decode(data, len, c->cfg->node_name, &req) != 1)
        return;
    if (req.clock > c->clock)
        c->clock = req.clock;
    c->clock++;
    log_debug("pidbox received method %s [reply_to:%s ticket:%s]", req.method, req.reply_key ? req.reply_key : "-",
              req.ticket ? req.ticket : "-");
    json_t *value = NULL;
    const struct control_command *cmd = NULL;
    for (size_t i = 0; i < sizeof control_commands / sizeof *control_commands; i++)
        if (strcmp(control_commands[i].name, req.method) == 0)
            cmd = &control_commands[i];
    if (cmd) {
        value = cmd->fn(c, req.arguments);
    } else {
        struct buf err = {0};
        result_exc_repr(&err, "KeyError", req.method); /* kombu's reply for a method it has no handler for */
        value = json_pack("{s:s}", "error", err.data);
        buf_free(&err);
    }
    /* shutdown never replies (doc 11.10), even when asked to. */
    if (req.reply_key && req.ticket && !(cmd && cmd->fn == cmd_shutdown)) {
        struct buf env = {0};
        control_reply_envelope(&env, c->cfg->node_name, &req, c->clock, value);
        bus_deliver_direct(c->bus, "_kombu.binding.reply.celery.pidbox", req.reply_key, env.data, env.len);
        buf_free(&env);
    }
    json_decref(value);
    control_request_clear(&req);
}

