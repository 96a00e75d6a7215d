/*
 * esrgan.c - RRDBNet and SRVGGNetCompact (esrgan.h), as BasicSR defines
 * them, and their tiled runs.
 *
 * RRDBNet (ESRGAN): conv_first, then num_block residual-in-residual dense
 * blocks (three dense blocks of five convolutions each, every convolution
 * reading all the block's earlier outputs), conv_body and a skip around
 * the body; then two nearest 2x upsamplings with a convolution each,
 * conv_hr and conv_last. LeakyReLU(0.2) throughout. Scales 2 and 1 fold
 * the image into channels first (pixel_unshuffle), so the body always
 * runs at a quarter of the output's side.
 *
 * SRVGGNetCompact: num_conv + 2 convolutions at the input's resolution
 * with an activation after all but the last, whose upscale^2 * num_out_ch
 * channels pixel_shuffle unfolds into the output, plus the input upsampled
 * (nearest).
 *
 * Tiles. Every convolution is 3x3 with zero padding, so an output pixel
 * sees a bounded square of input: a tile grown by that radius on every
 * side that is not the image's border computes its centre exactly as the
 * whole image does. RRDBNet's radius is large (15 input pixels per block,
 * 349 for x4plus), so its tiled run goes stage by stage instead: the first
 * convolution, each block, then the head (conv_body, the skip, the
 * upsamplings), each over the whole image in tiles grown by that stage's
 * own radius (1, 15, 3), keeping the stages' outputs in host memory
 * between them. SRVGGNetCompact's radius (num_conv + 2) is small: it runs
 * as one stage. Tile origins and pads are multiples of 4 of the grid, so
 * that a Winograd convolution (cpu_conv.c) cuts its 4x4 blocks where the
 * whole run does, and the numbers match bit for bit on the CPU.
 */
#include "model/esrgan.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/cancel.h"
#include "core/error.h"

static const char *const arch_names[] = {[ESRGAN_RRDBNET] = "RRDBNet", [ESRGAN_SRVGG] = "SRVGGNetCompact"};
static const char *const act_names[] = {[GAN_ACT_PRELU] = "prelu", [GAN_ACT_RELU] = "relu",
                                        [GAN_ACT_LEAKYRELU] = "leakyrelu"};

const char *sdx4_gan_arch_name(esrgan_arch a) { return arch_names[a]; }
const char *sdx4_gan_act_name(gan_act a) { return act_names[a]; }

#define MODEL_ERROR(...) (sdx4_set_error(SDX4_ERR_MODEL, __VA_ARGS__), -1)

/* An int key within lo..hi, BasicSR's default when missing. */
static int int_key(const config *c, const char *key, int def, int lo, int hi, int *out) {
    if (sdx4_cfg_int(c, key, def, out)) return -1;
    if (*out < lo || *out > hi) return MODEL_ERROR("%s: %s=%d is outside %d..%d", c->label, key, *out, lo, hi);
    return 0;
}

