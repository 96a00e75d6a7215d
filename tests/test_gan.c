/*
 * test_gan.c - the ESRGAN family (model/esrgan.h) against PyTorch, its
 * tiles against its whole runs, its receptive radius, the converter, and
 * bad model folders.
 *
 * Goldens: tests/data/gan/<case>/, made by tools/gan_goldens.py with
 * BasicSR's and Real-ESRGAN's own classes (tests/data/README.md). The
 * real models that scripts/get-default-models.sh converts are checked
 * when they are present (models/ in the checkout, or $SDX4_GAN_MODELS).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/safetensors.h"
#include "engine_internal.h"
#include "model/image_processor.h"
#include "test.h"
#include "tools/convert.h"

#ifndef SDX4_NO_IMAGEIO
#include "imageio.h"

#define DATA SDX4_SOURCE_DIR "/tests/data/gan/"

static const char *const cases[] = {"rrdb_x4",        "rrdb_x4_fp16",       "rrdb_x2",
                                    "srvgg_x4_prelu", "srvgg_x3_leakyrelu", "srvgg_x2_relu"};

/* The engine on dir, quietly: what a refusal test wants. */
static sdx4_status try_open(const char *dir, sdx4_engine **e) {
    sdx4_engine_options o;
    test_engine_options(&o, dir);
    *e = NULL;
    return sdx4_engine_open(&o, e);
}

static sdx4_engine *open_engine(const char *dir) {
    sdx4_engine *e;
    if (try_open(dir, &e) != SDX4_OK) fprintf(stderr, "cannot open %s: %s\n", dir, sdx4_last_error());
    return e;
}

/* The engine on the golden case `name`, or NULL and a failed check. */
static sdx4_engine *open_case(const char *name) {
    char dir[512];
    snprintf(dir, sizeof dir, DATA "%s", name);
    sdx4_engine *e = open_engine(dir);
    CHECK(e, "%s: opens", name);
    return e;
}

static int read_png(const char *path, sdx4_image *img) {
    char err[256];
    if (imageio_read_file(path, img, err, sizeof err) == 0) return 0;
    fprintf(stderr, "%s: %s\n", path, err);
    return -1;
}

/* RGB8 -> float CHW / 255, as the engine and the goldens take it. */
static float *to_chw(const sdx4_image *img) {
    size_t n = (size_t)img->width * img->height;
    float *x = malloc(sizeof *x * 3 * n);
    for (size_t i = 0; i < n; i++)
        for (int c = 0; c < 3; c++) x[c * n + i] = img->pixels[3 * i + c] / 255.0f;
    return x;
}

/* Values of a and b (same size) more than one level apart, and the largest
 * difference. */
static size_t levels_apart(const sdx4_image *a, const sdx4_image *b, int *max) {
    size_t far = 0, n = (size_t)3 * a->width * a->height;
    *max = 0;
    for (size_t i = 0; i < n; i++) {
        int d = abs((int)a->pixels[i] - (int)b->pixels[i]);
        if (d > *max) *max = d;
        far += d > 1;
    }
    return far;
}

/* The whole network's float output for a case's input against PyTorch's
 * (1e-4), and sdx4_upscale's PNG against PyTorch's quantized one. */
