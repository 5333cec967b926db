/* canvas: see canvas.h. Runs in pool children only. */
#include "canvas.h"

#include <hiredis/hiredis.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>

#include "broker.h"
#include "buf.h"
#include "outgoing.h"
#include "result.h"
#include "task.h"

/* Who sends: the ids a sent task inherits as parent_id and root_id. */
struct sender {
    const char *id;
    const char *root_id;
};

static double epoch_now(void)
{
    struct timeval tv;
    gettimeofday(&tv, NULL);
    return (double)tv.tv_sec + tv.tv_usec / 1e6;
}

static const json_t *option(const json_t *sig, const char *key)
{
    const json_t *v = json_object_get(json_object_get(sig, "options"), key);
    return json_is_null(v) ? NULL : v;
}

static const char *option_str(const json_t *sig, const char *key)
{
    const json_t *v = option(sig, key);
    if (json_is_object(v)) /* queue and exchange may be given as objects with a name */
        v = json_object_get(v, "name");
    return json_string_value(v);
}

static double option_num(const json_t *sig, const char *key)
{
    const json_t *v = option(sig, key);
    return json_is_number(v) ? json_number_value(v) : 0;
}

/* A link / link_error option holds one signature or a list of them; embed wants a list. New reference. */
static json_t *as_list(const json_t *v)
{
    if (json_is_array(v))
        return json_deep_copy(v);
    if (json_is_object(v))
        return json_pack("[O]", v);
    return NULL;
}

static int redis_ok(redisReply *r, char *err, size_t errlen, const char *what)
{
    if (r && r->type != REDIS_REPLY_ERROR)
        return 0;
    snprintf(err, errlen, "%s: %s", what, r ? r->str : "connection lost");
    return -1;
}

/* The messages a step sends, pushed in one pipelined round trip once they are all encoded. */
struct outbox {
    char **keys;      /* owned */
    struct buf *msgs; /* owned */
    size_t n, cap;
};

static void outbox_add(struct outbox *ob, const char *key, struct buf *msg)
{
    if (ob->n == ob->cap) {
        ob->cap = ob->cap ? ob->cap * 2 : 4;
        ob->keys = realloc(ob->keys, ob->cap * sizeof *ob->keys);
        ob->msgs = realloc(ob->msgs, ob->cap * sizeof *ob->msgs);
        if (!ob->keys || !ob->msgs)
            abort();
    }
    ob->keys[ob->n] = strdup(key);
    ob->msgs[ob->n++] = *msg; /* taken over */
    *msg = (struct buf){0};
}

static void outbox_free(struct outbox *ob)
{
    for (size_t i = 0; i < ob->n; i++) {
        free(ob->keys[i]);
        buf_free(&ob->msgs[i]);
    }
    free(ob->keys);
    free(ob->msgs);
    *ob = (struct outbox){0};
}

/* LPUSHes everything in the outbox and empties it. On a lost connection the whole batch is sent once more on
 * a fresh one (a Redis restart between tasks): a message may then go out twice, never not at all. */
static int outbox_flush(const struct canvas_env *env, struct outbox *ob, char *err, size_t errlen)
{
    if (env->publish) { /* AMQP: each envelope carries its routing key and priority; the keys are Redis's */
        int rc = 0;
        for (size_t i = 0; i < ob->n && rc == 0; i++)
            rc = env->publish(env->arg, ob->msgs[i].data, ob->msgs[i].len, err, errlen);
        outbox_free(ob);
        return rc;
    }
    int rc = ob->n ? -1 : 0;
    for (int attempt = 0; attempt < 2 && rc < 0; attempt++) {
        redisContext *c = env->broker(env->arg, err, errlen);
        if (!c)
            break;
        for (size_t i = 0; i < ob->n; i++)
            redisAppendCommand(c, "LPUSH %s %b", ob->keys[i], ob->msgs[i].data, ob->msgs[i].len);
        rc = 0;
        for (size_t i = 0; i < ob->n; i++) {
            redisReply *r = NULL;
            if (redisGetReply(c, (void **)&r) != REDIS_OK)
                r = NULL;
            if (redis_ok(r, err, errlen, "LPUSH") < 0)
                rc = -1;
            if (r)
                freeReplyObject(r);
            if (c->err)
                break;
        }
        if (rc < 0 && !c->err)
            break; /* Redis answered with an error: trying again would not help */
    }
    outbox_free(ob);
    return rc;
}

