/* db: PostgreSQL bulk operations as native tasks, through libpq's COPY.
 *
 * DESIGN
 * - Configuration (database URL, table allow-list) is set once by db_configure in the main process before
 *   the pool forks, and only read afterwards.
 * - A pool child opens its own connection on its first database task and keeps it for the next ones; a
 *   broken one is reopened. A connection never crosses a fork: one opened by another process is forgotten,
 *   neither used nor closed (closing would end the other process's session).
 * - Every task is one transaction: all rows or none. Rows travel as COPY data (binary when every column has a
 *   binary encoder here, else text); values are never spliced into SQL.
 * - No task accepts SQL: tables must be on the allow-list, identifiers are checked, then quoted.
 *
 * Files: names.c (identifiers, allow-list, URL redaction; pure), values.c (JSON <-> PostgreSQL values; pure),
 * conn.c (configuration, the per-process connection, errors), tasks.c (the four tasks).
 * db/ sees only the task contract (task.h), libpq and jansson; never the worker. */
#ifndef CELERIAC_DB_H
#define CELERIAC_DB_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>

#include "task.h"

/* ---- configuration: main process, before the pool forks ---- */

/* dsn: a libpq URI (postgresql://user:pw@host:port/db?...) or keyword string (host=... dbname=...), or NULL
 * to use libpq's defaults (PG* environment variables, as psql does). tables: the comma-separated allow-list
 * ("items, public.events"), NULL or "" for none. Both borrowed (copied). Returns 0, or -1 with one line in
 * err that shows the URL only redacted. Replaces an earlier configuration. */
int db_configure(const char *dsn, const char *tables, char *err, size_t errlen);
/* Frees the configuration and closes this process's connection. */
void db_shutdown(void);

/* ---- the tasks (registered in tasks/registry.c; bound-argument convention of task.h) ---- */

/* native.pg_bulk_insert(table, columns, rows) -> number of rows inserted (COPY). */
enum task_outcome db_task_bulk_insert(struct task_ctx *ctx, json_t *args, json_t *kwargs, json_t **result);
/* native.pg_bulk_upsert(table, columns, rows, key_columns) -> {"inserted": n, "updated": m}. */
enum task_outcome db_task_bulk_upsert(struct task_ctx *ctx, json_t *args, json_t *kwargs, json_t **result);
/* native.pg_bulk_delete(table, key_columns, keys) -> number of rows deleted. */
enum task_outcome db_task_bulk_delete(struct task_ctx *ctx, json_t *args, json_t *kwargs, json_t **result);
/* native.pg_aggregate(table, group_by, column) -> [[group, count, sum, min, max], ...] ordered by group. */
enum task_outcome db_task_aggregate(struct task_ctx *ctx, json_t *args, json_t *kwargs, json_t **result);

/* ---- inside db/, and exposed for the unit tests (tests/unit/test_db.c) ---- */

/* A growable byte buffer; a zeroed one is empty. Allocation failure aborts, as everywhere in celeriac. */
struct db_buf {
    char *data; /* owned; NUL-terminated once anything was appended */
    size_t len;
    size_t cap;
};
void db_buf_append(struct db_buf *b, const void *data, size_t len);
void db_buf_puts(struct db_buf *b, const char *s);
void db_buf_free(struct db_buf *b);

/* names.c */
#define DB_IDENT_MAX 63 /* PostgreSQL's NAMEDATALEN - 1: longer names are silently truncated by the server */

/* A name the tasks accept: 1..63 bytes of ASCII letters, digits, '_', '$' or non-ASCII UTF-8 bytes, not
 * starting with a digit or '$'. Matched as written (quoted), so "Items" is not "items". */
bool db_ident_valid(const char *s, size_t len);
/* Appends s as a quoted identifier ("a""b" for a"b). */
void db_quote_ident(struct db_buf *b, const char *s);

struct db_table {
    char schema[DB_IDENT_MAX + 1]; /* "" when unqualified (resolved through the search_path) */
    char name[DB_IDENT_MAX + 1];
};
/* "name" or "schema.name", each part db_ident_valid. Returns 0, or -1 when s is not such a name. */
int db_table_parse(const char *s, size_t len, struct db_table *out);
/* Appends "schema"."name" (or "name"). */
void db_quote_table(struct db_buf *b, const struct db_table *t);