static void test_golden(const char *name) {
    char dir[512], path[600];
    snprintf(dir, sizeof dir, DATA "%s", name);
    sdx4_engine *e = open_case(name);
    if (!e) return;
    sdx4_image in = {0}, want = {0}, got = {0};
    st_file golden = {0};
    snprintf(path, sizeof path, "%s/input.png", dir);
    int ok = !read_png(path, &in);
    snprintf(path, sizeof path, "%s/expected.png", dir);
    ok = ok && !read_png(path, &want);
    snprintf(path, sizeof path, "%s/expected.safetensors", dir);
    ok = ok && !sdx4_st_open(&golden, path);
    CHECK(ok, "%s: golden files", name);
    const st_tensor *ref = ok ? sdx4_st_find(&golden, "output") : NULL;
    if (ref) {
        esrgan *g = sdx4_engine_gan(e);
        backend *be = sdx4_engine_backend(e);
        float *x = to_chw(&in);
        tensor *t = be->new_tensor(be, 4, (int64_t[]){1, 3, in.height, in.width}), *y = NULL;
        if (t && !be->upload(be, t, x)) y = sdx4_esrgan_forward(g, be, t);
        CHECK(y && tensor_numel(y) * 4 == (int64_t)ref->nbytes, "%s: forward: %s", name, sdx4_last_error());
        if (y && tensor_numel(y) * 4 == (int64_t)ref->nbytes) {
            float *out = malloc(ref->nbytes);
            be->download(be, y, out);
            double d = max_abs_diff(out, ref->data, ref->nbytes / 4), tol = test_in_half_precision() ? 2e-2 : 1e-4;
            CHECK(d <= tol, "%s: float output within %g of PyTorch: %g", name, tol, d);
            printf("  %-20s max |sdx4 - torch| %.2e\n", name, d);
            free(out);
        }
        tensor_free(t);
        tensor_free(y);
        free(x);
    }
    sdx4_upscale_params p;
    sdx4_upscale_params_default(&p);
    p.prompt = "ignored by a GAN";
    sdx4_upscale_report rep;
    sdx4_status s = ok ? sdx4_upscale(e, &in, &p, &got, &rep) : SDX4_ERR_INVALID_ARGUMENT;
    CHECK(s == SDX4_OK, "%s: upscale: %s", name, sdx4_last_error());
    if (s == SDX4_OK) {
        CHECK(got.width == want.width && got.height == want.height, "%s: size %dx%d", name, got.width, got.height);
        int max;
        size_t n = (size_t)3 * want.width * want.height;
        size_t far = got.width == want.width && got.height == want.height ? levels_apart(&got, &want, &max) : n;
        CHECK(test_in_half_precision() ? far * 100 <= n : far == 0, "%s: PNG within 1 level of PyTorch's: %zu values further",
              name, far);
        CHECK(rep.gan_tiles == 1 && rep.batch_size == 1, "%s: report: %d tiles", name, rep.gan_tiles);
    }
    sdx4_image_free(&in), sdx4_image_free(&want), sdx4_image_free(&got);
    sdx4_st_close(&golden);
    sdx4_engine_close(e);
}

/* sdx4_esrgan_run on an image of w x h, tile and budget as given. */
static float *run(const esrgan *g, backend *be, const float *x, int h, int w, int tile, int64_t budget,
                  int *tiles) {
    float *out = NULL;
    if (sdx4_esrgan_run(g, be, x, h, w, tile, budget, NULL, NULL, &out, tiles)) {
        fprintf(stderr, "run: %s\n", sdx4_last_error());
        return NULL;
    }
    return out;
}

/* Tiles smaller than the padding, of sizes that do not divide the image,
 * and the automatic tiles of a budget too small for a whole run all give
 * the whole run's numbers, and its PNG but for a value on a rounding tie;
 * and PyTorch's whole run's PNG.
 * The numbers agree to float rounding, not bit for bit: OpenBLAS's sgemm
 * sums a product's terms in an order that depends on the matrices' sizes
 * (its small-matrix and edge kernels), and a tile's convolutions have
 * other sizes than the whole image's. */
