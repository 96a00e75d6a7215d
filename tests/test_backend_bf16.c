/*
 * test_backend_bf16.c - the CPU's real bfloat16 path (cpu_onednn.c with
 * bf16 data types), where the CPU has AMX or AVX512-BF16; elsewhere it
 * says "skipped: this CPU has no AVX512-BF16/AMX" and exits 77.
 *
 * Each operation is run twice on the same inputs: on the bf16 path, and on
 * the float32 oneDNN path on operands rounded to bfloat16, which
 * test_backend_onednn holds to a double reference on any CPU. Products of
 * bfloat16 values are exact in float32 and both accumulate in float32, so
 * the two differ only by summation order: relative 1e-4 of the output's
 * largest value bounds that with room (sqrt(K) roundings of 2^-24 for the
 * largest K here, 4608, are 4e-6), while a value rounded the wrong way,
 * or not at all, costs 2^-9 = 2e-3. Weights are kept in bfloat16: half the
 * float32 bytes. The golden models run through the engine with cpu.dtype
 * bf16, which must say "bfloat16" in model-info; test_models_bf16 and
 * test_pipeline_bf16 (ctest) hold the goldens at bfloat16's tolerances.
 */
#include <inttypes.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "core/error.h"
#include "test.h"

#define SUMMATION_ORDER_TOL 1e-4

static uint64_t rng = 0x9E3779B97F4A7C15ull;

static tensor *make(backend *be, int ndim, const int64_t *shape, const float *data) {
    tensor *t = be->new_tensor(be, ndim, shape);
    if (t) be->upload(be, t, data);
    return t;
}

/* max |a - b| over max |b| */
static double rel_diff(const tensor *a, const tensor *b) {
    const float *x = a->data, *y = b->data;
    double err = 0, scale = 1e-30;
    for (int64_t i = 0; i < tensor_numel(b); i++) {
        double d = fabs((double)x[i] - y[i]);
        if (!(d <= err)) err = d;
        if (fabs(y[i]) > scale) scale = fabs(y[i]);
    }
    return err / scale;
}

/* One convolution (k > 0) or linear layer (k == 0) on both backends. */
static void compare(backend *bf, backend *ref, const char *what, int ndim, const int64_t *xshape,
                    int ndim_w, const int64_t *wshape, int stride, int pad, int residual) {
    int64_t nx = 1, nw = 1, O = wshape[0];
    for (int i = 0; i < ndim; i++) nx *= xshape[i];
    for (int i = 0; i < ndim_w; i++) nw *= wshape[i];
    float *x = test_rand_buf(&rng, nx, -1, 1), *w = test_rand_buf(&rng, nw, -0.2f, 0.2f), *b = test_rand_buf(&rng, O, -1, 1);
    tensor *y[2] = {0};
    backend *bes[2] = {bf, ref};
    for (int i = 0; i < 2; i++) {
        backend *be = bes[i];
        tensor *tx = make(be, ndim, xshape, x);
        tensor *tw = be->weight(be, w, DTYPE_F32, ndim_w, wshape);
        tensor *tb = be->weight(be, b, DTYPE_F32, 1, (int64_t[]){O});
        int64_t before;
        be->memory(be, &before, NULL);
        tensor *plain = ndim_w == 4 ? be->conv2d(be, tx, tw, tb, stride, pad) : be->linear(be, tx, tw, tb);
        if (plain && residual) { /* the output again, with the first as residual */
            y[i] = ndim_w == 4 ? be->conv2d_add(be, tx, tw, tb, stride, pad, plain)
                               : be->linear_add(be, tx, tw, tb, plain);
            tensor_free(plain);
        } else {
            y[i] = plain;
        }
        CHECK(y[i] != NULL, "%s: %s", what, sdx4_last_error());
        if (i == 0 && y[i]) { /* bf16 weights: half of float's bytes (blocked layouts pad a little) */
            int64_t after;
            be->memory(be, &after, NULL);
            int64_t weight_bytes = after - (before - nw * 4) - tensor_numel(y[i]) * 4;
            CHECK(weight_bytes <= nw * 2 + 65536, "%s: the weights hold %" PRId64 " bytes, bf16 %" PRId64,
                  what, weight_bytes, nw * 2);
        }
        tensor_free(tx), tensor_free(tw), tensor_free(tb);
    }
    if (y[0] && y[1]) {
        double d = rel_diff(y[0], y[1]);
        printf("  %-44s relative diff %.3g\n", what, d);
        CHECK(d <= SUMMATION_ORDER_TOL, "%s: bf16 path and bf16 operands differ by %g", what, d);
    }
    tensor_free(y[0]), tensor_free(y[1]);
    free(x), free(w), free(b);
}