static const char *route(const struct canvas_env *env, const json_t *sig, const char *task)
{
    const char *q = option_str(sig, "queue");
    if (!q)
        q = option_str(sig, "routing_key");
    if (!q)
        q = task_registry_find(task) ? env->native_queue : env->default_queue;
    return q;
}

/* Sends one plain signature (subtask_type null). prepend: args put before the signature's own (ignored when
 * it is immutable). chain / group: override what the options say, when not NULL. Appends the id to sent. */
static int send_plain(const struct canvas_env *env, struct outbox *ob, const json_t *sig, const json_t *prepend,
                      const struct sender *from, const json_t *chain, const char *group, json_t *sent, char *err,
                      size_t errlen)
{
    const char *task = json_string_value(json_object_get(sig, "task"));
    if (!task) {
        snprintf(err, errlen, "a signature without a task name: cannot send it");
        return -1;
    }
    char fresh[37];
    const char *id = option_str(sig, "task_id");
    if (!id) {
        outgoing_uuid(fresh);
        id = fresh;
    }
    json_t *args = json_array();
    if (prepend && !json_is_true(json_object_get(sig, "immutable")))
        json_array_extend(args, (json_t *)prepend);
    json_t *own = json_object_get(sig, "args");
    if (json_is_array(own))
        json_array_extend(args, own);
    const json_t *kwargs = json_object_get(sig, "kwargs");
    json_t *callbacks = as_list(option(sig, "link")), *errbacks = as_list(option(sig, "link_error"));
    char eta[40], expires[40];
    const char *eta_s = option_str(sig, "eta"), *expires_s = option_str(sig, "expires");
    if (!eta_s && option_num(sig, "countdown") > 0) {
        outgoing_eta(option_num(sig, "countdown"), eta, sizeof eta);
        eta_s = eta;
    }
    if (!expires_s && option_num(sig, "expires") > 0) {
        outgoing_eta(option_num(sig, "expires"), expires, sizeof expires);
        expires_s = expires;
    }
    const json_t *gi = option(sig, "group_index");
    struct outgoing_task t = {
        .task = task,
        .id = id,
        .root_id = from->root_id ? from->root_id : from->id,
        .parent_id = from->id,
        .group = group ? group : option_str(sig, "group_id"),
        .group_index = json_integer_value(gi),
        .has_group_index = json_is_integer(gi),
        .eta = eta_s,
        .expires = expires_s,
        .time_limit = option_num(sig, "time_limit"),
        .soft_time_limit = option_num(sig, "soft_time_limit"),
        .origin = env->origin,
        .reply_to = option_str(sig, "reply_to"),
        .routing_key = route(env, sig, task),
        .priority = (int)option_num(sig, "priority"),
        .ignore_result = json_is_true(option(sig, "ignore_result")),
        .args = args,
        .kwargs = json_is_object(kwargs) ? kwargs : NULL,
        .callbacks = callbacks,
        .errbacks = errbacks,
        .chain = chain ? chain : option(sig, "chain"),
        .chord = option(sig, "chord"),
    };
    struct buf msg = {0};
    int rc = -1;
    if (outgoing_encode(&msg, &t) < 0) {
        snprintf(err, errlen, "cannot encode the message for %s[%s]", task, id);
    } else {
        char key[512];
        broker_priority_key(key, sizeof key, t.routing_key, t.priority);
        outbox_add(ob, key, &msg);
        rc = 0;
    }
    if (rc == 0 && sent)
        json_array_append_new(sent, json_string(id));
    buf_free(&msg);
    json_decref(args);
    json_decref(callbacks);
    json_decref(errbacks);
    return rc;
}

/* Sends a chord: its size to the join first (a part that finished before it is set would never fire the
 * body), then every header task with the group id, its index and the body. gid NULL: a fresh one. prepend:
 * args for each header task (a chain's previous result). */