int sdx4_gan_config_parse(const config *c, gan_config *cfg) {
    memset(cfg, 0, sizeof *cfg);
    const char *arch, *act;
    if (sdx4_cfg_str(c, "architecture", NULL, &arch)) return -1;
    if (!arch) return MODEL_ERROR("%s: no architecture (RRDBNet or SRVGGNetCompact)", c->label);
    /* sdx4 upscales RGB images: 3 channels in and out */
    if (int_key(c, "num_in_ch", 3, 3, 3, &cfg->num_in_ch) || int_key(c, "num_out_ch", 3, 3, 3, &cfg->num_out_ch) ||
        int_key(c, "num_feat", 64, 1, 1024, &cfg->num_feat))
        return -1;
    if (!strcmp(arch, "RRDBNet")) {
        cfg->arch = ESRGAN_RRDBNET;
        if (int_key(c, "scale", 4, 1, 4, &cfg->scale) || int_key(c, "num_block", 23, 1, 1000, &cfg->num_block) ||
            int_key(c, "num_grow_ch", 32, 1, 1024, &cfg->num_grow_ch))
            return -1;
        if (cfg->scale == 3) return MODEL_ERROR("%s: scale=3 is not supported by RRDBNet (1, 2 or 4)", c->label);
        return int_key(c, "outscale", cfg->scale, 1, cfg->scale, &cfg->outscale);
    }
    if (!strcmp(arch, "SRVGGNetCompact")) {
        cfg->arch = ESRGAN_SRVGG;
        if (int_key(c, "upscale", 4, 1, 8, &cfg->scale) || int_key(c, "num_conv", 16, 0, 1000, &cfg->num_conv) ||
            sdx4_cfg_str(c, "act_type", "prelu", &act))
            return -1;
        for (int a = 0; a <= GAN_ACT_LEAKYRELU; a++)
            if (!strcmp(act, act_names[a])) {
                cfg->act = (gan_act)a;
                return int_key(c, "outscale", cfg->scale, 1, cfg->scale, &cfg->outscale);
            }
        return MODEL_ERROR("%s: act_type=%s is not supported (prelu, relu or leakyrelu)", c->label, act);
    }
    return MODEL_ERROR("%s: architecture=%s is not supported (RRDBNet or SRVGGNetCompact)", c->label, arch);
}

char *sdx4_gan_config_json(const gan_config *cfg) {
    char *s = malloc(512), outscale[32] = "";
    if (!s) {
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "out of memory");
        return NULL;
    }
    if (cfg->outscale && cfg->outscale != cfg->scale)
        snprintf(outscale, sizeof outscale, ",\n  \"outscale\": %d", cfg->outscale);
    if (cfg->arch == ESRGAN_RRDBNET)
        snprintf(s, 512,
                 "{\n  \"architecture\": \"RRDBNet\",\n  \"num_in_ch\": %d,\n  \"num_out_ch\": %d,\n"
                 "  \"scale\": %d,\n  \"num_feat\": %d,\n  \"num_block\": %d,\n  \"num_grow_ch\": %d%s\n}\n",
                 cfg->num_in_ch, cfg->num_out_ch, cfg->scale, cfg->num_feat, cfg->num_block, cfg->num_grow_ch,
                 outscale);
    else
        snprintf(s, 512,
                 "{\n  \"architecture\": \"SRVGGNetCompact\",\n  \"num_in_ch\": %d,\n  \"num_out_ch\": %d,\n"
                 "  \"upscale\": %d,\n  \"num_feat\": %d,\n  \"num_conv\": %d,\n  \"act_type\": \"%s\"%s\n}\n",
                 cfg->num_in_ch, cfg->num_out_ch, cfg->scale, cfg->num_feat, cfg->num_conv, act_names[cfg->act],
                 outscale);
    return s;
}

/* ------------------------------------------------------------------ load */

/* The image is folded by this factor before RRDBNet's body (pixel_unshuffle). */
static int fold_of(const gan_config *cfg) { return cfg->arch == ESRGAN_RRDBNET ? 4 / cfg->scale : 1; }

