/* revoked: the set of revoked task ids, bounded and expiring as Celery's (protocol doc 7: at most 50,000 ids,
 * each kept 10,800 s; the oldest go first). Pure; main process only. */
#ifndef CELERIAC_REVOKED_H
#define CELERIAC_REVOKED_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>

#define REVOKED_MAX 50000
#define REVOKED_TTL 10800.0

struct revoked;

struct revoked *revoked_new(size_t max, double ttl); /* free with revoked_free */
void revoked_free(struct revoked *r);
/* Adds id (copied) revoked at `when` (epoch seconds); an id already present keeps its first time. Returns
 * true when it was new. */
bool revoked_add(struct revoked *r, const char *id, double when);
/* Whether id (borrowed; NULL is never revoked) is in the set at `now` (expired entries are dropped). */
bool revoked_has(struct revoked *r, const char *id, double now);
/* The ids, oldest first: a new JSON array. */
json_t *revoked_list(struct revoked *r, double now);
/* Celery's hello/mingle shape: {"<id>": [<revoke time>, "<id>"], ...}. New reference. */
json_t *revoked_map(struct revoked *r, double now);

#endif