static int send_chord(const struct canvas_env *env, struct outbox *ob, const json_t *header, const json_t *body,
                      const char *gid, const json_t *prepend, const struct sender *from, char *err, size_t errlen)
{
    size_t n = json_array_size(header);
    if (!n) { /* Celery calls the body at once with an empty list */
        json_t *empty = json_pack("[[]]");
        int rc = send_plain(env, ob, body, empty, from, NULL, NULL, NULL, err, errlen);
        json_decref(empty);
        return rc;
    }
    char fresh[37];
    if (!gid) {
        outgoing_uuid(fresh);
        gid = fresh;
    }
    redisContext *c = env->backend(env->arg, err, errlen);
    if (!c)
        return -1;
    char size[24];
    snprintf(size, sizeof size, "%zu", n);
    redisReply *r = env->result_expires > 0
                        ? redisCommand(c, "SETEX celery-taskset-meta-%s.s %ld %s", gid, env->result_expires, size)
                        : redisCommand(c, "SET celery-taskset-meta-%s.s %s", gid, size);
    int rc = redis_ok(r, err, errlen, "setting the chord size");
    if (r)
        freeReplyObject(r);
    for (size_t i = 0; i < n && rc == 0; i++) {
        json_t *sub = json_deep_copy(json_array_get(header, i));
        json_t *so = json_object_get(sub, "options");
        if (!json_is_object(so)) {
            so = json_object();
            json_object_set_new(sub, "options", so);
        }
        if (!option_str(sub, "task_id")) {
            char id[37];
            outgoing_uuid(id);
            json_object_set_new(so, "task_id", json_string(id));
        }
        json_object_set_new(so, "group_index", json_integer((json_int_t)i));
        json_object_set(so, "chord", (json_t *)body);
        rc = send_plain(env, ob, sub, prepend, from, NULL, gid, NULL, err, errlen);
        json_decref(sub);
    }
    return rc;
}

/* Sends any signature: a plain task, a chain (its first task, carrying the rest), a group (every member
 * with the group's id) or a chord. */
static int send_signature(const struct canvas_env *env, struct outbox *ob, const json_t *sig, const json_t *prepend,
                          const struct sender *from, json_t *sent, char *err, size_t errlen)
{
    const char *type = json_string_value(json_object_get(sig, "subtask_type"));
    if (!type)
        return send_plain(env, ob, sig, prepend, from, NULL, NULL, sent, err, errlen);
    if (strcmp(type, "chord") == 0) {
        const json_t *kw = json_object_get(sig, "kwargs");
        const json_t *header = json_object_get(kw, "header"), *body = json_object_get(kw, "body");
        const json_t *members = json_is_array(header) ? header : json_object_get(json_object_get(header, "kwargs"), "tasks");
        if (!json_is_object(body) || !json_is_array(members)) {
            snprintf(err, errlen, "a chord signature without header tasks or body");
            return -1;
        }
        const char *body_id = option_str(body, "task_id");
        if (body_id && sent)
            json_array_append_new(sent, json_string(body_id));
        return send_chord(env, ob, members, body, json_is_object(header) ? option_str(header, "task_id") : NULL,
                          prepend, from, err, errlen);
    }
    const json_t *tasks = json_object_get(json_object_get(sig, "kwargs"), "tasks");
    if (!json_is_array(tasks)) {
        snprintf(err, errlen, "a %s signature without tasks", type);
        return -1;
    }
    size_t n = json_array_size(tasks);
    if (strcmp(type, "chain") == 0) {
        if (!n)
            return 0;
        json_t *rest = json_array(); /* stored in reverse: the next to run is the last element */
        for (size_t i = n; i-- > 1;)
            json_array_append(rest, json_array_get(tasks, i));
        int rc = send_plain(env, ob, json_array_get(tasks, 0), prepend, from, rest, NULL, sent, err, errlen);
        json_decref(rest);
        return rc;
    }
    if (strcmp(type, "group") == 0) {
        char fresh[37];
        const char *gid = option_str(sig, "task_id");
        if (!gid) {
            outgoing_uuid(fresh);
            gid = fresh;
        }
        for (size_t i = 0; i < n; i++)
            if (send_plain(env, ob, json_array_get(tasks, i), prepend, from, NULL, gid, sent, err, errlen) < 0)
                return -1;
        return 0;
    }
    snprintf(err, errlen, "sending a '%s' signature from a native worker is not supported", type);
    return -1;
}

