/*
 * docs.h - the API's own description: /openapi.json and /docs.
 */
#ifndef SDX4_SERVER_DOCS_H
#define SDX4_SERVER_DOCS_H

#include <stddef.h>

/* Finds Swagger UI's files (`dir`, else the Debian packages' copies);
 * returns the folder used, or NULL when none is installed. */
const char *docs_init(const char *dir);

/* openapi.json, built into the binary. */
const char *docs_openapi(size_t *len);

/* The /docs page (static text). */
const char *docs_page(size_t *len);

/* An asset under /docs/: an open file descriptor and its type, or -1 for
 * a name that is not one of Swagger UI's files. */
int docs_asset(const char *name, const char **content_type, size_t *size);

#endif