static int load_weights(esrgan *m) {
    const gan_config *c = &m->cfg;
    weight_source *ws = &m->ws;
    int F = c->num_feat;
    if (c->arch == ESRGAN_SRVGG) {
        int n = c->num_conv + 2;
        m->convs = calloc(n, sizeof *m->convs);
        m->slopes = calloc(n, sizeof *m->slopes);
        if (!m->convs || !m->slopes) return sdx4_set_error(SDX4_ERR_NO_MEMORY, "out of memory"), -1;
        for (int k = 0; k < n; k++) {
            char name[32];
            snprintf(name, sizeof name, "body.%d", 2 * k);
            int in = k ? F : c->num_in_ch, out = k < n - 1 ? F : c->num_out_ch * c->scale * c->scale;
            if (sdx4_conv_load(ws, &m->convs[k], name, in, out, 3, 1)) return -1;
            if (k < n - 1 && c->act == GAN_ACT_PRELU && !(m->slopes[k] = W1(ws, F, "body.%d.weight", 2 * k + 1)))
                return -1;
        }
        return 0;
    }
    int G = c->num_grow_ch, fold = fold_of(c);
    m->rdb = calloc((size_t)c->num_block * 3, sizeof *m->rdb);
    if (!m->rdb) return sdx4_set_error(SDX4_ERR_NO_MEMORY, "out of memory"), -1;
    if (sdx4_conv_load(ws, &m->first, "conv_first", c->num_in_ch * fold * fold, F, 3, 1)) return -1;
    for (int b = 0; b < c->num_block; b++)
        for (int r = 0; r < 3; r++)
            for (int k = 0; k < 5; k++) {
                char name[64];
                snprintf(name, sizeof name, "body.%d.rdb%d.conv%d", b, r + 1, k + 1);
                if (sdx4_conv_load(ws, &m->rdb[b * 3 + r].c[k], name, F + k * G, k < 4 ? G : F, 3, 1)) return -1;
            }
    if (sdx4_conv_load(ws, &m->body_conv, "conv_body", F, F, 3, 1) ||
        sdx4_conv_load(ws, &m->up1, "conv_up1", F, F, 3, 1) || sdx4_conv_load(ws, &m->up2, "conv_up2", F, F, 3, 1) ||
        sdx4_conv_load(ws, &m->hr, "conv_hr", F, F, 3, 1) ||
        sdx4_conv_load(ws, &m->last, "conv_last", F, c->num_out_ch, 3, 1))
        return -1;
    return 0;
}

int sdx4_esrgan_load(esrgan *m, backend *be, const char *dir) {
    memset(m, 0, sizeof *m);
    config c;
    if (sdx4_cfg_load(&c, dir, "config.json")) return -1;
    int rc = sdx4_gan_config_parse(&c, &m->cfg);
    sdx4_cfg_free(&c);
    if (rc) return -1;
    char path[4096];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    if (sdx4_weights_open_file(&m->ws, be, path, "model.safetensors") || load_weights(m)) {
        sdx4_esrgan_free(m);
        return -1;
    }
    sdx4_weights_finish(&m->ws);
    return 0;
}

int sdx4_esrgan_spec(esrgan *m, const gan_config *cfg) {
    memset(m, 0, sizeof *m);
    m->cfg = *cfg;
    sdx4_weights_spec_init(&m->ws);
    if (load_weights(m)) {
        sdx4_esrgan_free(m);
        return -1;
    }
    return 0;
}

void sdx4_esrgan_free(esrgan *m) {
    sdx4_weights_close(&m->ws); /* every tensor below is one it served */
    free(m->rdb);
    free(m->convs);
    free(m->slopes);
    memset(m, 0, sizeof *m);
}

/* --------------------------------------------------------------- forward */

#define LRELU_SLOPE 0.2f /* RRDBNet's LeakyReLU */

/* conv, then the activation with these slopes in place. */
static tensor *conv_act(backend *be, const conv_p *p, const tensor *x, const tensor *slopes, float slope) {
    tensor *y = conv_forward(be, p, x);
    if (y && be->prelu_inplace(be, y, slopes, slope)) DROP(y);
    return y;
}

/* out * 0.2 + x, in out (BasicSR's residual scaling: two roundings, as
 * torch's two operations). */
static int scaled_residual(backend *be, tensor *out, const tensor *x) {
    return be->scale_inplace(be, out, 0.2f) || be->add_inplace(be, out, x, 1.0f) ? -1 : 0;
}

/* A residual dense block: each convolution reads x and every earlier
 * output, concatenated. */