struct db_allow {
    struct db_table *tables; /* owned */
    size_t n;
};
/* Parses the comma-separated list (spaces around names ignored; empty entries refused). list borrowed;
 * *out overwritten, freed with db_allow_clear even on failure. Returns 0, or -1 with one line in err. */
int db_allow_parse(const char *list, struct db_allow *out, char *err, size_t errlen);
/* Exact match: an entry "events" allows the table named "events" (search_path), "public.events" allows
 * "public.events"; neither allows the other spelling, so the list says exactly what callers may name. */
bool db_allow_has(const struct db_allow *a, const struct db_table *t);
void db_allow_clear(struct db_allow *a);

/* The connection string with its password replaced by "**" (URI user:password@, ?password=, keyword
 * password=...), for logs and errors. Works on malformed strings too, erring towards masking more.
 * dsn borrowed; caller frees with free(). */
char *db_dsn_redact(const char *dsn);

/* values.c: JSON values -> COPY data, and query results -> JSON. */
enum db_kind {
    DB_KIND_BOOL,    /* boolean: true/false */
    DB_KIND_INT2,    /* smallint: an int in range */
    DB_KIND_INT4,    /* integer */
    DB_KIND_INT8,    /* bigint */
    DB_KIND_FLOAT4,  /* real: any number */
    DB_KIND_FLOAT8,  /* double precision: any number */
    DB_KIND_NUMERIC, /* numeric: a number, or a string such as "12.50" (exact) */
    DB_KIND_TEXT,    /* text, varchar, char, name: a string */
    DB_KIND_JSON,    /* json: any JSON value, stored as that value */
    DB_KIND_JSONB,   /* jsonb: likewise */
    DB_KIND_OTHER,   /* anything else (timestamps, dates, uuid, ...): a string in PostgreSQL's input syntax */
};
/* The kind of a PostgreSQL type OID (of the type itself, or of a domain's base type). */
enum db_kind db_kind_of_oid(unsigned oid);
/* Whether values of this kind have a binary COPY encoder here (all kinds but NUMERIC and OTHER). */
bool db_kind_binary(enum db_kind k);
/* PostgreSQL's name for the kind, for messages ("double precision"). */
const char *db_kind_name(enum db_kind k);

/* One value of a row, from jansson (db_value_of_json) or read from the raw text (rows.c). */
enum db_vtype { DBV_NULL, DBV_BOOL, DBV_INT, DBV_REAL, DBV_STR, DBV_LIST, DBV_DICT };
struct db_value {
    enum db_vtype type;
    bool b;
    long long i;
    double d;
    const char *s;      /* STR: the bytes (may hold NULs), LIST/DICT from text: the JSON text; borrowed */
    size_t len;
    const json_t *json; /* the value itself when it came from jansson (borrowed), else NULL */
};
/* Python's type name ("NoneType", "bool", "int", "float", "str", "list", "dict"). */
const char *db_vtype_pyname(enum db_vtype t);
/* v describing j (borrowed; NULL is null). */
void db_value_of_json(const json_t *j, struct db_value *v);
/* The value as a new jansson reference (NULL only when out of memory). */
json_t *db_value_json(const struct db_value *v);

/* rows.c: a JSON list of rows read from its text. */
struct db_raw_rows {
    const char *p, *end;   /* the next row, borrowed text */
    size_t count;          /* how many rows the list holds */
    struct db_buf scratch; /* owned: the unescaped strings of the current row */
};
enum { DB_RAW_NOT_A_LIST = -1, DB_RAW_MALFORMED = -2, DB_RAW_OVERFLOW = -3 };
/* Opens text[0..len) (borrowed), which must be a JSON list, and counts its rows from its structure alone.
 * Returns 0, DB_RAW_NOT_A_LIST or DB_RAW_MALFORMED (the list does not end). The grammar is checked as the rows
 * are read: any other malformation, or a number that jansson would refuse as out of range, is reported by
 * db_raw_rows_next, at the latest by the call after the last row. Close with db_raw_rows_close in every case. */
