/*
 * test_cancel.c - sdx4_upscale_params.cancel stops an upscale wherever it
 * is: before it starts, in the middle of a UNet step, in the middle of the
 * VAE decode's attention, and inside each CPU kernel that can run long.
 *
 * The tiny reference model at 128x128 takes seconds per part on two cores
 * (one UNet step, and a decode whose attention spans 16384 tokens), which
 * an uncanceled run measures first; a canceled call must then end within
 * a quarter of the part it stopped (a check at step boundaries alone
 * would take the rest of the step, or the whole decode). To know where a
 * call is, the test wraps two operations of the engine's CPU backend
 * table: the UNet's first convolution (its input has the UNet's
 * in_channels) marks a step, the one-head attention over every latent
 * position the VAE's. Another thread sets the flag some time after such a
 * mark. The kernel checks are exact rather than timed: at the UNet's first
 * convolution the flag is set on the calling thread, and that
 * convolution, then (on the same thread, during the same upscale) a
 * convolution of each path (Winograd, im2col, 1x1), a matrix product, an
 * attention, a group norm and an upsampling must each stop as canceled.
 *
 * Every canceled call must leave the backend's memory as it found it, and
 * a normal call after them must give the very bytes of the first one.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <time.h>

#include "backend/backend.h"
#include "core/error.h"
#include "engine_internal.h"
#include "sdx4.h"
#include "test.h"

#define SIDE 128 /* input pixels a side: the VAE attends over SIDE * SIDE */

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static sdx4_atomic_int stop;

/* ------------------------------------------------------ the wrapped backend */

typedef enum {
    OBSERVE,      /* time the VAE's attention */
    MARK_UNET,    /* tell the canceller when the UNet begins */
    MARK_VAE,     /* tell the canceller when the VAE's attention begins */
    STOP_KERNELS, /* set the flag at the UNet's first convolution; check kernels */
} spy_mode;

static struct {
    backend real; /* the CPU backend's own table */
    spy_mode mode;
    int unet_in_channels;
    double attention_seconds;  /* OBSERVE: the VAE's attention, uncanceled */
    int attention_stopped;     /* MARK_VAE: it returned NULL, as canceled */
    int kernels_checked;       /* STOP_KERNELS: the checks ran */
    /* shared with the canceller thread */
    pthread_mutex_t lock;
    pthread_cond_t changed;
    int marked, call_done;
    double marked_at;
} spy = {.lock = PTHREAD_MUTEX_INITIALIZER, .changed = PTHREAD_COND_INITIALIZER};

static void mark(void) {
    pthread_mutex_lock(&spy.lock);
    if (!spy.marked) spy.marked = 1, spy.marked_at = now();
    pthread_cond_broadcast(&spy.changed);
    pthread_mutex_unlock(&spy.lock);
}

static tensor *zeros(backend *be, int ndim, const int64_t *shape) {
    tensor *t = be->new_tensor(be, ndim, shape);
    float *host = t ? calloc((size_t)tensor_numel(t), sizeof *host) : NULL;
    if (!host || be->upload(be, t, host)) DROP(t);
    free(host);
    return t;
}

/* Runs one operation with the flag set: it must fail as canceled. */
#define EXPECT_STOPPED(what, call)                                                          \
    do {                                                                                    \
        sdx4_error_clear();                                                                      \
        tensor *y_ = (call);                                                                \
        CHECK(!y_ && sdx4_error_status() == SDX4_ERR_CANCELED, "%s ran on with the flag set "    \
              "(%s)", what, y_ ? "it returned a result" : sdx4_last_error());               \
        tensor_free(y_);                                                                    \
    } while (0)

/* Kernels of every shape that takes a path of its own, on this thread
 * while its upscale's flag is set. */
static void check_kernels_stop(backend *be) {
    tensor *wide = zeros(be, 4, (int64_t[]){1, 128, 32, 32});
    tensor *k3 = zeros(be, 4, (int64_t[]){128, 128, 3, 3});
    tensor *k1 = zeros(be, 4, (int64_t[]){64, 128, 1, 1});
    tensor *tokens = zeros(be, 3, (int64_t[]){1, 1024, 128});
    tensor *w = zeros(be, 2, (int64_t[]){128, 128}), *c = zeros(be, 1, (int64_t[]){128});
    CHECK(wide && k3 && k1 && tokens && w && c, "test tensors: %s", sdx4_last_error());
    if (wide && k3 && k1 && tokens && w && c) {
        EXPECT_STOPPED("a Winograd convolution", spy.real.conv2d(be, wide, k3, NULL, 1, 1));
        EXPECT_STOPPED("an im2col convolution", spy.real.conv2d(be, wide, k3, NULL, 2, 1));
        EXPECT_STOPPED("a 1x1 convolution", spy.real.conv2d(be, wide, k1, NULL, 1, 0));
        EXPECT_STOPPED("a linear layer", spy.real.linear(be, tokens, w, NULL));
        EXPECT_STOPPED("an attention", spy.real.attention(be, tokens, tokens, tokens, 8, 0));
        EXPECT_STOPPED("a group norm", spy.real.group_norm(be, wide, 32, c, c, 1e-6f, ACT_SILU));
        EXPECT_STOPPED("an upsampling", spy.real.upsample_nearest(be, wide, 64, 64));
        spy.kernels_checked = 1;
    }
    tensor_free(wide), tensor_free(k3), tensor_free(k1), tensor_free(tokens), tensor_free(w);
    tensor_free(c);
}