static void test_tiles(const char *name) {
    char dir[512], path[600];
    snprintf(dir, sizeof dir, DATA "%s", name);
    sdx4_engine *e = open_case(name);
    if (!e) return;
    esrgan *g = sdx4_engine_gan(e);
    backend *be = sdx4_engine_backend(e);
    sdx4_image in = {0}, want = {0};
    snprintf(path, sizeof path, "%s/tile_input.png", dir);
    int ok = !read_png(path, &in);
    snprintf(path, sizeof path, "%s/tile_expected.png", dir);
    ok = ok && !read_png(path, &want);
    CHECK(ok, "%s: tile goldens", name);
    if (!ok) goto done;
    int h = in.height, w = in.width, s = g->cfg.scale, tiles;
    size_t n = (size_t)3 * h * s * w * s;
    float *x = to_chw(&in), *whole = run(g, be, x, h, w, 0, INT64_MAX, &tiles);
    CHECK(whole && tiles == 1, "%s: whole run", name);
    const struct { int tile; int64_t budget; } runs[] = {{8, INT64_MAX}, {12, INT64_MAX}, {20, INT64_MAX},
                                                        {0, 64 << 10}};
    sdx4_image ref = {w * s, h * s, malloc(n)}, got = {w * s, h * s, malloc(n)};
    if (whole) sdx4_image_quantize(whole, h * s, w * s, ref.pixels);
    for (size_t i = 0; whole && i < sizeof runs / sizeof runs[0]; i++) {
        float *t = run(g, be, x, h, w, runs[i].tile, runs[i].budget, &tiles);
        CHECK(t && tiles > 1, "%s: tile %d budget %lld: %d tiles", name, runs[i].tile, (long long)runs[i].budget,
              tiles);
        if (!t) continue;
        double d = max_abs_diff(t, whole, n);
        CHECK(d <= (test_in_half_precision() ? 2e-2 : 2e-6), "%s: tile %d: the whole run's numbers (max diff %g)", name,
              runs[i].tile, d);
        sdx4_image_quantize(t, h * s, w * s, got.pixels);
        int max;
        size_t far = levels_apart(&got, &ref, &max), moved = 0;
        for (size_t k = 0; k < n; k++) moved += got.pixels[k] != ref.pixels[k];
        printf("  %-20s tile %2d: %zu of %zu PNG values differ from the whole run's by one level\n", name,
               runs[i].tile, moved, n);
        CHECK(far == 0 && moved * (test_in_half_precision() ? 100 : 1000) <= n, "%s: tile %d: the whole run's PNG to a "
              "level on 99.9%% (99%% in half precision; %zu values "
              "moved, max %d)", name, runs[i].tile, moved, max);
        free(t);
    }
    if (whole) {
        int max;
        size_t far = levels_apart(&ref, &want, &max);
        CHECK(test_in_half_precision() ? far * 100 <= n : far == 0,
              "%s: whole run within 1 level of PyTorch: %zu values further (max %d)", name, far, max);
    }
    sdx4_image_free(&ref), sdx4_image_free(&got);
    free(x);
    free(whole);
done:
    sdx4_image_free(&in), sdx4_image_free(&want);
    sdx4_engine_close(e);
}

/* The receptive radius, measured: one input pixel changed changes output
 * pixels of input rows and columns at most sdx4_esrgan_radius() away. In
 * SRVGGNetCompact some change exactly that far (a smaller pad would not
 * do); RRDBNet's farthest paths pass through a residual scaling of 0.2
 * per dense block and the corner weights of every convolution, which
 * float32 cannot resolve beyond about 25 pixels (its radius, 15 per block,
 * is counted in esrgan.c; `tight` says which to expect). */