static tensor *rdb_forward(backend *be, const rdb_p *p, const tensor *x) {
    tensor *cat = NULL, *y = NULL, *next;
    for (int k = 0; k < 5; k++) {
        const tensor *in = cat ? cat : x;
        TRY(y = k < 4 ? conv_act(be, &p->c[k], in, NULL, LRELU_SLOPE) : conv_forward(be, &p->c[k], in));
        if (k == 4) break;
        TRY(next = be->concat_channels(be, in, y));
        DROP(y);
        tensor_free(cat);
        cat = next;
    }
    tensor_free(cat);
    if (scaled_residual(be, y, x)) DROP(y);
    return y;
fail:
    tensor_free(cat);
    tensor_free(y);
    return NULL;
}

/* Block b of the body: three dense blocks and a scaled skip around them. */
static tensor *rrdb_forward(const esrgan *m, backend *be, int b, const tensor *x) {
    tensor *h = NULL, *next;
    for (int r = 0; r < 3; r++) {
        next = rdb_forward(be, &m->rdb[b * 3 + r], h ? h : x);
        tensor_free(h);
        if (!(h = next)) return NULL;
    }
    if (scaled_residual(be, h, x)) DROP(h);
    return h;
}

static tensor *rrdb_first(const esrgan *m, backend *be, const tensor *x) {
    int fold = fold_of(&m->cfg);
    if (fold == 1) return conv_forward(be, &m->first, x);
    tensor *folded = be->pixel_unshuffle(be, x, fold);
    if (!folded) return NULL;
    tensor *y = conv_forward(be, &m->first, folded);
    tensor_free(folded);
    return y;
}

/* conv_body(h) + feat, then the upsampling head to the output. */
static tensor *rrdb_head(const esrgan *m, backend *be, const tensor *h, const tensor *feat) {
    tensor *t = conv_add_forward(be, &m->body_conv, h, feat), *u;
    const conv_p *ups[2] = {&m->up1, &m->up2};
    for (int i = 0; i < 2 && t; i++) {
        u = be->upsample_nearest(be, t, (int)t->shape[2] * 2, (int)t->shape[3] * 2);
        DROP(t);
        if (!u) return NULL;
        t = conv_act(be, ups[i], u, NULL, LRELU_SLOPE);
        tensor_free(u);
    }
    if (!t) return NULL;
    u = conv_act(be, &m->hr, t, NULL, LRELU_SLOPE);
    tensor_free(t);
    if (!u) return NULL;
    t = conv_forward(be, &m->last, u);
    tensor_free(u);
    return t;
}

static tensor *srvgg_forward(const esrgan *m, backend *be, const tensor *x) {
    const gan_config *c = &m->cfg;
    int n = c->num_conv + 2, r = c->scale;
    float slope = c->act == GAN_ACT_LEAKYRELU ? 0.1f : 0.0f; /* BasicSR's LeakyReLU(0.1) */
    tensor *h = NULL, *next, *base = NULL;
    for (int k = 0; k < n; k++) {
        next = k < n - 1 ? conv_act(be, &m->convs[k], h ? h : x, m->slopes[k], slope)
                         : conv_forward(be, &m->convs[k], h);
        tensor_free(h);
        if (!(h = next)) return NULL;
    }
    TRY(next = be->pixel_shuffle(be, h, r));
    DROP(h);
    h = next;
    TRY(base = be->upsample_nearest(be, x, (int)x->shape[2] * r, (int)x->shape[3] * r));
    if (be->add_inplace(be, h, base, 1.0f)) goto fail;
    tensor_free(base);
    return h;
fail:
    tensor_free(h);
    tensor_free(base);
    return NULL;
}

