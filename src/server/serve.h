/* serve.h - entry point of `sdx4 serve` (the HTTP service). */
#ifndef SDX4_SERVE_H
#define SDX4_SERVE_H

struct server;
struct served_model;
struct model_version;

/* glibc's malloc set for a long-running server (two arenas, blocks of 1 MiB
 * and more mapped whole) unless MALLOC_ARENA_MAX / MALLOC_MMAP_THRESHOLD_
 * say otherwise; serve and worker call it first. */
void serve_tune_malloc(void);

/* Runs the server with the arguments after "serve"; returns the process
 * exit status. */
int serve_main(int argc, char **argv);

/* The warm-up upscales of a loaded version `v` of model `m` (one step at
 * each of --warmup-sizes, else one at min-side) and the calibration of
 * its time estimator at two of their sizes; for serve, `sdx4 worker` and
 * reloads alike. -1 on failure, the engine's error in sdx4_last_error(). */
int serve_warm_up(struct server *srv, const struct served_model *m, struct model_version *v);

/* Loads every model of srv->models in turn (models_load), then warms
 * each up (with --warmup), moving the phase to warming and each model's
 * state to ready; for serve and `sdx4 worker` alike. -1 when one fails:
 * srv->failure names its folder and why, logged, the phase FAILED. */
int serve_load_models(struct server *srv);

#endif