static void test_radius(const char *name, int tight) {
    sdx4_engine *e = open_case(name);
    if (!e) return;
    esrgan *g = sdx4_engine_gan(e);
    backend *be = sdx4_engine_backend(e);
    int R = sdx4_esrgan_radius(&g->cfg), side = 2 * R + 9, s = g->cfg.scale, c = R + 4, tiles;
    size_t px = (size_t)side * side;
    float *x = malloc(sizeof *x * 3 * px);
    for (size_t i = 0; i < 3 * px; i++) x[i] = (float)((i * 7919) % 255) / 255.0f;
    float *a = run(g, be, x, side, side, 0, INT64_MAX, &tiles);
    for (int ch = 0; ch < 3; ch++) x[ch * px + (size_t)c * side + c] = 1.0f - x[ch * px + (size_t)c * side + c];
    float *b = run(g, be, x, side, side, 0, INT64_MAX, &tiles);
    int reach = -1;
    for (int ch = 0; a && b && ch < 3; ch++)
        for (int y = 0; y < side * s; y++)
            for (int xx = 0; xx < side * s; xx++) {
                size_t i = ((size_t)ch * side * s + y) * side * s + xx;
                int d = abs(y / s - c) > abs(xx / s - c) ? abs(y / s - c) : abs(xx / s - c);
                if (a[i] != b[i] && d > reach) reach = d;
            }
    printf("  %-20s radius %d, measured reach %d\n", name, R, reach);
    CHECK(tight ? reach == R : reach > 0 && reach <= R, "%s: one input pixel reaches %d pixels, the radius is %d",
          name, reach, R);
    free(x), free(a), free(b);
    sdx4_engine_close(e);
}

/* ------------------------------------------------------------ converter */

static char tmp_root[] = "/tmp/sdx4-test-gan-XXXXXX";

/* The golden model's tensors under new names (rename(name) -> buffer, or
 * NULL to drop a tensor), plus `extra` when non-NULL, into path. */
typedef const char *(*rename_fn)(const char *name, char *buf, size_t size);

static int fill_from(void *user, int i, void *buf, size_t nbytes) {
    const st_tensor *const *src = user;
    memcpy(buf, src[i]->data, nbytes);
    return 0;
}

static int write_renamed(const char *model, const char *path, rename_fn rename_to, int copies, const char *extra) {
    st_file f;
    if (sdx4_st_open(&f, model)) return -1;
    int n = 0;
    st_entry *e = calloc((size_t)f.count * copies + 1, sizeof *e);
    const st_tensor **src = calloc((size_t)f.count * copies + 1, sizeof *src);
    char (*names)[256] = calloc((size_t)f.count * copies + 1, sizeof *names);
    if (extra) { /* a copy of the first tensor under another name */
        e[n] = (st_entry){.name = extra, .type = f.tensors[0].type, .ndim = f.tensors[0].ndim};
        memcpy(e[n].shape, f.tensors[0].shape, sizeof e[n].shape);
        src[n++] = &f.tensors[0];
    }
    for (int k = 0; k < copies; k++)
        for (int i = 0; i < f.count; i++) {
            const char *to = rename_to(f.tensors[i].name, names[n], sizeof names[n]);
            if (!to) continue;
            if (k) { /* a training wrapper's second copy: "params." */
                char tmp[256];
                snprintf(tmp, sizeof tmp, "params.%s", strchr(to, '.') + 1);
                snprintf(names[n], sizeof names[n], "%s", tmp);
                to = names[n];
            }
            e[n] = (st_entry){.name = to, .type = f.tensors[i].type, .ndim = f.tensors[i].ndim};
            memcpy(e[n].shape, f.tensors[i].shape, sizeof e[n].shape);
            src[n++] = &f.tensors[i];
        }
    int rc = sdx4_st_write(path, e, n, NULL, fill_from, src);
    free(e), free(src), free(names);
    sdx4_st_close(&f);
    return rc;
}

static const char *as_ema(const char *name, char *buf, size_t size) {
    snprintf(buf, size, "params_ema.%s", name);
    return buf;
}

