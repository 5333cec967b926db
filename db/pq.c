/* pq: loading libpq on first use (see pq.h). */
#include <dlfcn.h>
#include <stdio.h>

#include <libpq-fe.h>

#define DB_PQ_NO_MACROS /* here the names are the library's own, looked up by name */
#include "pq.h"

struct db_pq db_pq_api;

int db_pq_load(char *err, size_t errlen)
{
    if (db_pq_api.PQconnectdbParams)
        return 0;
    /* The soname of Debian's libpq5 (and every libpq since PostgreSQL 8.2). RTLD_GLOBAL: task modules that
     * call libpq themselves find it already there. */
    void *h = dlopen("libpq.so.5", RTLD_NOW | RTLD_GLOBAL);
    if (!h) {
        snprintf(err, errlen, "cannot load libpq (Debian package libpq5): %s", dlerror());
        return -1;
    }
    struct db_pq api;
#define DB_PQ_LOOKUP(f)                                                                                         \
    if (!(*(void **)&api.f = dlsym(h, #f))) {                                                                   \
        snprintf(err, errlen, "libpq.so.5 lacks %s", #f);                                                      \
        return -1;                                                                                              \
    }
    DB_PQ_FUNCS(DB_PQ_LOOKUP)
#undef DB_PQ_LOOKUP
    db_pq_api = api;
    return 0;
}
