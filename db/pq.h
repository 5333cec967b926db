/* pq: libpq, loaded on first use (dlopen) rather than linked. Linked, libpq and what it needs (OpenSSL, GnuTLS,
 * Kerberos, p11-kit) were mapped and initialised in every worker, ~4 MB of RSS in a worker that never touches
 * a database. Include after <libpq-fe.h> in db/ sources: the PQ* names below then call through db_pq_api. */
#ifndef CELERIAC_DB_PQ_H
#define CELERIAC_DB_PQ_H

#include <libpq-fe.h>
#include <stddef.h>

#define DB_PQ_FUNCS(X)                                                                                          \
    X(PQclear) X(PQstatus) X(PQresultErrorField) X(PQgetvalue) X(PQresultStatus) X(PQexec) X(PQntuples)          \
    X(PQputCopyEnd) X(PQcmdTuples) X(PQtransactionStatus) X(PQputCopyData) X(PQnfields) X(PQgetlength)            \
    X(PQgetisnull) X(PQgetResult) X(PQftype) X(PQfreemem) X(PQfinish) X(PQexecParams) X(PQerrorMessage)           \
    X(PQconninfoParse) X(PQconninfoFree) X(PQconnectdbParams)

struct db_pq {
#define DB_PQ_FIELD(f) __typeof__(f) *f;
    DB_PQ_FUNCS(DB_PQ_FIELD)
#undef DB_PQ_FIELD
};

/* Filled by db_pq_load; all NULL before. Process-wide like the library itself: written once, then read. */
extern struct db_pq db_pq_api;

/* Loads libpq (once). Returns 0, or -1 with one line in err when it cannot be loaded. */
int db_pq_load(char *err, size_t errlen);

#ifndef DB_PQ_NO_MACROS
/* The calls in db/ go through the table. PQclear and PQfinish accept being called before anything was loaded
 * (cleanup paths of a task that failed before connecting): there is nothing to free then. */
#define PQclear(r) (db_pq_api.PQclear ? db_pq_api.PQclear(r) : (void)0)
#define PQfinish(c) (db_pq_api.PQfinish ? db_pq_api.PQfinish(c) : (void)0)
#define PQstatus db_pq_api.PQstatus
#define PQresultErrorField db_pq_api.PQresultErrorField
#define PQgetvalue db_pq_api.PQgetvalue
#define PQresultStatus db_pq_api.PQresultStatus
#define PQexec db_pq_api.PQexec
#define PQntuples db_pq_api.PQntuples
#define PQputCopyEnd db_pq_api.PQputCopyEnd
#define PQcmdTuples db_pq_api.PQcmdTuples
#define PQtransactionStatus db_pq_api.PQtransactionStatus
#define PQputCopyData db_pq_api.PQputCopyData
#define PQnfields db_pq_api.PQnfields
#define PQgetlength db_pq_api.PQgetlength
#define PQgetisnull db_pq_api.PQgetisnull
#define PQgetResult db_pq_api.PQgetResult
#define PQftype db_pq_api.PQftype
#define PQfreemem db_pq_api.PQfreemem
#define PQexecParams db_pq_api.PQexecParams
#define PQerrorMessage db_pq_api.PQerrorMessage
#define PQconninfoParse db_pq_api.PQconninfoParse
#define PQconninfoFree db_pq_api.PQconninfoFree
#define PQconnectdbParams db_pq_api.PQconnectdbParams
#endif

#endif