/* BasicSR's names back to the original ESRGAN's. */
static const char *as_legacy(const char *name, char *buf, size_t size) {
    static const struct { const char *from, *to; } layers[] = {
        {"conv_first.", "model.0."}, {"conv_body.", "model.1.sub.2."}, {"conv_up1.", "model.3."},
        {"conv_up2.", "model.6."},  {"conv_hr.", "model.8."},         {"conv_last.", "model.10."}};
    int b, r, c, n = 0;
    char param[16];
    if (sscanf(name, "body.%d.rdb%d.conv%d.%15s%n", &b, &r, &c, param, &n) == 4)
        snprintf(buf, size, "model.1.sub.%d.RDB%d.conv%d.0.%s", b, r, c, param);
    for (size_t i = 0; i < sizeof layers / sizeof layers[0]; i++)
        if (!strncmp(name, layers[i].from, strlen(layers[i].from)))
            snprintf(buf, size, "%s%s", layers[i].to, name + strlen(layers[i].from));
    return buf;
}

static const char *without_conv_hr_bias(const char *name, char *buf, size_t size) {
    snprintf(buf, size, "%s", name);
    return strcmp(name, "conv_hr.bias") ? buf : NULL;
}

static const char *as_is(const char *name, char *buf, size_t size) {
    snprintf(buf, size, "%s", name);
    return buf;
}

/* Whether two safetensors files hold the same tensors, bytes and all. */
static int same_tensors(const char *a, const char *b) {
    st_file fa, fb;
    if (sdx4_st_open(&fa, a)) return 0;
    if (sdx4_st_open(&fb, b)) return sdx4_st_close(&fa), 0;
    int same = fa.count == fb.count;
    for (int i = 0; same && i < fa.count; i++) {
        const st_tensor *t = sdx4_st_find(&fb, fa.tensors[i].name);
        same = t && t->type == fa.tensors[i].type && t->nbytes == fa.tensors[i].nbytes &&
               !memcmp(t->data, fa.tensors[i].data, t->nbytes);
    }
    sdx4_st_close(&fa), sdx4_st_close(&fb);
    return same;
}

static void test_convert(void) {
    char in[600], out[600];
    const char *args[1] = {in};
    struct { rename_fn fn; int copies; const char *what; } ok[] = {
        {as_ema, 1, "params_ema prefix"}, {as_ema, 2, "params_ema and params copies"},
        {as_legacy, 1, "the original ESRGAN's names"}};
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++) {
        snprintf(in, sizeof in, "%s/in%zu.safetensors", tmp_root, i);
        snprintf(out, sizeof out, "%s/out%zu/deeper", tmp_root, i);
        CHECK(!write_renamed(DATA "rrdb_x4/model.safetensors", in, ok[i].fn, ok[i].copies, NULL), "write %s", in);
        sdx4_status s = sdx4_convert(1, args, out);
        CHECK(s == SDX4_OK, "convert with %s: %s", ok[i].what, sdx4_last_error());
        char model[700];
        snprintf(model, sizeof model, "%s/model.safetensors", out);
        CHECK(s == SDX4_OK && same_tensors(model, DATA "rrdb_x4/model.safetensors"), "%s: the golden's tensors",
              ok[i].what);
        sdx4_engine *e = s == SDX4_OK ? open_engine(out) : NULL;
        sdx4_model_info info;
        CHECK(e && !sdx4_engine_info(e, &info) && !strcmp(info.kind, "gan") &&
                  !strcmp(info.architecture, "RRDBNet") && info.vae_scale_factor == 4,
              "%s: the converted folder opens as RRDBNet x4", ok[i].what);
        sdx4_engine_close(e);
    }
    /* SRVGGNetCompact with PReLU converts; without, its activation is unknown */
    snprintf(out, sizeof out, "%s/srvgg", tmp_root);
    args[0] = DATA "srvgg_x4_prelu/model.safetensors";
    CHECK(sdx4_convert(1, args, out) == SDX4_OK, "srvgg prelu converts: %s", sdx4_last_error());
    args[0] = DATA "srvgg_x2_relu/model.safetensors";
    CHECK(sdx4_convert(1, args, out) == SDX4_ERR_MODEL && strstr(sdx4_last_error(), "act_type"),
          "srvgg relu: %s", sdx4_last_error());

    struct { rename_fn fn; const char *extra, *needle; } bad[] = {
        {without_conv_hr_bias, NULL, "conv_hr.bias is missing"},
        {as_is, "conv_up3.weight", "conv_up3: RRDBNet at scale 8"},
        {as_is, "body.0.rdb1.conv6.weight", "body.0.rdb1.conv6.weight is not part of the architecture"}};
    args[0] = in;
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        snprintf(in, sizeof in, "%s/bad%zu.safetensors", tmp_root, i);
        snprintf(out, sizeof out, "%s/bad%zu", tmp_root, i);
        write_renamed(DATA "rrdb_x4/model.safetensors", in, bad[i].fn, 1, bad[i].extra);
        CHECK(sdx4_convert(1, args, out) == SDX4_ERR_MODEL && strstr(sdx4_last_error(), bad[i].needle),
              "bad state dict %zu: %s", i, sdx4_last_error());
        struct stat st;
        CHECK(stat(out, &st) != 0 || access(strcat(out, "/model.safetensors"), F_OK) != 0,
              "bad state dict %zu: nothing written", i);
    }
    snprintf(in, sizeof in, "%s/RealESRGAN_x4plus.pth", tmp_root);
    CHECK(sdx4_convert(1, args, out) == SDX4_ERR_INVALID_ARGUMENT && strstr(sdx4_last_error(), "pickle") &&
              strstr(sdx4_last_error(), "save_file"),
          ".pth refused with the way out: %s", sdx4_last_error());
}