int canvas_store(const struct canvas_env *env, const char *task_id, const struct buf *doc, char *err, size_t errlen)
{
    redisContext *c = env->backend(env->arg, err, errlen);
    if (!c)
        return -1;
    if (env->result_expires > 0)
        redisAppendCommand(c, "SETEX celery-task-meta-%s %ld %b", task_id, env->result_expires, doc->data, doc->len);
    else
        redisAppendCommand(c, "SET celery-task-meta-%s %b", task_id, doc->data, doc->len);
    redisAppendCommand(c, "PUBLISH celery-task-meta-%s %b", task_id, doc->data, doc->len);
    int rc = 0;
    for (int i = 0; i < 2; i++) {
        redisReply *r = NULL;
        if (redisGetReply(c, (void **)&r) != REDIS_OK)
            r = NULL;
        if (redis_ok(r, err, errlen, "storing a result") < 0)
            rc = -1;
        if (r)
            freeReplyObject(r);
        if (c->err)
            return -1;
    }
    return rc;
}

int canvas_on_success(const struct canvas_env *env, const struct msg_request *req, const json_t *embed,
                      const json_t *retval, json_t *children, char *err, size_t errlen)
{
    struct sender from = {req->id.s, req->root_id.s};
    json_t *prepend = json_pack("[O]", retval ? retval : json_null());
    struct outbox box = {0}, *ob = &box;
    int rc = 0;
    const json_t *callbacks = json_object_get(embed, "callbacks");
    size_t ncb = json_is_array(callbacks) ? json_array_size(callbacks) : 0;
    if (ncb) {
        /* Several callbacks go out as one group, as stock Celery sends them. */
        char gid[37];
        outgoing_uuid(gid);
        for (size_t i = 0; i < ncb && rc == 0; i++) {
            const json_t *cb = json_array_get(callbacks, i);
            if (ncb == 1 || json_string_value(json_object_get(cb, "subtask_type")))
                rc = send_signature(env, ob, cb, prepend, &from, children, err, errlen);
            else
                rc = send_plain(env, ob, cb, prepend, &from, NULL, gid, children, err, errlen);
        }
    }
    const json_t *chain = json_object_get(embed, "chain");
    size_t n = json_is_array(chain) ? json_array_size(chain) : 0;
    if (rc == 0 && n) {
        json_t *rest = json_array();
        for (size_t i = 0; i + 1 < n; i++)
            json_array_append(rest, json_array_get(chain, i));
        const json_t *next = json_array_get(chain, n - 1);
        if (json_string_value(json_object_get(next, "subtask_type"))) {
            /* A group or chain as a link: the rest of the chain cannot ride along on several messages. */
            rc = send_signature(env, ob, next, prepend, &from, children, err, errlen);
        } else {
            rc = send_plain(env, ob, next, prepend, &from, rest, NULL, children, err, errlen);
        }
        json_decref(rest);
    }
    json_decref(prepend);
    if (rc == 0)
        return outbox_flush(env, ob, err, errlen);
    outbox_free(ob);
    return rc;
}

int canvas_on_failure(const struct canvas_env *env, const struct msg_request *req, const json_t *embed,
                      const char *exc_type, const char *message, const char *traceback, char *err, size_t errlen)
{
    int rc = 0;
    const json_t *chain = json_object_get(embed, "chain");
    size_t i;
    const json_t *elem;
    json_array_foreach(chain, i, elem) {
        const char *id = option_str(elem, "task_id");
        if (!id)
            continue;
        struct buf doc = {0};
        struct result_meta meta = {.task_id = id, .group_id = option_str(elem, "group_id")};
        result_doc_exception(&doc, &meta, "FAILURE", exc_type, message, traceback, epoch_now());
        if (canvas_store(env, id, &doc, err, errlen) < 0)
            rc = -1;
        buf_free(&doc);
    }
    const json_t *errbacks = json_object_get(embed, "errbacks");
    size_t neb = json_is_array(errbacks) ? json_array_size(errbacks) : 0;
    if (neb) {
        /* Sent as a group with args [task_id], the form every errback accepts (protocol doc 5.8). */
        struct sender from = {req->id.s, req->root_id.s};
        json_t *prepend = json_pack("[s]", req->id.s);
        struct outbox box = {0}, *ob = &box;
        char gid[37];
        outgoing_uuid(gid);
        json_array_foreach(errbacks, i, elem) {
            if (send_plain(env, ob, elem, prepend, &from, NULL, gid, NULL, err, errlen) < 0)
                rc = -1;
        }
        if (outbox_flush(env, ob, err, errlen) < 0)
            rc = -1;
        json_decref(prepend);
    }
    return rc;
}

