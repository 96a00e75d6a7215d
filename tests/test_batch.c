/*
 * test_batch.c - sdx4_upscale_batch: upscales that share their UNet calls.
 *
 *   - every image of a batch is the one sdx4_upscale gives it alone: three
 *     inputs with their own prompts, negative prompts, noise levels,
 *     guidance scales and seeds, through DDIM, Euler ancestral (it draws
 *     noise from each upscale's own generator at every step) and
 *     DPM-Solver++ (it keeps each one's history); the largest difference
 *     is printed (the batched products may round differently from batch
 *     2's, within a level of 8 bits);
 *   - one upscale stopped by its callback in the middle leaves the batch
 *     as canceled, and the others' images do not change; the same for one
 *     whose flag another thread sets while the batch runs (inside a UNet
 *     call, which stops and runs again for the others);
 *   - refusals: an upscale that cannot share (other steps, sampler, size
 *     or a tile), more than sdx4_batch_capacity, an empty batch.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "sdx4.h"
#include "test.h"
#include "test_engine.h"

#define N 3
#define SIDE 16

static sdx4_image input(int seed) {
    sdx4_image im = {.width = SIDE, .height = SIDE, .pixels = malloc(SIDE * SIDE * 3)};
    for (int i = 0; i < SIDE * SIDE * 3; i++) im.pixels[i] = (unsigned char)((i * 7 + seed * 31) % 251);
    return im;
}

static int stop_at_two(void *user, int step, int total) {
    (void)user, (void)total;
    return step == 2;
}

static int largest_difference(const sdx4_image *a, const sdx4_image *b) {
    if (!a->pixels || !b->pixels || a->width != b->width || a->height != b->height) return 256;
    int worst = 0;
    for (int i = 0; i < a->width * a->height * 3; i++) {
        int d = abs(a->pixels[i] - b->pixels[i]);
        if (d > worst) worst = d;
    }
    return worst;
}

static void set_params(sdx4_upscale_params p[N], const char *scheduler) {
    static const char *const prompts[N] = {"a white cat", "a red house by the sea", ""};
    static const char *const negatives[N] = {NULL, "blurry", "low quality"};
    for (int k = 0; k < N; k++) {
        sdx4_upscale_params_default(&p[k]);
        p[k].prompt = prompts[k], p[k].negative_prompt = negatives[k];
        p[k].num_inference_steps = 4, p[k].scheduler = scheduler;
        p[k].seed = 100 + (uint64_t)k, p[k].guidance_scale = 3.0f + 2.0f * k, p[k].noise_level = 0.05f * (k + 1);
    }
}

static void check_same_as_alone(sdx4_engine *e, const char *scheduler) {
    sdx4_image in[N], alone[N], batched[N];
    sdx4_upscale_params p[N];
    sdx4_upscale_report reports[N];
    sdx4_status statuses[N];
    set_params(p, scheduler);
    for (int k = 0; k < N; k++) {
        in[k] = input(k);
        CHECK(sdx4_upscale(e, &in[k], &p[k], &alone[k], NULL) == SDX4_OK, "%s alone %d: %s", scheduler, k,
              sdx4_last_error());
    }
    CHECK(sdx4_upscale_batch(e, N, in, p, batched, reports, statuses) == SDX4_OK, "%s batch: %s", scheduler,
          sdx4_last_error());
    int worst = 0;
    for (int k = 0; k < N; k++) {
        CHECK(statuses[k] == SDX4_OK && reports[k].batch_size == N, "%s %d: status %d, batch %d", scheduler, k,
              statuses[k], reports[k].batch_size);
        int d = largest_difference(&alone[k], &batched[k]);
        worst = d > worst ? d : worst;
        CHECK(d <= 1, "%s %d: the batched image differs from the one alone by %d levels", scheduler, k, d);
    }
    printf("  %s: %d upscales in one batch, largest difference from alone %d levels of 255\n", scheduler, N, worst);

    /* the second stopped at step 2 of 4: canceled; the others unchanged */
    sdx4_image again[N];
    p[1].progress = stop_at_two;
    CHECK(sdx4_upscale_batch(e, N, in, p, again, NULL, statuses) == SDX4_OK, "%s batch with a stop: %s", scheduler,
          sdx4_last_error());
    CHECK(statuses[1] == SDX4_ERR_CANCELED && !again[1].pixels, "%s: the stopped one: status %d", scheduler,
          statuses[1]);
    for (int k = 0; k < N; k += 2)
        CHECK(statuses[k] == SDX4_OK && largest_difference(&batched[k], &again[k]) <= 1,
              "%s %d: changed by another's stop (status %d)", scheduler, k, statuses[k]);
    for (int k = 0; k < N; k++) {
        sdx4_image_free(&in[k]), sdx4_image_free(&alone[k]), sdx4_image_free(&batched[k]);
        sdx4_image_free(&again[k]);
    }
}

/* A flag set by another thread while the batch runs (most likely inside
 * a UNet call: the watcher stops the call, the others run the step
 * again): that upscale is canceled, the others get their images. */