/* Config values the engine does not run are refused by name. */
static void test_bad_configs(void) {
    const struct { const char *json, *needle; } bad[] = {
        {"{\"architecture\": \"SwinIR\"}", "architecture=SwinIR"},
        {"{\"scale\": 4}", "no architecture"},
        {"{\"architecture\": \"RRDBNet\", \"scale\": 3}", "scale=3"},
        {"{\"architecture\": \"RRDBNet\", \"scale\": 8}", "scale=8"},
        {"{\"architecture\": \"RRDBNet\", \"num_in_ch\": 4}", "num_in_ch=4"},
        {"{\"architecture\": \"SRVGGNetCompact\", \"act_type\": \"gelu\"}", "act_type=gelu"},
        {"{\"architecture\": \"SRVGGNetCompact\", \"num_feat\": \"wide\"}", "num_feat"},
        {"[1, 2]", "config.json"},
    };
    char dir[600], path[700];
    snprintf(dir, sizeof dir, "%s/badcfg", tmp_root);
    mkdir(dir, 0755);
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    symlink(DATA "rrdb_x4/model.safetensors", path);
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        snprintf(path, sizeof path, "%s/config.json", dir);
        FILE *f = fopen(path, "w");
        fputs(bad[i].json, f);
        fclose(f);
        sdx4_engine *e;
        sdx4_status s = try_open(dir, &e);
        CHECK(s != SDX4_OK && !e && strstr(sdx4_last_error(), bad[i].needle), "config %s: %s", bad[i].json,
              sdx4_last_error());
        sdx4_engine_close(e);
    }
    /* the right architecture, the wrong sizes: named by tensor and shape */
    snprintf(path, sizeof path, "%s/config.json", dir);
    FILE *f = fopen(path, "w");
    fputs("{\"architecture\": \"RRDBNet\", \"num_feat\": 8, \"num_block\": 3, \"num_grow_ch\": 4}", f);
    fclose(f);
    sdx4_engine *e;
    CHECK(try_open(dir, &e) != SDX4_OK && strstr(sdx4_last_error(), "tensor body.2.rdb1.conv1."), "3 blocks of 2: %s",
          sdx4_last_error());
    sdx4_engine_close(e);
}

/* "outscale": the x4 network's output resized to 2x with Pillow's bicubic,
 * as realesr-animevideov3-x2 is; above the network's scale, refused. */
