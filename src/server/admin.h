/*
 * admin.h - the admin API: what an operator does to a running node
 * without restarting it.
 *
 *   POST   /api/v1/admin/drain       this node takes no new upscales (503
 *                                    "drained"; health answers 503 so that
 *                                    load balancers and readiness probes
 *                                    move traffic away); work already
 *                                    admitted finishes
 *   POST   /api/v1/admin/undrain     takes upscales again
 *   GET    /api/v1/admin/jobs        every owner's jobs this node holds
 *                                    (?state=queued|running|...&limit=N)
 *   GET    /api/v1/admin/jobs/{id}   one of them, whoever owns it
 *   DELETE /api/v1/admin/jobs/{id}   cancels it; it stays, canceled, for
 *                                    its owner to see
 *   GET    /api/v1/admin/usage       requests, images, compute seconds and
 *                                    errors per client and UTC day, from the
 *                                    request history (?since=&until=
 *                                    &client=&limit=)
 *   POST   /api/v1/admin/models/{name}/reload[?dir=FOLDER]
 *                                    a new version of the model, loaded
 *                                    beside the old and swapped in; running
 *                                    work finishes on the old one
 *
 * Every route needs the admin scope (auth.h: an admin key); http.c checks
 * it before calling here. Every action that changes something is logged
 * (event "admin_action", with the admin's identity), so the JSON log is
 * the audit trail. Nothing here knows HTTP: a call gets the request's
 * identity and a way to read its query parameters, and gives a document
 * or a problem.
 */
#ifndef SDX4_SERVER_ADMIN_H
#define SDX4_SERVER_ADMIN_H

#include <stdbool.h>

#include <jansson.h>

#include "problem.h"
#include "server.h"

typedef struct {
    server *srv;
    const char *admin;      /* the caller's identity (auth.h) */
    const char *request_id; /* for the log */
    /* the query parameter `name`'s value, NULL when absent */
    const char *(*arg)(void *ctx, const char *name);
    void *ctx;
} admin_request;

/* Each returns the answer's document (status 200), or NULL with `p` set. */
json_t *admin_drain(const admin_request *a, bool drain, problem *p);
json_t *admin_list_jobs(const admin_request *a, problem *p);
json_t *admin_job(const admin_request *a, const char *id, bool cancel, problem *p);
json_t *admin_usage(const admin_request *a, problem *p);
/* Loads a new version of the model `name` (from ?dir=FOLDER, or its
 * current folder) in a thread of its own, warms it up, then swaps it in:
 * new work gets it, work already running finishes on the old one, which
 * its last batch frees. The answer (202) comes at once; the model list
 * says `reloading` until the swap, and `reload_error` if it failed (the
 * old version then goes on serving). Single-process servers only: in
 * cluster mode the workers load the models (restart them in turn). */
json_t *admin_reload(const admin_request *a, const char *name, problem *p);
/* Waits until no reload runs, or `deadline` (mono_now() clock); false if
 * one still does (it is inside the engine: nothing it uses may be freed). */
bool admin_reloads_finished(server *srv, double deadline);

#endif