tensor *sdx4_esrgan_forward(const esrgan *m, backend *be, const tensor *x) {
    if (m->cfg.arch == ESRGAN_SRVGG) return srvgg_forward(m, be, x);
    tensor *feat = rrdb_first(m, be, x), *h = NULL, *next;
    if (!feat) return NULL;
    for (int b = 0; b < m->cfg.num_block; b++) {
        next = sdx4_cancel_check() ? NULL : rrdb_forward(m, be, b, h ? h : feat);
        tensor_free(h);
        if (!(h = next)) break;
    }
    tensor *y = h ? rrdb_head(m, be, h, feat) : NULL;
    tensor_free(h);
    tensor_free(feat);
    return y;
}

/* ---------------------------------------------------------------- sizes */

/* RRDBNet's stage radii on its body's grid: conv_first; a block (three
 * dense blocks of five 3x3 convolutions); the head: conv_body (1), then
 * conv_up1 at twice the side and conv_up2, conv_hr and conv_last at four
 * times: an output pixel of body pixel p reads body pixels p-2..p+2 through
 * the upsamplings. */
#define FIRST_RADIUS 1
#define BLOCK_RADIUS 15
#define HEAD_RADIUS 3

int sdx4_esrgan_min_side(const gan_config *cfg) { return fold_of(cfg); }

int sdx4_esrgan_radius(const gan_config *cfg) {
    if (cfg->arch == ESRGAN_SRVGG) return cfg->num_conv + 2;
    int grid = FIRST_RADIUS + cfg->num_block * BLOCK_RADIUS + HEAD_RADIUS, fold = fold_of(cfg);
    return grid * fold + fold - 1; /* the body's pixels are fold x fold image pixels */
}

/* Float32 values held at a stage's peak per pixel of its grid (the body's
 * for RRDBNet, the input's for SRVGGNetCompact). */
typedef enum { STAGE_FIRST, STAGE_BLOCK, STAGE_HEAD, STAGE_SRVGG } stage_kind;

static int64_t stage_floats(const gan_config *c, stage_kind k) {
    int64_t F = c->num_feat, G = c->num_grow_ch, s = c->scale, fold = fold_of(c);
    switch (k) {
    case STAGE_FIRST: return 2 * c->num_in_ch * fold * fold + F;
    /* the block's input, the dense block's input, the growing concatenation
     * and the one before it, the convolution's output */
    case STAGE_BLOCK: return 4 * F + (F + 4 * G) + (F + 3 * G) + F;
    /* the two inputs and the skip's sum; then at four times the side the
     * upsampled input and conv_up2's output (16 pixels each) */
    case STAGE_HEAD: return 3 * F + 32 * F + 16 * c->num_out_ch;
    /* two activations, the last convolution's output, its shuffle and the
     * upsampled input */
    case STAGE_SRVGG: return c->num_in_ch + 2 * F + 2 * c->num_out_ch * s * s + c->num_in_ch * s * s;
    }
    return 0;
}

int64_t sdx4_esrgan_bytes_per_pixel(const gan_config *c) {
    if (c->arch == ESRGAN_SRVGG) return 4 * stage_floats(c, STAGE_SRVGG);
    int64_t body = stage_floats(c, STAGE_BLOCK) + c->num_feat; /* and the skip's input */
    int64_t head = stage_floats(c, STAGE_HEAD);
    int64_t fold = fold_of(c);
    return 4 * (body > head ? body : head) / (fold * fold); /* per image pixel */
}

double sdx4_esrgan_flops(const gan_config *c, int h, int w) {
    double px = (double)h * w, F = c->num_feat, G = c->num_grow_ch, s = c->scale, conv = 2.0 * 9;
    if (c->arch == ESRGAN_SRVGG)
        return px * conv * (c->num_in_ch * F + c->num_conv * F * F + F * c->num_out_ch * s * s);
    double fold = fold_of(c), body = px / (fold * fold), per_rdb = 0;
    for (int k = 0; k < 5; k++) per_rdb += (F + k * G) * (k < 4 ? G : F);
    return body * conv *
           (c->num_in_ch * fold * fold * F + c->num_block * 3 * per_rdb + F * F + 4 * F * F + 16 * (2 * F * F) +
            16 * F * c->num_out_ch);
}