static tensor *spy_conv2d(backend *be, const tensor *x, const tensor *w, const tensor *bias,
                          int stride, int padding) {
    if (x->shape[1] != spy.unet_in_channels || spy.mode == OBSERVE || spy.mode == MARK_VAE)
        return spy.real.conv2d(be, x, w, bias, stride, padding);
    if (spy.mode == MARK_UNET) {
        mark();
        return spy.real.conv2d(be, x, w, bias, stride, padding);
    }
    atomic_store(&stop, 1); /* STOP_KERNELS */
    check_kernels_stop(be);
    tensor *y = spy.real.conv2d(be, x, w, bias, stride, padding);
    CHECK(!y, "the UNet's first convolution ran on with the flag set");
    return y;
}

static int is_vae_attention(const tensor *q, int heads) {
    return heads == 1 && q->shape[1] == (int64_t)SIDE * SIDE;
}

static tensor *spy_attention(backend *be, const tensor *q, const tensor *k, const tensor *v,
                             int heads, int causal) {
    if (!is_vae_attention(q, heads) || spy.mode == MARK_UNET || spy.mode == STOP_KERNELS)
        return spy.real.attention(be, q, k, v, heads, causal);
    double t0 = now();
    if (spy.mode == MARK_VAE) mark();
    tensor *y = spy.real.attention(be, q, k, v, heads, causal);
    if (spy.mode == OBSERVE) spy.attention_seconds = now() - t0;
    else spy.attention_stopped = !y && sdx4_error_status() == SDX4_ERR_CANCELED;
    return y;
}

/* ------------------------------------------------------------- the calls */

typedef struct {
    double delay;    /* seconds after the mark */
    double flag_set; /* when the flag was set; 0: never */
} canceller;

static void *cancel_after_mark(void *arg) {
    canceller *c = arg;
    pthread_mutex_lock(&spy.lock);
    while (!spy.marked && !spy.call_done) pthread_cond_wait(&spy.changed, &spy.lock);
    int marked = spy.marked;
    double at = spy.marked_at + c->delay;
    pthread_mutex_unlock(&spy.lock);
    if (!marked) return NULL;
    double wait = at - now();
    if (wait > 0) {
        struct timespec ts = {(time_t)wait, (long)((wait - (double)(time_t)wait) * 1e9)};
        nanosleep(&ts, NULL);
    }
    atomic_store(&stop, 1);
    c->flag_set = now();
    return NULL;
}

typedef struct {
    sdx4_status status;
    double seconds;  /* the whole call */
    double returned; /* when it returned */
    sdx4_upscale_report report;
} call_result;

static sdx4_image input;
static sdx4_upscale_params params;

static call_result upscale(sdx4_engine *e, sdx4_image *out) {
    call_result r;
    double t0 = now();
    r.status = sdx4_upscale(e, &input, &params, out, &r.report);
    r.returned = now();
    r.seconds = r.returned - t0;
    return r;
}

static int64_t memory_in_use(sdx4_engine *e) {
    sdx4_model_info info;
    sdx4_engine_info(e, &info);
    return info.device_memory_bytes;
}

/* One upscale in `mode`, canceled `delay` seconds after its mark; returns
 * the seconds from the flag to the call's return (-1: not canceled). */
static double canceled_upscale(sdx4_engine *e, spy_mode mode, double delay, const char *where,
                               int64_t memory_before) {
    canceller c = {.delay = delay};
    pthread_t thread;
    atomic_store(&stop, 0);
    spy.mode = mode, spy.marked = spy.call_done = 0;
    int started = pthread_create(&thread, NULL, cancel_after_mark, &c) == 0;
    CHECK(started, "cannot start a thread");
    sdx4_image out = {0};
    call_result r = upscale(e, &out);
    pthread_mutex_lock(&spy.lock);
    spy.call_done = 1;
    pthread_cond_broadcast(&spy.changed);
    pthread_mutex_unlock(&spy.lock);
    if (started) pthread_join(thread, NULL);
    CHECK(r.status == SDX4_ERR_CANCELED && !out.pixels, "%s: status %s (%s)", where,
          sdx4_status_name(r.status), sdx4_last_error());
    CHECK(memory_in_use(e) == memory_before, "%s: %lld bytes in use after, %lld before", where,
          (long long)memory_in_use(e), (long long)memory_before);
    sdx4_image_free(&out);
    spy.mode = OBSERVE;
    if (!c.flag_set || r.status != SDX4_ERR_CANCELED) return -1;
    return r.returned - c.flag_set;
}