static void test_outscale(void) {
    char dir[600], path[700];
    snprintf(dir, sizeof dir, "%s/outscale", tmp_root);
    mkdir(dir, 0755);
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    symlink(DATA "srvgg_x4_prelu/model.safetensors", path);
    const char *cfg = "{\"architecture\": \"SRVGGNetCompact\", \"upscale\": 4, \"num_feat\": 8, \"num_conv\": 3, "
                      "\"outscale\": %d}";
    snprintf(path, sizeof path, "%s/config.json", dir);
    FILE *f = fopen(path, "w");
    fprintf(f, cfg, 5);
    fclose(f);
    sdx4_engine *e;
    CHECK(try_open(dir, &e) == SDX4_ERR_MODEL && strstr(sdx4_last_error(), "outscale=5 is outside 1..4"),
          "outscale 5 of 4: %s", sdx4_last_error());
    f = fopen(path, "w");
    fprintf(f, cfg, 2);
    fclose(f);
    e = open_engine(dir);
    sdx4_image in = {0}, full = {0}, want = {0}, got = {0};
    sdx4_model_info info;
    CHECK(e && !sdx4_engine_info(e, &info) && info.vae_scale_factor == 2, "outscale 2: the model's scale");
    if (e && !read_png(DATA "srvgg_x4_prelu/input.png", &in) && !read_png(DATA "srvgg_x4_prelu/expected.png", &full) &&
        !sdx4_image_resize_bicubic(&full, in.width * 2, in.height * 2, &want)) {
        sdx4_upscale_params p;
        sdx4_upscale_params_default(&p);
        sdx4_status s = sdx4_upscale(e, &in, &p, &got, NULL);
        CHECK(s == SDX4_OK && got.width == 2 * in.width && got.height == 2 * in.height, "outscale 2: %dx%d: %s",
              got.width, got.height, sdx4_last_error());
        int max;
        if (s == SDX4_OK) CHECK(levels_apart(&got, &want, &max) == 0, "outscale 2: PyTorch's x4 output resized");
    }
    sdx4_image_free(&in), sdx4_image_free(&full), sdx4_image_free(&want), sdx4_image_free(&got);
    sdx4_engine_close(e);
}

/* Inputs the engine refuses, and what a GAN ignores. */
static void test_inputs(void) {
    sdx4_engine *e = open_engine(DATA "rrdb_x2");
    if (!e) {
        CHECK(0, "rrdb_x2 opens");
        return;
    }
    uint8_t px[3 * 5 * 5];
    memset(px, 128, sizeof px);
    sdx4_image in = {1, 5, px}, out = {0};
    sdx4_upscale_params p;
    sdx4_upscale_params_default(&p);
    sdx4_upscale_report rep;
    memset(&rep, 0xab, sizeof rep); /* a caller's stack */
    CHECK(sdx4_upscale(e, &in, &p, &out, &rep) == SDX4_ERR_INVALID_ARGUMENT &&
              strstr(sdx4_last_error(), "at least 2"),
          "1 px wide into a scale-2 RRDBNet: %s", sdx4_last_error());
    /* a failure's report, which the server stores with the job: nothing measured */
    CHECK(rep.seconds_unet == 0 && rep.noise_level == 0 && rep.prompt_tokens == 0 && rep.gan_tiles == 0 &&
              rep.batch_size == 1,
          "a failed upscale's report: %g s, noise level %d, %d tiles", rep.seconds_unet, rep.noise_level,
          rep.gan_tiles);
    /* odd sides are padded by reflection and cropped back, as BasicSR */
    in = (sdx4_image){5, 3, px};
    p.num_inference_steps = 3, p.prompt = "anything", p.noise_level = 0.9f;
    CHECK(sdx4_upscale(e, &in, &p, &out, NULL) == SDX4_OK && out.width == 10 && out.height == 6, "5x3 -> %dx%d: %s",
          out.width, out.height, sdx4_last_error());
    sdx4_image_free(&out);
    int tokens = -1;
    CHECK(sdx4_count_tokens(e, "a prompt", &tokens) == SDX4_OK && tokens == 0, "no text encoder: %d tokens", tokens);
    CHECK(sdx4_batch_capacity(e, 16, 16, &p) == 1, "a GAN does not batch");
    sdx4_flop_counts fl;
    CHECK(sdx4_count_flops(e, 16, 16, &fl) == SDX4_OK && fl.decode.dense > 0 && fl.step.dense == 0,
          "flops: the forward as decode");
    sdx4_engine_close(e);
}