/* ----------------------------------------------------------- tiled runs */

/* A float CHW image on the host: one stage's input or output. */
typedef struct {
    float *data;
    int c, h, w;
} host_map;

/* One stage: fn on tiles of up to two maps (in[1] may be NULL) on a grid
 * of gh x gw pixels; in[k] holds `in_scale` x its pixels a side (the image
 * before RRDBNet's fold), the output `out_scale` x. */
typedef struct {
    const esrgan *m;
    stage_kind kind;
    int block;
    int radius, in_scale, out_scale;
} stage;

static tensor *stage_forward(const stage *st, backend *be, const tensor *a, const tensor *b) {
    switch (st->kind) {
    case STAGE_FIRST: return rrdb_first(st->m, be, a);
    case STAGE_BLOCK: return rrdb_forward(st->m, be, st->block, a);
    case STAGE_HEAD: return rrdb_head(st->m, be, a, b);
    case STAGE_SRVGG: return srvgg_forward(st->m, be, a);
    }
    return NULL;
}

static int round_up4(int v) { return (v + 3) / 4 * 4; }

/* The largest tile side, a multiple of 8, whose grown tile's activations
 * fit `budget`; at least 8. */
static int tile_for_budget(const gan_config *c, const stage *st, int64_t budget) {
    int64_t per = 4 * stage_floats(c, st->kind), pad = 2 * round_up4(st->radius);
    int64_t side = (int64_t)sqrt((double)budget / (double)per) - pad;
    side = side / 8 * 8;
    return side < 8 ? 8 : side > 1 << 20 ? 1 << 20 : (int)side;
}

/* Rows y0..y1, columns x0..x1 of map m (scaled by `scale`) as a tensor. */
static tensor *upload_crop(backend *be, const host_map *m, int scale, int y0, int y1, int x0, int x1) {
    int h = (y1 - y0) * scale, w = (x1 - x0) * scale;
    float *buf = malloc(sizeof *buf * (size_t)m->c * h * w);
    if (!buf) return sdx4_set_error(SDX4_ERR_NO_MEMORY, "out of memory"), NULL;
    for (int ch = 0; ch < m->c; ch++)
        for (int y = 0; y < h; y++)
            memcpy(buf + ((size_t)ch * h + y) * w, m->data + ((size_t)ch * m->h + y0 * scale + y) * m->w + x0 * scale,
                   sizeof *buf * w);
    tensor *t = be->new_tensor(be, 4, (int64_t[]){1, m->c, h, w});
    if (t && be->upload(be, t, buf)) DROP(t);
    free(buf);
    return t;
}

typedef struct {
    int (*progress)(void *user, int done, int total);
    void *user;
    int done, total;
} tile_progress;

static int tile_done(tile_progress *p) {
    p->done++;
    if (p->progress && p->progress(p->user, p->done, p->total)) {
        sdx4_set_error(SDX4_ERR_CANCELED, "canceled");
        return -1;
    }
    return 0;
}

static int tiles_of(int gh, int gw, int tile) { return ((gh + tile - 1) / tile) * ((gw + tile - 1) / tile); }

/* Runs a stage over the grid in tiles of `tile`, each grown by the radius
 * (rounded up to 4) within the grid, writing each tile's centre into out. */