/* repr() of the exception a chord entry holds, for ChordError's message: "ValueError('boom 2')". */
static void exc_dict_repr(struct buf *out, const json_t *exc)
{
    const char *type = json_string_value(json_object_get(exc, "exc_type"));
    const json_t *args = json_object_get(exc, "exc_message");
    buf_append_str(out, type ? type : "Exception");
    buf_append_char(out, '(');
    size_t i;
    const json_t *a;
    json_array_foreach(args, i, a) {
        if (i)
            buf_append_str(out, ", ");
        if (json_is_string(a))
            result_repr_str(out, json_string_value(a), json_string_length(a));
        else
            result_pyrepr(out, a, 0);
    }
    buf_append_char(out, ')');
}

static long long reply_int(const redisReply *r)
{
    if (!r)
        return 0;
    if (r->type == REDIS_REPLY_INTEGER)
        return r->integer;
    if (r->type == REDIS_REPLY_STRING)
        return atoll(r->str);
    return 0;
}

/* Fires the body of a completed chord: collected results in header order, or ChordError. */
static int fire_body(const struct canvas_env *env, redisContext *c, const struct msg_request *req,
                     const json_t *body, const char *jkey, const char *tkey, const char *skey, char *err,
                     size_t errlen)
{
    redisReply *r = redisCommand(c, "ZRANGE %s 0 -1", jkey);
    if (redis_ok(r, err, errlen, "ZRANGE") < 0) {
        if (r)
            freeReplyObject(r);
        return -1;
    }
    json_t *values = json_array();
    struct buf failed = {0};
    for (size_t i = 0; r->type == REDIS_REPLY_ARRAY && i < r->elements; i++) {
        json_t *entry = json_loadb(r->element[i]->str, r->element[i]->len, 0, NULL);
        const char *state = json_string_value(json_array_get(entry, 2));
        if (!failed.len && state && (strcmp(state, "FAILURE") == 0 || strcmp(state, "REVOKED") == 0)) {
            buf_printf(&failed, "Dependency %s raised ", json_string_value(json_array_get(entry, 1)));
            exc_dict_repr(&failed, json_array_get(entry, 3));
        }
        json_array_append(values, entry ? json_array_get(entry, 3) : json_null());
        json_decref(entry);
    }
    freeReplyObject(r);
    int rc = 0;
    const char *body_id = option_str(body, "task_id");
    if (failed.len) {
        /* As stock Celery: the body is not sent; it fails with ChordError, its errbacks run, and the join keys
         * are left to expire. */
        if (body_id) {
            struct buf doc = {0}, tb = {0};
            const char *name = json_string_value(json_object_get(body, "task"));
            result_traceback(&tb, name ? name : "?", "ChordError", failed.data);
            struct result_meta meta = {.task_id = body_id};
            result_doc_exception(&doc, &meta, "FAILURE", "ChordError", failed.data, tb.data, epoch_now());
            rc = canvas_store(env, body_id, &doc, err, errlen);
            buf_free(&doc);
            buf_free(&tb);
            json_t *errbacks = as_list(option(body, "link_error"));
            if (errbacks) {
                struct msg_request body_req = {0};
                body_req.id.s = body_id;
                body_req.root_id = req->root_id;
                json_t *embed = json_pack("{s:o}", "errbacks", errbacks);
                if (canvas_on_failure(env, &body_req, embed, "ChordError", failed.data, NULL, err, errlen) < 0)
                    rc = -1;
                json_decref(embed);
            }
        }
    } else {
        struct sender from = {req->id.s, req->root_id.s};
        json_t *prepend = json_pack("[O]", values);
        struct outbox box = {0}, *ob = &box;
        rc = send_signature(env, ob, body, prepend, &from, NULL, err, errlen);
        json_decref(prepend);
        if (rc == 0)
            rc = outbox_flush(env, ob, err, errlen);
        else
            outbox_free(ob);
        if (rc == 0) {
            /* Clean-up nobody waits for: sent now, its reply read at the connection's next use. */
            redisAppendCommand(c, "DEL %s %s %s", jkey, tkey, skey);
            int done = 0;
            while (!done && redisBufferWrite(c, &done) == REDIS_OK)
                ;
            if (done)
                (*env->backend_unread)++;
        }
    }
    buf_free(&failed);
    json_decref(values);
    return rc;
}

