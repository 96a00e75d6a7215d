/*
 * problem.h - every error of the API as an RFC 9457 problem document.
 *
 * A problem kind fixes the HTTP status, the type URI and the title; the
 * detail says what was wrong with this request, and `field`/`allowed` name
 * the offending input and its range where there is one. Parsing code fills
 * a `problem` and returns -1; the HTTP layer turns it into an
 * application/problem+json body carrying the request id.
 */
#ifndef SDX4_SERVER_PROBLEM_H
#define SDX4_SERVER_PROBLEM_H

#include <stddef.h>

typedef enum {
    PROBLEM_NONE = 0,
    PROBLEM_MALFORMED,          /* 400 unparsable body, multipart or JSON */
    PROBLEM_UNAUTHORIZED,       /* 401 no API key, or a refused bearer token */
    PROBLEM_FORBIDDEN,          /* 403 wrong API key, CORS origin refused */
    PROBLEM_NOT_FOUND,          /* 404 no such route or job */
    PROBLEM_METHOD,             /* 405 */
    PROBLEM_NOT_ACCEPTABLE,     /* 406 Accept names no format we write */
    PROBLEM_NOT_FINISHED,       /* 409 job result asked before success */
    PROBLEM_TOO_LARGE,          /* 413 body over the upload limit */
    PROBLEM_CONTENT_TYPE,       /* 415 body neither multipart nor JSON */
    PROBLEM_IMAGE_FORMAT,       /* 415 image neither PNG, JPEG nor WebP */
    PROBLEM_INVALID_FIELD,      /* 422 a parameter out of range or mistyped */
    PROBLEM_MISSING_IMAGE,      /* 422 */
    PROBLEM_INVALID_IMAGE,      /* 422 truncated or corrupt image */
    PROBLEM_IMAGE_SIZE,         /* 422 sides outside the allowed range */
    PROBLEM_MODEL_REFUSED,      /* 422 the engine refused the inputs */
    PROBLEM_RATE_LIMITED,       /* 429 */
    PROBLEM_INTERNAL,           /* 500 */
    PROBLEM_UPSCALE_FAILED,     /* 500 the engine reported an error */
    PROBLEM_QUEUE_FULL,         /* 503 */
    PROBLEM_NOT_READY,          /* 503 model loading or warming up */
    PROBLEM_SHUTTING_DOWN,      /* 503 */
    PROBLEM_TIMEOUT,            /* 504 deadline passed; job canceled */
    PROBLEM_CANCELED,           /* 409 job canceled by a client */
    PROBLEM_UPLOADS_BUSY,       /* 503 the upload budget is spent */
    PROBLEM_OVER_TIME_LIMIT,    /* 422 estimated to take longer than the
                                   request timeout even alone */
    PROBLEM_QUEUE_TOO_LONG,     /* 503 the work ahead would make it late */
    PROBLEM_HISTORY_UNAVAILABLE, /* 503 the request history cannot be read now */
    PROBLEM_STORE_UNAVAILABLE,  /* 503 cluster mode: Redis unreachable */
    PROBLEM_STORAGE_FAILED,     /* 502 the result could not be written to
                                   object storage (--s3-bucket) */
    PROBLEM_DRAINED,            /* 503 this node was drained by an administrator */
    PROBLEM_CONFLICT,           /* 409 the resource's state forbids it now */
    PROBLEM_CONTENT_FLAGGED,    /* 422 the content check (--safety-checker)
                                   flagged the output */
    PROBLEM_KIND_COUNT
} problem_kind;

typedef struct {
    problem_kind kind;
    char detail[384];
    char field[48];   /* "" when no single input is at fault */
    char allowed[96]; /* the allowed range or values of `field`, or "" */
    /* admission refusals (queue.c): the request's estimated time and the
     * limit it was held to (0 when not set), and the Retry-After of a 503 */
    double estimated_seconds, limit_seconds;
    int retry_after;
} problem;

/* Sets kind and detail (printf-style); clears field and allowed. Returns -1
 * so that parsers can `return problem_set(...)`. */
int problem_set(problem *p, problem_kind kind, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Same for a bad field: names it and its allowed range. */
int problem_field(problem *p, const char *field, const char *allowed,
                  const char *fmt, ...) __attribute__((format(printf, 4, 5)));

int problem_status(problem_kind kind);
const char *problem_slug(problem_kind kind); /* "queue-full" */

/* The application/problem+json body (malloc'd, NUL-terminated). */
char *problem_body(const problem *p, const char *request_id, size_t *len);
/* Same as a JSON object, for job documents and batch entries. */
struct json_t *problem_object(const problem *p, const char *request_id);

#endif