static int run_stage(const stage *st, backend *be, const host_map *a, const host_map *b, int gh, int gw, int tile,
                     host_map *out, tile_progress *prog) {
    int pad = round_up4(st->radius), s = st->out_scale;
    float *tmp = NULL;
    for (int ty = 0; ty < gh; ty += tile)
        for (int tx = 0; tx < gw; tx += tile) {
            int y1 = ty + tile < gh ? ty + tile : gh, x1 = tx + tile < gw ? tx + tile : gw;
            int cy0 = ty > pad ? ty - pad : 0, cx0 = tx > pad ? tx - pad : 0;
            int cy1 = y1 + pad < gh ? y1 + pad : gh, cx1 = x1 + pad < gw ? x1 + pad : gw;
            tensor *ta = upload_crop(be, a, st->in_scale, cy0, cy1, cx0, cx1), *tb = NULL, *y = NULL;
            if (ta && b) tb = upload_crop(be, b, 1, cy0, cy1, cx0, cx1);
            if (ta && (tb || !b)) y = stage_forward(st, be, ta, tb);
            tensor_free(ta);
            tensor_free(tb);
            if (!y) goto fail;
            int h = (cy1 - cy0) * s, w = (cx1 - cx0) * s;
            float *grown = realloc(tmp, sizeof *tmp * (size_t)out->c * h * w); /* edge tiles are smaller */
            if (!grown || be->download(be, y, grown)) {
                tensor_free(y);
                if (grown) tmp = grown;
                else sdx4_set_error(SDX4_ERR_NO_MEMORY, "out of memory");
                goto fail;
            }
            tmp = grown;
            tensor_free(y);
            int oy = (ty - cy0) * s, ox = (tx - cx0) * s, rows = (y1 - ty) * s, cols = (x1 - tx) * s;
            for (int ch = 0; ch < out->c; ch++)
                for (int r = 0; r < rows; r++)
                    memcpy(out->data + ((size_t)ch * out->h + ty * s + r) * out->w + tx * s,
                           tmp + ((size_t)ch * h + oy + r) * w + ox, sizeof *tmp * cols);
            if (tile_done(prog)) goto fail;
        }
    free(tmp);
    return 0;
fail:
    free(tmp);
    return -1;
}

static int map_new(host_map *m, int c, int h, int w) {
    m->c = c, m->h = h, m->w = w;
    m->data = malloc(sizeof *m->data * (size_t)c * h * w);
    if (!m->data) return sdx4_set_error(SDX4_ERR_NO_MEMORY, "out of memory"), -1;
    return 0;
}

/* The whole network in one call. */
static int run_whole(const esrgan *m, backend *be, const host_map *in, host_map *out) {
    tensor *x = be->new_tensor(be, 4, (int64_t[]){1, in->c, in->h, in->w}), *y = NULL;
    int rc = -1;
    if (x && !be->upload(be, x, in->data) && (y = sdx4_esrgan_forward(m, be, x)))
        rc = be->download(be, y, out->data);
    tensor_free(x);
    tensor_free(y);
    return rc;
}

/* RRDBNet stage by stage (see the top of this file). */
static int run_rrdb_tiled(const esrgan *m, backend *be, const host_map *in, int tile, int64_t budget,
                          host_map *out, tile_progress *prog) {
    const gan_config *c = &m->cfg;
    int fold = fold_of(c), gh = in->h / fold, gw = in->w / fold;
    stage first = {m, STAGE_FIRST, 0, FIRST_RADIUS, fold, 1}, block = {m, STAGE_BLOCK, 0, BLOCK_RADIUS, 1, 1},
          head = {m, STAGE_HEAD, 0, HEAD_RADIUS, 1, 4};
    int t_first = tile ? tile : tile_for_budget(c, &first, budget);
    int t_block = tile ? tile : tile_for_budget(c, &block, budget);
    int t_head = tile ? tile : tile_for_budget(c, &head, budget);
    prog->total = tiles_of(gh, gw, t_first) + c->num_block * tiles_of(gh, gw, t_block) + tiles_of(gh, gw, t_head);
    host_map feat = {0}, h = {0}, next = {0};
    int rc = -1;
    if (map_new(&feat, c->num_feat, gh, gw) || run_stage(&first, be, in, NULL, gh, gw, t_first, &feat, prog))
        goto done;
    for (int b = 0; b < c->num_block; b++) {
        block.block = b;
        if (map_new(&next, c->num_feat, gh, gw) ||
            run_stage(&block, be, b ? &h : &feat, NULL, gh, gw, t_block, &next, prog))
            goto done;
        free(h.data);
        h = next;
        next.data = NULL;
    }
    rc = run_stage(&head, be, &h, &feat, gh, gw, t_head, out, prog);
done:
    free(feat.data);
    free(h.data);
    free(next.data);
    return rc;
}

