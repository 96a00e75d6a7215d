/*
 * multipart.h - a streaming reader of multipart/form-data bodies
 * (RFC 7578 on RFC 2046 section 5.1).
 *
 * The body is fed in pieces of any size as they arrive; each part is
 * announced by its name, then its content is handed on piece by piece.
 * Memory is bounded by the part headers' limit, whatever the part sizes.
 * Not thread-safe: one reader per request.
 */
#ifndef SDX4_SERVER_MULTIPART_H
#define SDX4_SERVER_MULTIPART_H

#include <stdbool.h>
#include <stddef.h>

/* Longest boundary accepted (RFC 2046 says 70; longer ones are seen in
 * the wild and cost nothing) and largest header block of one part. */
#define MULTIPART_MAX_BOUNDARY 256
#define MULTIPART_MAX_HEADERS 8192

typedef struct multipart multipart;

/* A part begins: `name` is its Content-Disposition name (NUL-terminated,
 * no NUL inside), `file` whether it has a filename (RFC 7578 4.2: the
 * content of a file). Then its content, in pieces (never empty). A nonzero
 * return stops the reader (multipart_feed returns -1). */
typedef int (*multipart_part_fn)(void *cls, const char *name, bool file);
typedef int (*multipart_data_fn)(void *cls, const char *data, size_t len);

/* A reader for a body of this Content-Type; NULL when the type names no
 * usable boundary (*why says so) or when out of memory (*why NULL). */
multipart *multipart_new(const char *content_type, multipart_part_fn part, multipart_data_fn data,
                         void *cls, const char **why);
void multipart_free(multipart *m);

/* Reads the next piece of the body: 0, or -1 once the body is malformed
 * or a callback stopped it (multipart_error says why; later pieces are
 * then ignored). */
int multipart_feed(multipart *m, const char *data, size_t len);

/* The body has ended: 0 when its closing delimiter was read (anything
 * after it, the epilogue, is ignored as RFC 2046 says), else -1. */
int multipart_end(multipart *m);

/* Why the body was refused ("" when it was not). */
const char *multipart_error(const multipart *m);

#endif