static void test_engine_info(void) {
    sdx4_engine_options o;
    sdx4_engine_options_default(&o);
    char dir[4096];
    snprintf(dir, sizeof dir, "%s/tiny/model", test_reference_dir());
    o.model_dir = dir;
    o.device = "cpu";
    o.threads = 2;
    o.cpu.dtype = "bf16";
    sdx4_engine *e = NULL;
    sdx4_model_info info;
    CHECK(sdx4_engine_open(&o, &e) == SDX4_OK, "open with cpu.dtype bf16: %s", sdx4_last_error());
    if (e && sdx4_engine_info(e, &info) == SDX4_OK) {
        printf("  model-info: compute_dtype %s, device %s\n", info.compute_dtype, info.device);
        CHECK(!strcmp(info.compute_dtype, "bfloat16"), "compute_dtype %s", info.compute_dtype);
        CHECK(strstr(info.device, "bf16") != NULL, "device %s", info.device);
    }
    sdx4_engine_close(e);
}

int main(void) {
    backend *bf = sdx4_backend_cpu_open(2, CPU_DENSE_ONEDNN_BF16);
    if (!bf) {
        int device = sdx4_error_status() == SDX4_ERR_DEVICE;
#ifdef SDX4_HAVE_ONEDNN
        printf("test_backend_bf16: skipped: this CPU has no AVX512-BF16/AMX (%s)\n", sdx4_last_error());
#else
        printf("test_backend_bf16: skipped: this build has no oneDNN (%s)\n", sdx4_last_error());
#endif
        return device ? 77 : 1;
    }
    backend *ref = sdx4_backend_cpu_open(2, CPU_DENSE_ONEDNN_F32_BF16_OPERANDS);
    CHECK(ref != NULL, "%s", sdx4_last_error());
    if (!ref) return test_finish("test_backend_bf16");
    printf("device: %s\n", bf->description);
    compare(bf, ref, "conv 3x3 320->320 at 2x24x24 (UNet)", 4, (int64_t[]){2, 320, 24, 24}, 4,
            (int64_t[]){320, 320, 3, 3}, 1, 1, 0);
    compare(bf, ref, "conv_add 3x3 512->512 at 1x16x16 + residual", 4, (int64_t[]){1, 512, 16, 16}, 4,
            (int64_t[]){512, 512, 3, 3}, 1, 1, 1);
    compare(bf, ref, "conv 3x3 s2 128->128 at 2x33x33", 4, (int64_t[]){2, 128, 33, 33}, 4,
            (int64_t[]){128, 128, 3, 3}, 2, 1, 0);
    compare(bf, ref, "conv 1x1 640->320 at 2x24x24", 4, (int64_t[]){2, 640, 24, 24}, 4,
            (int64_t[]){320, 640, 1, 1}, 1, 0, 1);
    compare(bf, ref, "conv 3x3 7->256 at 1x40x40 (conv_in)", 4, (int64_t[]){1, 7, 40, 40}, 4,
            (int64_t[]){256, 7, 3, 3}, 1, 1, 0);
    compare(bf, ref, "linear [2,576,512] -> 1536", 3, (int64_t[]){2, 576, 512}, 2,
            (int64_t[]){1536, 512}, 0, 0, 0);
    compare(bf, ref, "linear_add [2,77,1024] -> 1024", 3, (int64_t[]){2, 77, 1024}, 2,
            (int64_t[]){1024, 1024}, 0, 0, 1);
    compare(bf, ref, "linear [1,4608] -> 64", 2, (int64_t[]){1, 4608}, 2, (int64_t[]){64, 4608}, 0, 0, 0);
    int64_t in_use;
    bf->memory(bf, &in_use, NULL);
    CHECK(in_use == 0, "%" PRId64 " bytes leaked by the bf16 backend", in_use);
    bf->destroy(bf);
    ref->destroy(ref);
    test_engine_info();
    return test_finish("test_backend_bf16");
}