/* Models converted by scripts/get-default-models.sh from ncnn, when they
 * are present: PyTorch's output on their weights (tools/gan_real_goldens.py,
 * spandrel loading the converted model.safetensors) within a level on
 * 99.9% of the values. */
static void test_real_models(void) {
    const char *root = getenv("SDX4_GAN_MODELS") ? getenv("SDX4_GAN_MODELS") : SDX4_SOURCE_DIR "/models";
    static const char *const names[] = {"realesrgan-x4plus", "realesrgan-x4plus-anime", "realesr-animevideov3-x4"};
    int found = 0;
    sdx4_image in = {0};
    if (read_png(DATA "rrdb_x4/tile_input.png", &in)) {
        CHECK(0, "tile_input.png");
        return;
    }
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        char dir[700], path[800];
        snprintf(dir, sizeof dir, "%s/%s", root, names[i]);
        snprintf(path, sizeof path, "%s/model.safetensors", dir);
        if (access(path, R_OK)) continue;
        found++;
        sdx4_engine *e = open_engine(dir);
        sdx4_image want = {0}, got = {0};
        snprintf(path, sizeof path, DATA "real/%s.png", names[i]);
        CHECK(e && !read_png(path, &want), "%s opens", names[i]);
        sdx4_upscale_params p;
        sdx4_upscale_params_default(&p);
        sdx4_status s = e && want.pixels ? sdx4_upscale(e, &in, &p, &got, NULL) : SDX4_ERR_MODEL;
        CHECK(s == SDX4_OK && got.width == want.width && got.height == want.height, "%s: upscale: %s", names[i],
              sdx4_last_error());
        if (s == SDX4_OK && got.width == want.width && got.height == want.height) {
            int max;
            size_t n = (size_t)3 * got.width * got.height, far = levels_apart(&got, &want, &max), moved = 0;
            for (size_t k = 0; k < n; k++) moved += got.pixels[k] != want.pixels[k];
            printf("  %-24s %zu of %zu values differ from PyTorch's, %zu by more than a level\n", names[i], moved,
                   n, far);
            CHECK(far * 1000 <= n, "%s: within a level of PyTorch on 99.9%% of the values (%zu further, max %d)",
                  names[i], far, max);
        }
        sdx4_image_free(&want), sdx4_image_free(&got);
        sdx4_engine_close(e);
    }
    sdx4_image_free(&in);
    if (!found) printf("  no converted models in %s (scripts/get-default-models.sh): skipped\n", root);
}

int main(int argc, char **argv) {
    (void)argc;
    if (imageio_init(argv[0])) return 1;
    if (!mkdtemp(tmp_root)) return 1;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) test_golden(cases[i]);
    test_tiles("rrdb_x4");
    test_tiles("srvgg_x4_prelu");
    if (!strcmp(test_device(), "cpu")) { /* exact comparisons of two runs */
        test_radius("srvgg_x4_prelu", 1);
        test_radius("rrdb_x4", 0);
        test_radius("rrdb_x2", 0);
    }
    test_convert();
    test_bad_configs();
    test_inputs();
    test_outscale();
    test_real_models();
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmp_root);
    if (system(cmd)) fprintf(stderr, "could not remove %s\n", tmp_root);
    return test_finish("test_gan");
}
#else
int main(void) { return 77; } /* reads PNG goldens through imageio */
#endif
