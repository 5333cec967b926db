/* revoked: see revoked.h. A JSON object (jansson's hash table) answers lookups; a ring of the same ids in
 * insertion order, which is time order, finds what to drop when the set is full or entries expire. */
#include "revoked.h"

#include <stdlib.h>
#include <string.h>

struct entry {
    char *id; /* owned */
    double when;
};

struct revoked {
    json_t *index;      /* id -> when */
    struct entry *ring; /* oldest at head */
    size_t head, len, max;
    double ttl;
};

struct revoked *revoked_new(size_t max, double ttl)
{
    struct revoked *r = calloc(1, sizeof *r);
    if (!r)
        abort();
    r->index = json_object();
    r->ring = calloc(max, sizeof *r->ring);
    if (!r->index || !r->ring)
        abort();
    r->max = max;
    r->ttl = ttl;
    return r;
}

void revoked_free(struct revoked *r)
{
    if (!r)
        return;
    for (size_t i = 0; i < r->len; i++)
        free(r->ring[(r->head + i) % r->max].id);
    free(r->ring);
    json_decref(r->index);
    free(r);
}

static void drop_oldest(struct revoked *r)
{
    struct entry *e = &r->ring[r->head];
    json_object_del(r->index, e->id);
    free(e->id);
    e->id = NULL;
    r->head = (r->head + 1) % r->max;
    r->len--;
}

static void expire(struct revoked *r, double now)
{
    while (r->len && r->ring[r->head].when + r->ttl < now)
        drop_oldest(r);
}

bool revoked_add(struct revoked *r, const char *id, double when)
{
    if (!id || json_object_get(r->index, id))
        return false;
    if (r->len == r->max)
        drop_oldest(r);
    char *copy = strdup(id);
    if (!copy)
        abort();
    r->ring[(r->head + r->len) % r->max] = (struct entry){copy, when};
    r->len++;
    json_object_set_new(r->index, id, json_real(when));
    return true;
}

bool revoked_has(struct revoked *r, const char *id, double now)
{
    expire(r, now);
    return id && json_object_get(r->index, id) != NULL;
}

json_t *revoked_list(struct revoked *r, double now)
{
    expire(r, now);
    json_t *a = json_array();
    for (size_t i = 0; i < r->len; i++)
        json_array_append_new(a, json_string(r->ring[(r->head + i) % r->max].id));
    return a;
}

json_t *revoked_map(struct revoked *r, double now)
{
    expire(r, now);
    json_t *m = json_object();
    for (size_t i = 0; i < r->len; i++) {
        const struct entry *e = &r->ring[(r->head + i) % r->max];
        json_object_set_new(m, e->id, json_pack("[f, s]", e->when, e->id));
    }
    return m;
}