typedef struct {
    sdx4_atomic_int *flag;
    int after_ms;
} delayed_stop;

static void *stop_later(void *arg) {
    delayed_stop *d = arg;
    struct timespec pause = {0, (long)d->after_ms * 1000000};
    nanosleep(&pause, NULL);
    atomic_store(d->flag, 1);
    return NULL;
}

static void check_flag_during_a_call(sdx4_engine *e) {
    sdx4_image in[N], alone[N], batched[N];
    sdx4_upscale_params p[N];
    sdx4_status statuses[N];
    sdx4_atomic_int flag = 0;
    set_params(p, "euler-a");
    for (int k = 0; k < N; k++) {
        in[k] = input(k);
        p[k].num_inference_steps = 12;
        CHECK(sdx4_upscale(e, &in[k], &p[k], &alone[k], NULL) == SDX4_OK, "alone %d: %s", k, sdx4_last_error());
    }
    p[1].cancel = &flag;
    delayed_stop d = {&flag, 30};
    pthread_t t;
    pthread_create(&t, NULL, stop_later, &d);
    CHECK(sdx4_upscale_batch(e, N, in, p, batched, NULL, statuses) == SDX4_OK, "batch: %s", sdx4_last_error());
    pthread_join(t, NULL);
    CHECK(statuses[1] == SDX4_ERR_CANCELED && !batched[1].pixels, "the stopped one: status %d", statuses[1]);
    for (int k = 0; k < N; k += 2)
        CHECK(statuses[k] == SDX4_OK && largest_difference(&alone[k], &batched[k]) <= 1,
              "%d: changed by another's stop (status %d)", k, statuses[k]);
    for (int k = 0; k < N; k++) sdx4_image_free(&in[k]), sdx4_image_free(&alone[k]), sdx4_image_free(&batched[k]);
}

static void check_refusals(sdx4_engine *e) {
    sdx4_image in[SDX4_MAX_BATCH + 1], out[SDX4_MAX_BATCH + 1];
    sdx4_upscale_params p[SDX4_MAX_BATCH + 1];
    sdx4_status statuses[SDX4_MAX_BATCH + 1];
    for (int k = 0; k <= SDX4_MAX_BATCH; k++) {
        in[k] = input(k);
        sdx4_upscale_params_default(&p[k]);
        p[k].num_inference_steps = 1;
    }
    CHECK(sdx4_batch_capacity(e, SIDE, SIDE, &p[0]) == SDX4_MAX_BATCH, "capacity %d",
          sdx4_batch_capacity(e, SIDE, SIDE, &p[0]));
    CHECK(sdx4_upscale_batch(e, SDX4_MAX_BATCH + 1, in, p, out, NULL, statuses) == SDX4_ERR_INVALID_ARGUMENT,
          "%d upscales accepted", SDX4_MAX_BATCH + 1);
    CHECK(sdx4_upscale_batch(e, 0, in, p, out, NULL, statuses) == SDX4_ERR_INVALID_ARGUMENT, "an empty batch");
    static const char *const what[] = {"steps", "sampler", "size", "tile"};
    for (int c = 0; c < 4; c++) {
        sdx4_upscale_params q = p[1];
        sdx4_image im = in[1], wide = {.width = SIDE + 4, .height = SIDE, .pixels = calloc((SIDE + 4) * SIDE, 3)};
        if (c == 0) q.num_inference_steps = 2;
        if (c == 1) q.scheduler = "euler";
        if (c == 2) im = wide;
        if (c == 3) q.tile = 64, q.tile_overlap = 8;
        sdx4_upscale_params two[2] = {p[0], q};
        sdx4_image ins[2] = {in[0], im};
        CHECK(!sdx4_batchable(e, SIDE, SIDE, &p[0], im.width, im.height, &q), "another %s: batchable", what[c]);
        CHECK(sdx4_upscale_batch(e, 2, ins, two, out, NULL, statuses) == SDX4_ERR_INVALID_ARGUMENT &&
                  statuses[0] == SDX4_ERR_INVALID_ARGUMENT && strstr(sdx4_last_error(), "cannot share"),
              "another %s: %s", what[c], sdx4_last_error());
        sdx4_image_free(&wide);
    }
    /* the same latent: a side rounded down to the scale factor shares */
    CHECK(sdx4_batchable(e, SIDE, SIDE, &p[0], SIDE + 3, SIDE, &p[1]), "19 px rounds down to 16");
    for (int k = 0; k <= SDX4_MAX_BATCH; k++) sdx4_image_free(&in[k]);
}

int main(void) {
    sdx4_engine *e = test_engine_open("tiny/model");
    if (!e) return 1;
    check_same_as_alone(e, "ddim");
    check_same_as_alone(e, "euler-a");
    check_same_as_alone(e, "dpm++2m");
    check_flag_during_a_call(e);
    check_refusals(e);
    sdx4_engine_close(e);
    return test_finish("test_batch");
}