int main(void) {
    char dir[4096];
    snprintf(dir, sizeof dir, "%s", test_ref("tiny/model"));
    sdx4_engine_options o;
    sdx4_engine_options_default(&o);
    o.model_dir = dir;
    o.device = "cpu";
    sdx4_engine *e = NULL;
    if (sdx4_engine_open(&o, &e) != SDX4_OK) {
        fprintf(stderr, "%s: %s\n", dir, sdx4_last_error());
        return 1;
    }
    backend *be = sdx4_engine_backend(e);
    spy.real = *be;
    spy.unet_in_channels = sdx4_engine_model(e)->unet.in_channels;
    be->conv2d = spy_conv2d;
    be->attention = spy_attention;

    input = (sdx4_image){SIDE, SIDE, malloc(3 * SIDE * SIDE)};
    for (int i = 0; i < 3 * SIDE * SIDE; i++) input.pixels[i] = (uint8_t)(i * 7 % 251);
    sdx4_upscale_params_default(&params);
    params.prompt = "a white cat";
    params.guidance_scale = 1.0f; /* one UNet batch: half the time, the same paths */
    params.num_inference_steps = 1;
    params.seed = 7;
    params.cancel = &stop;

    /* the uncanceled run: what each part takes, and the bytes to match */
    sdx4_image first = {0}, again = {0};
    spy.mode = OBSERVE;
    call_result base = upscale(e, &first);
    CHECK(base.status == SDX4_OK, "uncanceled: %s", sdx4_last_error());
    int64_t memory = memory_in_use(e);
    double step = base.report.seconds_unet, decode = base.report.seconds_vae;
    printf("uncanceled %dx%d: %.2f s (UNet step %.2f s, VAE decode %.2f s, of which its "
           "attention %.2f s)\n", SIDE, SIDE, base.seconds, step, decode, spy.attention_seconds);
    CHECK(spy.attention_seconds > 0, "the VAE's attention was not recognised");

    /* before it starts: nothing runs */
    atomic_store(&stop, 1);
    sdx4_image out = {0};
    call_result before = upscale(e, &out);
    CHECK(before.status == SDX4_ERR_CANCELED, "flag set before: %s",
          sdx4_status_name(before.status));
    CHECK(before.seconds <= step / 4, "flag set before: the call took %.3f s", before.seconds);
    sdx4_image_free(&out);
    printf("flag set before the call: returned after %.3f s\n", before.seconds);

    /* inside the kernels: each stops at once */
    canceled_upscale(e, STOP_KERNELS, 0, "kernels", memory);
    CHECK(spy.kernels_checked, "the UNet's first convolution was not recognised");

    /* a third into the UNet step, and into the VAE's attention */
    double unet = canceled_upscale(e, MARK_UNET, step / 3, "UNet step", memory);
    printf("flag set %.2f s into the UNet step: returned after %.3f s\n", step / 3, unet);
    CHECK(unet >= 0 && unet <= step / 4, "UNet step: %.3f s from the flag to the return (the "
          "step takes %.2f s)", unet, step);
    double vae = canceled_upscale(e, MARK_VAE, spy.attention_seconds / 3, "VAE attention", memory);
    printf("flag set %.2f s into the VAE's attention: returned after %.3f s\n",
           spy.attention_seconds / 3, vae);
    CHECK(vae >= 0 && vae <= decode / 4, "VAE attention: %.3f s from the flag to the return (the "
          "decode takes %.2f s)", vae, decode);
    CHECK(spy.attention_stopped, "the VAE's attention itself did not stop");

    /* nothing left behind: the same bytes as the first run */
    atomic_store(&stop, 0);
    call_result after = upscale(e, &again);
    CHECK(after.status == SDX4_OK, "after the cancels: %s", sdx4_last_error());
    CHECK(first.pixels && again.pixels &&
              !memcmp(first.pixels, again.pixels, (size_t)3 * first.width * first.height),
          "a run after canceled ones differs from the first");

    sdx4_image_free(&first), sdx4_image_free(&again);
    free(input.pixels);
    *be = spy.real;
    sdx4_engine_close(e);
    return test_finish("test_cancel");
}