/* BasicSR's mod_pad: RRDBNet's fold needs sides that divide by it; the
 * image grows by reflection on the right and bottom (F.pad(..., "reflect")),
 * and the output is cropped back. */
static int reflect_pad(const float *img, int c, int h, int w, int fold, host_map *in) {
    int ph = (h + fold - 1) / fold * fold, pw = (w + fold - 1) / fold * fold;
    if (ph - h >= h || pw - w >= w) /* reflection reads within the image */
        return sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "input image %dx%d is too small for this model", w, h), -1;
    if (map_new(in, c, ph, pw)) return -1;
    for (int ch = 0; ch < c; ch++)
        for (int y = 0; y < ph; y++) {
            int sy = y < h ? y : 2 * (h - 1) - y;
            for (int x = 0; x < pw; x++) {
                int sx = x < w ? x : 2 * (w - 1) - x;
                in->data[((size_t)ch * ph + y) * pw + x] = img[((size_t)ch * h + sy) * w + sx];
            }
        }
    return 0;
}

int sdx4_esrgan_run(const esrgan *m, backend *be, const float *image, int h, int w, int tile, int64_t budget,
                    int (*progress)(void *user, int done, int total), void *user, float **out, int *tiles_run) {
    const gan_config *c = &m->cfg;
    int fold = fold_of(c), s = c->scale;
    *out = NULL;
    host_map in = {0}, res = {0};
    if (reflect_pad(image, c->num_in_ch, h, w, fold, &in)) return -1;
    tile_progress prog = {progress, user, 0, 1};
    int whole = tile == 0 && sdx4_esrgan_bytes_per_pixel(c) * in.h * in.w <= budget;
    int rc = -1;
    if (progress && progress(user, 0, 1)) {
        sdx4_set_error(SDX4_ERR_CANCELED, "canceled");
        goto done;
    }
    if (map_new(&res, c->num_out_ch, in.h * s, in.w * s)) goto done;
    if (whole) {
        if (run_whole(m, be, &in, &res) || tile_done(&prog)) goto done;
    } else if (c->arch == ESRGAN_RRDBNET) {
        if (run_rrdb_tiled(m, be, &in, tile ? (tile + fold - 1) / fold : 0, budget, &res, &prog)) goto done;
    } else {
        stage st = {m, STAGE_SRVGG, 0, c->num_conv + 2, 1, s};
        int t = tile ? tile : tile_for_budget(c, &st, budget);
        prog.total = tiles_of(in.h, in.w, t);
        if (run_stage(&st, be, &in, NULL, in.h, in.w, t, &res, &prog)) goto done;
    }
    /* crop the padding away and clamp, as the pipelines' postprocessing */
    int oh = h * s, ow = w * s;
    float *o = malloc(sizeof *o * (size_t)c->num_out_ch * oh * ow);
    if (!o) {
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "out of memory");
        goto done;
    }
    for (int ch = 0; ch < c->num_out_ch; ch++)
        for (int y = 0; y < oh; y++)
            for (int x = 0; x < ow; x++) {
                float v = res.data[((size_t)ch * res.h + y) * res.w + x];
                o[((size_t)ch * oh + y) * ow + x] = v < 0.0f ? 0.0f : v > 1.0f ? 1.0f : v;
            }
    *out = o;
    if (tiles_run) *tiles_run = prog.done;
    rc = 0;
done:
    free(in.data);
    free(res.data);
    return rc;
}