int db_raw_rows_open(struct db_raw_rows *r, const char *text, size_t len);
/* The same without the count (r->count stays 0): for a caller that counts apart, with db_raw_rows_count (on
 * another thread, say, while the rows are read here: both only read the text). */
int db_raw_rows_start(struct db_raw_rows *r, const char *text, size_t len);
/* The count of db_raw_rows_open alone: the elements of the list text[0..len) (borrowed) into *count. Returns 0,
 * DB_RAW_NOT_A_LIST or DB_RAW_MALFORMED. Pure and reentrant. */
int db_raw_rows_count(const char *text, size_t len, size_t *count);
/* The next row: for a list, its values into vals[0..max) and their number into *n (which may exceed max: the
 * extra ones are skipped), *is_list true; for anything else, the value itself into vals[0], *n = 1, *is_list
 * false. Strings are valid until the next call. Returns 1, 0 at the end (only whitespace after the list), or
 * DB_RAW_MALFORMED/OVERFLOW. Read until it returns 0: only then is the whole text known to be valid. */
int db_raw_rows_next(struct db_raw_rows *r, struct db_value *vals, size_t max, size_t *n, bool *is_list);
void db_raw_rows_close(struct db_raw_rows *r);

/* One COPY's encoder: rows of JSON values -> COPY data in out. JSON null is SQL NULL for every kind. */
struct db_copy {
    size_t ncols;
    const enum db_kind *kinds; /* borrowed, ncols entries */
    const char *const *names;  /* borrowed column names, for messages */
    bool binary;               /* COPY ... (FORMAT binary) rather than text */
    bool bare_scalars;         /* a one-column row may be given as the bare value (keys of pg_bulk_delete) */
    struct db_buf out;         /* owned: encoded bytes not yet sent; the caller drains it (len = 0) */
};
/* Appends the binary header (nothing for text). */
void db_copy_begin(struct db_copy *c);
/* Encodes rows[index] (row borrowed). Returns 0, or -1 with err set to "rows[3][1] (column \"name\",
 * text): expected str, got int" (or a width message); out is then unspecified (abort the COPY). */
int db_copy_row(struct db_copy *c, const json_t *row, size_t index, const char *what, char *err, size_t errlen);
/* The same for a row given as values (n of them; is_list false: a bare value, vals[0]). */
int db_copy_values(struct db_copy *c, const struct db_value *vals, size_t n, bool is_list, size_t index,
                   const char *what, char *err, size_t errlen);
/* Appends the binary trailer (nothing for text). */
void db_copy_end(struct db_copy *c);

/* A JSON value for a result field in PostgreSQL's text output (s borrowed) of type oid: integers and
 * numerics that are whole and fit int64 -> int, other numbers -> float ("NaN"/"Infinity" stay strings: JSON
 * has no such numbers), boolean -> bool, json/jsonb -> the parsed value, the rest -> str. New reference. */
json_t *db_value_from_text(const char *s, size_t len, unsigned oid);

/* Shortest "%.*g" text (15..17 digits) that reads back as exactly d; returns its length (out >= 32 bytes). */
int db_format_double(char *out, double d);

/* conn.c: the configured allow-list, this process's connection, and server errors as task failures.
 * The connection and results are libpq's PGconn / PGresult (struct pg_conn / pg_result). */
struct pg_conn;
struct pg_result;
/* Whether the configured allow-list holds t. */
bool db_table_allowed(const struct db_table *t);
/* The connection and transactions: task_db_begin, task_db_commit, task_db_rollback and task_db_fail, declared
 * in celeriac.h (task modules use them too) and implemented in conn.c. */

/* The Python exception class a psycopg2 / SQLAlchemy user knows for a SQLSTATE ("23505" ->
 * "IntegrityError"), following psycopg2's classes; NULL or unknown -> "DatabaseError". */
const char *db_exc_type_for_sqlstate(const char *sqlstate);

#endif