int canvas_chord_part(const struct canvas_env *env, const struct msg_request *req, const json_t *embed,
                      const char *state, const json_t *value, char *err, size_t errlen)
{
    const json_t *body = json_object_get(embed, "chord");
    if (!req->group.s || !req->id.s || !json_is_object(body))
        return 0;
    redisContext *c = env->backend(env->arg, err, errlen);
    if (!c)
        return -1;
    char jkey[300], tkey[300], skey[300], score[32];
    snprintf(jkey, sizeof jkey, "celery-taskset-meta-%s.j", req->group.s);
    snprintf(tkey, sizeof tkey, "celery-taskset-meta-%s.t", req->group.s);
    snprintf(skey, sizeof skey, "celery-taskset-meta-%s.s", req->group.s);
    if (req->has_group_index)
        snprintf(score, sizeof score, "%lld", req->group_index);
    else
        snprintf(score, sizeof score, "+inf");
    json_t *entry = json_pack("[i, s, s, O]", 1, req->id.s, state, value ? value : json_null());
    char *member = entry ? json_dumps(entry, JSON_REAL_PRECISION(17) | JSON_ENCODE_ANY) : NULL;
    json_decref(entry);
    if (!member) {
        snprintf(err, errlen, "cannot encode the chord part of %s", req->id.s);
        return -1;
    }
    int n = 0;
    redisAppendCommand(c, "MULTI");
    redisAppendCommand(c, "ZADD %s %s %s", jkey, score, member);
    redisAppendCommand(c, "ZCOUNT %s -inf +inf", jkey);
    redisAppendCommand(c, "GET %s", tkey);
    redisAppendCommand(c, "GET %s", skey);
    n = 5;
    if (env->result_expires > 0) {
        redisAppendCommand(c, "EXPIRE %s %ld", jkey, env->result_expires);
        redisAppendCommand(c, "EXPIRE %s %ld", tkey, env->result_expires);
        redisAppendCommand(c, "EXPIRE %s %ld", skey, env->result_expires);
        n += 3;
    }
    redisAppendCommand(c, "EXEC");
    n++;
    free(member);
    redisReply *exec = NULL;
    int rc = 0;
    for (int i = 0; i < n; i++) {
        redisReply *r = NULL;
        if (redisGetReply(c, (void **)&r) != REDIS_OK) {
            snprintf(err, errlen, "chord join: connection lost");
            return -1;
        }
        if (i == n - 1)
            exec = r;
        else if (r)
            freeReplyObject(r);
    }
    if (redis_ok(exec, err, errlen, "chord join") < 0 || exec->type != REDIS_REPLY_ARRAY || exec->elements < 4) {
        if (exec && exec->type != REDIS_REPLY_ERROR)
            snprintf(err, errlen, "chord join: unexpected reply");
        rc = -1;
    } else if (exec->element[3]->type != REDIS_REPLY_NIL) {
        /* .s is the header size the client set; .t counts parts added later (replace, add_to_chord). */
        long long ready = reply_int(exec->element[1]);
        long long total = reply_int(exec->element[3]) + reply_int(exec->element[2]);
        if (ready == total)
            rc = fire_body(env, c, req, body, jkey, tkey, skey, err, errlen);
    }
    if (exec)
        freeReplyObject(exec);
    return rc;
}

