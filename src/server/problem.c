/*
 * problem.c - RFC 9457 problem documents (see problem.h).
 *
 * Type URIs are URNs, urn:sdx4:problem:<slug>: stable identifiers that
 * clients switch on, listed with their meaning in openapi.json, and that
 * do not pretend to be web pages. Besides the standard members a problem
 * carries request_id (also in the X-Request-Id header and the logs) and,
 * for a bad input, field and allowed.
 */
#include "problem.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include <jansson.h>

static const struct {
    int status;
    const char *slug, *title;
} kinds[PROBLEM_KIND_COUNT] = {
    [PROBLEM_NONE] = {500, "internal-error", "Internal error"},
    [PROBLEM_MALFORMED] = {400, "malformed-request", "Malformed request"},
    [PROBLEM_UNAUTHORIZED] = {401, "unauthorized", "Authentication required"},
    [PROBLEM_FORBIDDEN] = {403, "forbidden", "Forbidden"},
    [PROBLEM_NOT_FOUND] = {404, "not-found", "Not found"},
    [PROBLEM_METHOD] = {405, "method-not-allowed", "Method not allowed"},
    [PROBLEM_NOT_ACCEPTABLE] = {406, "not-acceptable", "No acceptable output format"},
    [PROBLEM_NOT_FINISHED] = {409, "job-not-finished", "Job has no result"},
    [PROBLEM_TOO_LARGE] = {413, "payload-too-large", "Upload too large"},
    [PROBLEM_CONTENT_TYPE] = {415, "unsupported-content-type", "Unsupported content type"},
    [PROBLEM_IMAGE_FORMAT] = {415, "unsupported-image-format", "Unsupported image format"},
    [PROBLEM_INVALID_FIELD] = {422, "invalid-field", "Invalid parameter"},
    [PROBLEM_MISSING_IMAGE] = {422, "missing-image", "No image in the request"},
    [PROBLEM_INVALID_IMAGE] = {422, "invalid-image", "Image could not be decoded"},
    [PROBLEM_IMAGE_SIZE] = {422, "image-size", "Image size out of range"},
    [PROBLEM_MODEL_REFUSED] = {422, "model-refused", "The model refused the inputs"},
    [PROBLEM_RATE_LIMITED] = {429, "rate-limited", "Too many requests"},
    [PROBLEM_INTERNAL] = {500, "internal-error", "Internal error"},
    [PROBLEM_UPSCALE_FAILED] = {500, "upscale-failed", "Upscale failed"},
    [PROBLEM_QUEUE_FULL] = {503, "queue-full", "Server busy"},
    [PROBLEM_NOT_READY] = {503, "not-ready", "Model not ready"},
    [PROBLEM_SHUTTING_DOWN] = {503, "shutting-down", "Server shutting down"},
    [PROBLEM_TIMEOUT] = {504, "timeout", "Request took too long"},
    [PROBLEM_CANCELED] = {409, "canceled", "Job canceled"},
    [PROBLEM_UPLOADS_BUSY] = {503, "uploads-busy", "Too many uploads in progress"},
    [PROBLEM_OVER_TIME_LIMIT] = {422, "over-time-limit", "Request cannot finish within the time limit"},
    [PROBLEM_QUEUE_TOO_LONG] = {503, "queue-too-long", "Server too busy to finish the request in time"},
    [PROBLEM_HISTORY_UNAVAILABLE] = {503, "history-unavailable", "Request history unavailable"},
    [PROBLEM_STORE_UNAVAILABLE] = {503, "store-unavailable", "Shared state unreachable"},
    [PROBLEM_STORAGE_FAILED] = {502, "storage-failed", "Result could not be stored"},
    [PROBLEM_DRAINED] = {503, "drained", "Node drained"},
    [PROBLEM_CONFLICT] = {409, "conflict", "Conflict"},
    [PROBLEM_CONTENT_FLAGGED] = {422, "content-flagged", "The output was flagged by the content check"},
};

static void set_detail(problem *p, problem_kind kind, const char *fmt, va_list ap) {
    p->kind = kind;
    vsnprintf(p->detail, sizeof p->detail, fmt, ap);
    p->field[0] = p->allowed[0] = '\0';
    p->estimated_seconds = p->limit_seconds = 0;
    p->retry_after = 0;
}

int problem_set(problem *p, problem_kind kind, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    set_detail(p, kind, fmt, ap);
    va_end(ap);
    return -1;
}

int problem_field(problem *p, const char *field, const char *allowed,
                  const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    set_detail(p, PROBLEM_INVALID_FIELD, fmt, ap);
    va_end(ap);
    snprintf(p->field, sizeof p->field, "%s", field);
    snprintf(p->allowed, sizeof p->allowed, "%s", allowed ? allowed : "");
    return -1;
}

static problem_kind valid(problem_kind k) {
    return k > PROBLEM_NONE && k < PROBLEM_KIND_COUNT ? k : PROBLEM_INTERNAL;
}

int problem_status(problem_kind kind) { return kinds[valid(kind)].status; }
const char *problem_slug(problem_kind kind) { return kinds[valid(kind)].slug; }
static const char *problem_title(problem_kind kind) { return kinds[valid(kind)].title; }

json_t *problem_object(const problem *p, const char *request_id) {
    char type[96];
    snprintf(type, sizeof type, "urn:sdx4:problem:%s", problem_slug(p->kind));
    json_t *o = json_object();
    json_object_set_new(o, "type", json_string(type));
    json_object_set_new(o, "title", json_string(problem_title(p->kind)));
    json_object_set_new(o, "status", json_integer(problem_status(p->kind)));
    /* detail may quote client input cut mid-character: keep it valid */
    json_t *detail = json_string(p->detail);
    json_object_set_new(o, "detail", detail ? detail : json_string("(not UTF-8)"));
    if (request_id && *request_id)
        json_object_set_new(o, "request_id", json_string(request_id));
    if (p->field[0]) json_object_set_new(o, "field", json_string(p->field));
    if (p->allowed[0]) json_object_set_new(o, "allowed", json_string(p->allowed));
    if (p->estimated_seconds > 0) {
        json_object_set_new(o, "estimated_seconds", json_real(p->estimated_seconds));
        json_object_set_new(o, "limit_seconds", json_real(p->limit_seconds));
    }
    return o;
}

char *problem_body(const problem *p, const char *request_id, size_t *len) {
    json_t *o = problem_object(p, request_id);
    char *text = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    if (text && len) *len = strlen(text);
    return text;
}