int canvas_retry(const struct canvas_env *env, const struct msg_request *req, const json_t *args,
                 const json_t *kwargs, const json_t *embed, double countdown, char *err, size_t errlen)
{
    char eta[40];
    outgoing_eta(countdown, eta, sizeof eta);
    const char *queue = req->routing_key.s ? req->routing_key.s : env->native_queue;
    struct outgoing_task t = {
        .task = req->task.s,
        .id = req->id.s,
        .root_id = req->root_id.s,
        .parent_id = req->id.s, /* as stock Celery: the retry is the request's child */
        .group = req->group.s,
        .group_index = req->group_index,
        .has_group_index = req->has_group_index,
        .eta = eta,
        .expires = req->expires.s,
        .retries = req->retries + 1,
        .time_limit = req->has_time_limit ? req->time_limit : 0,
        .soft_time_limit = req->has_soft_time_limit ? req->soft_time_limit : 0,
        .origin = env->origin,
        .reply_to = req->reply_to.s,
        .routing_key = queue,
        .priority = req->priority,
        .ignore_result = req->ignore_result,
        .args = args,
        .kwargs = kwargs,
        .callbacks = json_object_get(embed, "callbacks"),
        .errbacks = json_object_get(embed, "errbacks"),
        .chain = json_object_get(embed, "chain"),
        .chord = json_object_get(embed, "chord"),
    };
    struct buf msg = {0};
    struct outbox box = {0};
    if (outgoing_encode(&msg, &t) < 0) {
        snprintf(err, errlen, "cannot encode the retry message");
        buf_free(&msg);
        return -1;
    }
    char key[512];
    broker_priority_key(key, sizeof key, queue, req->priority);
    outbox_add(&box, key, &msg);
    return outbox_flush(env, &box, err, errlen);
}

int canvas_replace(const struct canvas_env *env, const struct msg_request *req, const json_t *embed,
                   const json_t *subtasks, const json_t *continuation, char *err, size_t errlen)
{
    /* The body takes over the request's identity and place in any enclosing workflow (Celery's
     * Task.replace): its id, group and index, chord, chain and callbacks. */
    json_t *body = json_deep_copy(continuation);
    json_t *opts = json_object_get(body, "options");
    if (!json_is_object(opts)) {
        opts = json_object();
        json_object_set_new(body, "options", opts);
    }
    json_object_set_new(opts, "task_id", json_string(req->id.s));
    if (req->group.s)
        json_object_set_new(opts, "group_id", json_string(req->group.s));
    if (req->has_group_index)
        json_object_set_new(opts, "group_index", json_integer(req->group_index));
    static const char *const inherited[][2] = {
        {"chord", "chord"}, {"callbacks", "link"}, {"errbacks", "link_error"}, {"chain", "chain"}};
    for (size_t i = 0; i < sizeof inherited / sizeof inherited[0]; i++) {
        json_t *v = json_object_get(embed, inherited[i][0]);
        if (v && !json_is_null(v))
            json_object_set(opts, inherited[i][1], v);
    }
    if (req->priority)
        json_object_set_new(opts, "priority", json_integer(req->priority));
    struct sender from = {req->id.s, req->root_id.s};
    struct outbox box = {0}, *ob = &box;
    size_t n = json_array_size(subtasks);
    int rc = 0;
    if (!n) {
        json_t *prepend = json_pack("[[]]");
        rc = send_signature(env, ob, body, prepend, &from, NULL, err, errlen);
        json_decref(prepend);
        json_decref(body);
        return rc == 0 ? outbox_flush(env, ob, err, errlen) : (outbox_free(ob), rc);
    }
    json_t *header = json_deep_copy(subtasks);
    size_t i;
    json_t *sub;
    json_array_foreach(header, i, sub) {
        if (req->priority)
            json_object_set_new(json_object_get(sub, "options"), "priority", json_integer(req->priority));
    }
    rc = send_chord(env, ob, header, body, NULL, NULL, &from, err, errlen);
    json_decref(header);
    json_decref(body);
    if (rc == 0)
        return outbox_flush(env, ob, err, errlen);
    outbox_free(ob);
    return rc;
}
