/*
 * ncnn_import.c - ncnn's .param/.bin pairs of RRDBNet and SRVGGNetCompact
 * (realesrgan-ncnn-vulkan's models) as PyTorch state dicts (convert.h).
 *
 * The .param file is text: the magic 7767517, "layer_count blob_count",
 * then a line a layer,
 *
 *   Convolution  Conv_1  1 1  193_splitncnn_7 195  0=32 1=3 4=1 5=1 6=18432 9=2 -23310=1,2.000000e-01
 *
 * its type, name, bottom and top counts, the bottom blobs (made by earlier
 * lines), the top blobs (new names) and key=value params: keys 0..31, each
 * value an integer or, when it has a '.' or an 'e', a float (ncnn reads
 * the other kind's bits, so a key's kind is checked), "-233KK=n,v1,...,vn"
 * an array for key KK. The .bin file is the layers' weights in line order
 * with no header: a Convolution's weights [out, in, kh, kw] (PyTorch's
 * layout) behind a 4-byte tag (0x01306B47: float16, padded to a multiple
 * of 4 bytes; 0, or 0x0002C056: float32; int8 and codebook tags are
 * refused), then its bias as raw float32; a PReLU's slopes as raw
 * float32. Split copies a blob to several consumers; an activation may be
 * fused into a Convolution (9=1 ReLU, 9=2 leaky ReLU with its slope in key
 * 10).
 *
 * Parsing is strict where ncnn is lenient (ncnn scans tokens across lines,
 * trusts the counts and creates any blob it has not seen): every count is
 * checked, a blob must be made before it is used, a layer type or key this
 * importer does not know is refused by name, and the .bin must be consumed
 * exactly. Weights keep their type: float16 stays float16.
 *
 * The architecture is recognised by walking the graph back from its one
 * output, seeing through Splits. RRDBNet ends in convolutions after two
 * nearest x2 Interps; each dense block is Concats of the block's input and
 * every earlier conv's output, closed by an Eltwise 0.2 * x5 + x, and each
 * RRDB by another. SRVGGNetCompact ends in a PixelShuffle plus the nearest
 * upsampled input. The walk reads the config off the layers (channels,
 * blocks, the shuffle factor), checks every layer's shape and activation
 * against it, and refuses any layer it did not visit. A bicubic Interp
 * down after either network is the config's outscale: realesr-animevideov3's
 * x2 and x3 files are its x4 network (the same .bin) with a resize by 0.5
 * or 0.75 after it.
 */
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"
#include "tools/convert.h"

#define NCNN_MAGIC "7767517"
#define MAX_KEY 32     /* ncnn's NCNN_MAX_PARAM_COUNT */
#define MAX_ARRAY 4    /* values in an array param; ESRGAN's have 1 or 2 */
#define MAX_NAME 255   /* ncnn scans names with %255s */
#define MAX_VALUE 15   /* and values with %15[^,\n ] */
#define MAX_FACTOR 16  /* of a PixelShuffle or Reorg: 8 is the largest upscaler's */
#define TAG_F16 0x01306B47u
#define TAG_F32 0u
#define TAG_F32_SCALED 0x0002C056u /* float32 too, as ncnn's ModelBin reads it */
#define TAG_INT8 0x000D4B38u

/* ---------------------------------------------------------------- the graph */

typedef enum {
    L_INPUT, L_SPLIT, L_CONV, L_PRELU, L_RELU, L_CONCAT, L_ELTWISE, L_BINARYOP, L_INTERP,
    L_PIXELSHUFFLE, L_REORG, L_COUNT
} ltype;

#define K(k) (1u << (k))
/* The layer types of the two architectures, how many bottoms they take,
 * and the keys they may have, by kind (ncnn's load_param of each). */
static const struct {
    const char *name;
    int min_bottom, max_bottom, max_top;
    uint32_t ints, floats, arrays;
} types[L_COUNT] = {
    [L_INPUT] = {"Input", 0, 0, 1, K(0) | K(1) | K(2) | K(11), 0, 0},
    [L_SPLIT] = {"Split", 1, 1, INT_MAX, 0, 0, 0},
    [L_CONV] = {"Convolution", 1, 1, 1,
                K(0) | K(1) | K(2) | K(3) | K(4) | K(5) | K(6) | K(8) | K(9) | K(11) | K(12) |
                    K(13) | K(14) | K(15) | K(16) | K(19),
                K(18), K(10)},
    [L_PRELU] = {"PReLU", 1, 1, 1, K(0), 0, 0},
    [L_RELU] = {"ReLU", 1, 1, 1, 0, K(0), 0},
    [L_CONCAT] = {"Concat", 1, INT_MAX, 1, K(0), 0, 0},
    [L_ELTWISE] = {"Eltwise", 2, 2, 1, K(0), 0, K(1)},
    [L_BINARYOP] = {"BinaryOp", 2, 2, 1, K(0) | K(1), K(2), 0},
    [L_INTERP] = {"Interp", 1, 1, 1, K(0) | K(3) | K(4) | K(5) | K(6), K(1) | K(2), 0},
    [L_PIXELSHUFFLE] = {"PixelShuffle", 1, 1, 1, K(0) | K(1), 0, 0},
    [L_REORG] = {"Reorg", 1, 1, 1, K(0) | K(1), 0, 0},
};

typedef struct {
    int key, n;     /* n: values, 1 for a scalar */
    int is_array;
    double v[MAX_ARRAY];
} nparam;

typedef struct {
    ltype type;
    const char *name;
    int line;
    int nbottom, ntop, ids;    /* ids: its bottoms then tops, at ncnn.ids[ids] */
    int nparam, params;        /* at ncnn.params[params] */
    const unsigned char *weight, *raw; /* in the .bin: a Convolution's weights;
                                        * its bias, or a PReLU's slopes (float32) */
    dtype wtype;
    int used;                  /* visited by the architecture's walk */
} nlayer;

typedef struct {
    const char *name;
    int producer;              /* the layer that makes it */
    int root;                  /* through Splits, the blob they copy */
    int consumers;
} nblob;

typedef struct {
    const char *plabel, *blabel;
    char *text, *pos, *end, *cur; /* the .param's copy, cut into words in place */
    int line;
    nlayer *layers;
    int nlayers, layer_count;
    nblob *blobs;
    int nblobs, blob_count;
    int *hash, hmask;          /* blob name -> index + 1 */
    int *ids, nids;
    nparam *params;
    int nparams;
    int input;                 /* the Input layer's blob */
    const char *arch;          /* for messages, once recognised */
    gan_config *cfg;
    state_dict *sd;
} ncnn;

static int fail_line(const ncnn *c, int line, const char *fmt, ...) SDX4_PRINTF(3, 4);
static int fail_line(const ncnn *c, int line, const char *fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    sdx4_set_error(SDX4_ERR_MODEL, "%s:%d: %s", c->plabel, line, msg);
    return -1;
}

static int fail_layer(const ncnn *c, const nlayer *l, const char *fmt, ...) SDX4_PRINTF(3, 4);
static int fail_layer(const ncnn *c, const nlayer *l, const char *fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    sdx4_set_error(SDX4_ERR_MODEL, "%s:%d: layer %s (%s): %s", c->plabel, l->line, l->name,
                   types[l->type].name, msg);
    return -1;
}

static const nparam *param(const ncnn *c, const nlayer *l, int key) {
    for (int i = 0; i < l->nparam; i++)
        if (c->params[l->params + i].key == key) return &c->params[l->params + i];
    return NULL;
}

static int iparam(const ncnn *c, const nlayer *l, int key, int dflt) {
    const nparam *p = param(c, l, key);
    return p ? (int)p->v[0] : dflt;
}

static double fparam(const ncnn *c, const nlayer *l, int key, double dflt) {
    const nparam *p = param(c, l, key);
    return p ? p->v[0] : dflt;
}

/* A Convolution's input channels (its weights are out x in x 3 x 3). */
static int conv_in(const ncnn *c, const nlayer *l) {
    return (int)(iparam(c, l, 6, 0) / ((int64_t)iparam(c, l, 0, 0) * 9));
}

/* ------------------------------------------------------------ the .param text */

/* The next line that is not blank, NUL-terminated in place as the cursor
 * of word(); 0 at the end of the text. */
static int next_line(ncnn *c) {
    while (c->pos < c->end) {
        char *s = c->pos, *nl = memchr(s, '\n', (size_t)(c->end - s));
        char *e = nl ? nl : c->end;
        *e = '\0';
        c->pos = nl ? nl + 1 : c->end;
        c->line++;
        c->cur = s;
        if (s[strspn(s, " \t\r")]) return 1;
    }
    return 0;
}

/* The current line's next word, NUL-terminated in place; NULL at its end. */
static char *word(ncnn *c) {
    char *s = c->cur + strspn(c->cur, " \t\r");
    if (!*s) return NULL;
    size_t n = strcspn(s, " \t\r");
    c->cur = s + n + (s[n] != '\0');
    s[n] = '\0';
    return s;
}

/* An ncnn number: a float when it has a '.' or an 'e' (ncnn's rule), else
 * an int; the whole text, finite, at most the 15 characters ncnn reads. */
static int number(const char *s, int *is_float, double *v) {
    if (!*s || strlen(s) > MAX_VALUE || s[strspn(s, "0123456789+-.eE")]) return -1;
    char *end;
    *is_float = strpbrk(s, ".eE") != NULL;
    errno = 0;
    if (*is_float) {
        *v = strtod(s, &end);
        return *end || !isfinite(*v) ? -1 : 0;
    }
    long x = strtol(s, &end, 10);
    if (*end || errno || x < INT_MIN || x > INT_MAX) return -1;
    *v = (double)x;
    return 0;
}

/* A count of the layer line: a non-negative int. */
static int count_word(ncnn *c, const char *what, int *out) {
    const char *w = word(c);
    int is_float;
    double v;
    if (!w || number(w, &is_float, &v) || is_float || v < 0)
        return fail_line(c, c->line, "%s: '%s' is not a count", what, w ? w : "");
    *out = (int)v;
    return 0;
}

static uint32_t hash_name(const char *s) {
    uint32_t h = 2166136261u;
    while (*s) h = (h ^ (unsigned char)*s++) * 16777619u;
    return h;
}

/* The slot of `name` in the hash: its blob's index + 1, or 0 when free. */
static int *blob_slot(ncnn *c, const char *name) {
    uint32_t i = hash_name(name) & (uint32_t)c->hmask;
    while (c->hash[i] && strcmp(c->blobs[c->hash[i] - 1].name, name))
        i = (i + 1) & (uint32_t)c->hmask;
    return &c->hash[i];
}

/* One key=value param of layer l (ncnn's ParamDict::load_param, refusing
 * what it would misread). */
static int parse_param_word(ncnn *c, nlayer *l, char *w) {
    char *eq = strchr(w, '=');
    int is_float;
    double key;
    if (!eq)
        return fail_layer(c, l, "'%s' is not a key=value param (more blobs than the counts say?)", w);
    *eq = '\0';
    if (number(w, &is_float, &key) || is_float)
        return fail_layer(c, l, "param key '%s' is not an integer", w);
    int old_array = key <= -23300;
    int k = (int)(old_array ? -key - 23300 : key); /* in double: -INT_MIN overflows int */
    if (k < 0 || k >= MAX_KEY) return fail_layer(c, l, "param key %d is out of range", (int)key);
    uint32_t bit = K(k);
    if (!((types[l->type].ints | types[l->type].floats | types[l->type].arrays) & bit))
        return fail_layer(c, l, "param key %d is not one this importer knows for %s", k,
                          types[l->type].name);
    if (param(c, l, k)) return fail_layer(c, l, "param key %d given twice", k);
    nparam *p = &c->params[c->nparams];
    memset(p, 0, sizeof *p);
    p->key = k;
    char *s = eq + 1;
    int declared = -1;
    if (old_array) { /* -233KK=n,v1,...,vn */
        char *comma = strchr(s, ',');
        if (comma) *comma = '\0';
        if (number(s, &is_float, &key) || is_float || key < 0)
            return fail_layer(c, l, "param %d: array length '%s' is not a count", k, s);
        declared = (int)key;
        s = comma ? comma + 1 : NULL;
    }
    while (s) {
        char *comma = strchr(s, ',');
        if (comma) *comma = '\0';
        if (p->n == MAX_ARRAY)
            return fail_layer(c, l, "param %d: more than %d values", k, MAX_ARRAY);
        if (number(s, &is_float, &p->v[p->n]))
            return fail_layer(c, l, "param %d: '%s' is not a number", k, s);
        if (is_float != !(types[l->type].ints & bit))
            return fail_layer(c, l, "param %d is %s; ncnn would read the bits of '%s' as one", k,
                              is_float ? "an integer" : "a float", s);
        p->n++;
        s = comma ? comma + 1 : NULL;
    }
    p->is_array = old_array || p->n > 1;
    if (declared >= 0 && declared != p->n)
        return fail_layer(c, l, "param %d: the array says %d values and has %d", k, declared, p->n);
    if (p->is_array != !!(types[l->type].arrays & bit))
        return fail_layer(c, l, "param %d: %s", k,
                          p->is_array ? "an array where ncnn reads one value"
                                      : "one value where ncnn reads an array (-233NN=n,v1,...)");
    c->nparams++;
    l->nparam++;
    return 0;
}

/* What each layer's params must be for the two architectures; the graph's
 * walk checks the rest (channel counts, factors, activations' slopes). */
static int check_layer(ncnn *c, const nlayer *l) {
    switch (l->type) {
    case L_CONV: {
        int out = iparam(c, l, 0, 0), kw = iparam(c, l, 1, 0), kh = iparam(c, l, 11, kw);
        int pad = iparam(c, l, 4, 0), fused = iparam(c, l, 9, 0);
        int64_t size = iparam(c, l, 6, 0);
        const nparam *ap = param(c, l, 10);
        if (out < 1) return fail_layer(c, l, "num_output (0=) %d", out);
        if (kw != 3 || kh != 3) return fail_layer(c, l, "kernel %dx%d, not 3x3", kw, kh);
        if (iparam(c, l, 2, 1) != 1 || iparam(c, l, 12, iparam(c, l, 2, 1)) != 1)
            return fail_layer(c, l, "dilation is not 1");
        if (iparam(c, l, 3, 1) != 1 || iparam(c, l, 13, iparam(c, l, 3, 1)) != 1)
            return fail_layer(c, l, "stride is not 1");
        if (pad != 1 || iparam(c, l, 15, pad) != 1 || iparam(c, l, 14, pad) != 1 ||
            iparam(c, l, 16, iparam(c, l, 14, pad)) != 1 || fparam(c, l, 18, 0) != 0)
            return fail_layer(c, l, "padding is not 1 pixel of zeros on each side");
        if (iparam(c, l, 5, 0) != 1) return fail_layer(c, l, "no bias (5=1 expected)");
        if (size < 1 || size % ((int64_t)out * 9))
            return fail_layer(c, l, "weight_data_size (6=) %lld is not num_output %d x 3 x 3 x inputs",
                              (long long)size, out);
        if (iparam(c, l, 8, 0)) return fail_layer(c, l, "int8 quantised (8=), not supported");
        if (iparam(c, l, 19, 0)) return fail_layer(c, l, "dynamic weights (19=), not supported");
        if (fused < 0 || fused > 2)
            return fail_layer(c, l, "fused activation 9=%d (ESRGAN's are 1, ReLU, and 2, leaky ReLU)",
                              fused);
        if (fused == 2 && (!ap || ap->n != 1))
            return fail_layer(c, l, "leaky ReLU (9=2) needs its slope (-23310=1,slope)");
        if (fused != 2 && ap) return fail_layer(c, l, "activation params (10=) without 9=2");
        return 0;
    }
    case L_PRELU:
        return iparam(c, l, 0, 0) < 1 ? fail_layer(c, l, "num_slope (0=) %d", iparam(c, l, 0, 0)) : 0;
    case L_CONCAT:
        return iparam(c, l, 0, 0) ? fail_layer(c, l, "axis %d, not the channels' 0", iparam(c, l, 0, 0)) : 0;
    case L_ELTWISE: {
        const nparam *co = param(c, l, 1);
        if (iparam(c, l, 0, 0) != 1) return fail_layer(c, l, "op_type %d, not a sum (1)", iparam(c, l, 0, 0));
        if (co && co->n != 2) return fail_layer(c, l, "%d coefficients for 2 inputs", co->n);
        return 0;
    }
    case L_BINARYOP:
        if (iparam(c, l, 0, 0) != 0)
            return fail_layer(c, l, "op_type %d, not an add (0)", iparam(c, l, 0, 0));
        if (iparam(c, l, 1, 0)) return fail_layer(c, l, "an add of a scalar (1=1)");
        return 0;
    case L_INTERP:
        if (iparam(c, l, 0, 0) < 1 || iparam(c, l, 0, 0) > 3)
            return fail_layer(c, l, "resize type %d", iparam(c, l, 0, 0));
        if (iparam(c, l, 3, 0) || iparam(c, l, 4, 0) || iparam(c, l, 5, 0) || iparam(c, l, 6, 0))
            return fail_layer(c, l, "an output size, dynamic size or align_corner (3= to 6=)");
        return 0;
    case L_PIXELSHUFFLE:
    case L_REORG:
        if (iparam(c, l, 0, 1) < 1 || iparam(c, l, 0, 1) > MAX_FACTOR)
            return fail_layer(c, l, "factor %d (1 to %d)", iparam(c, l, 0, 1), MAX_FACTOR);
        if (iparam(c, l, 1, 0))
            return fail_layer(c, l, "mode %d, not PyTorch's channel order (0)", iparam(c, l, 1, 0));
        return 0;
    default:
        return 0;
    }
}

static int parse_layer(ncnn *c) {
    nlayer *l = &c->layers[c->nlayers];
    char *type = word(c), *name = word(c);
    memset(l, 0, sizeof *l);
    l->line = c->line;
    if (!name) return fail_line(c, c->line, "a layer line needs a type, a name and two counts");
    for (l->type = 0; l->type < L_COUNT && strcmp(type, types[l->type].name); l->type++) {}
    if (l->type == L_COUNT)
        return fail_line(c, c->line, "layer %s: type %s is not one of RRDBNet's or SRVGGNetCompact's "
                         "(Input Split Convolution PReLU ReLU Concat Eltwise BinaryOp Interp "
                         "PixelShuffle Reorg)", name, type);
    if (strlen(name) > MAX_NAME) return fail_line(c, c->line, "a layer name longer than %d", MAX_NAME);
    l->name = name;
    if (count_word(c, "bottom count", &l->nbottom) || count_word(c, "top count", &l->ntop)) return -1;
    if (l->nbottom < types[l->type].min_bottom || l->nbottom > types[l->type].max_bottom ||
        l->ntop < 1 || l->ntop > types[l->type].max_top)
        return fail_layer(c, l, "%d inputs and %d outputs", l->nbottom, l->ntop);
    l->ids = c->nids;
    for (int j = 0; j < l->nbottom + l->ntop; j++) {
        const char *b = word(c);
        if (!b) return fail_layer(c, l, "fewer blob names than the counts say");
        if (strlen(b) > MAX_NAME) return fail_layer(c, l, "a blob name longer than %d", MAX_NAME);
        int *slot = blob_slot(c, b);
        if (j < l->nbottom) {
            if (!*slot) return fail_layer(c, l, "blob %s is used before a layer makes it", b);
            c->blobs[*slot - 1].consumers++;
        } else {
            if (*slot)
                return fail_layer(c, l, "blob %s is made twice (first by line %d)", b,
                                  c->layers[c->blobs[*slot - 1].producer].line);
            if (c->nblobs == c->blob_count)
                return fail_layer(c, l, "more blobs than the %d of line 2", c->blob_count);
            nblob *nb = &c->blobs[c->nblobs];
            nb->name = b;
            nb->producer = c->nlayers;
            nb->root = l->type == L_SPLIT ? c->blobs[c->ids[l->ids]].root : c->nblobs;
            nb->consumers = 0;
            *slot = ++c->nblobs;
        }
        c->ids[c->nids++] = *slot - 1;
    }
    l->params = c->nparams;
    for (char *w; (w = word(c));)
        if (parse_param_word(c, l, w)) return -1;
    if (l->type == L_INPUT) {
        if (c->input >= 0) return fail_layer(c, l, "a second Input layer");
        c->input = c->ids[l->ids];
    }
    c->nlayers++;
    return check_layer(c, l);
}

static int parse_param(ncnn *c, const char *param, size_t len) {
    if (memchr(param, '\0', len))
        return fail_line(c, 1, "a NUL byte: not a text .param (a .param.bin is not supported)");
    c->text = malloc(len + 1);
    if (!c->text) {
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "%s: out of memory", c->plabel);
        return -1;
    }
    memcpy(c->text, param, len);
    c->text[len] = '\0';
    c->pos = c->text;
    c->end = c->text + len;
    /* the words bound every count: a blob, an id or a param each take one */
    size_t words = 0;
    for (size_t i = 0; i < len; i++)
        words += !strchr(" \t\r\n", c->text[i]) && (i == 0 || strchr(" \t\r\n", c->text[i - 1]));
    if (!next_line(c)) return fail_line(c, 1, "empty: not an ncnn .param");
    const char *w = word(c);
    if (strcmp(w, NCNN_MAGIC) || word(c))
        return fail_line(c, c->line, "not an ncnn .param: its first line is not the magic %s", NCNN_MAGIC);
    if (!next_line(c)) return fail_line(c, c->line, "no layer and blob counts after the magic");
    if (count_word(c, "layer count", &c->layer_count) || count_word(c, "blob count", &c->blob_count))
        return -1;
    if (word(c)) return fail_line(c, c->line, "more than the layer and blob counts");
    if (c->layer_count < 1 || c->blob_count < 1 || (size_t)c->layer_count > words / 4 ||
        (size_t)c->blob_count > words)
        return fail_line(c, c->line, "%d layers and %d blobs: more than the file holds, or none",
                         c->layer_count, c->blob_count);
    int hsize = 16;
    while (hsize < 2 * c->blob_count) hsize *= 2;
    c->hmask = hsize - 1;
    c->layers = calloc((size_t)c->layer_count, sizeof *c->layers);
    c->blobs = calloc((size_t)c->blob_count, sizeof *c->blobs);
    c->hash = calloc((size_t)hsize, sizeof *c->hash);
    c->ids = calloc(words, sizeof *c->ids);
    c->params = calloc(words, sizeof *c->params);
    if (!c->layers || !c->blobs || !c->hash || !c->ids || !c->params) {
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "%s: out of memory", c->plabel);
        return -1;
    }
    while (next_line(c)) {
        if (c->nlayers == c->layer_count)
            return fail_line(c, c->line, "more layers than the %d of line 2", c->layer_count);
        if (parse_layer(c)) return -1;
    }
    if (c->nlayers < c->layer_count)
        return fail_line(c, c->line, "%d layers, line 2 says %d", c->nlayers, c->layer_count);
    if (c->nblobs < c->blob_count)
        return fail_line(c, c->line, "%d blobs, line 2 says %d", c->nblobs, c->blob_count);
    if (c->input < 0) return fail_line(c, c->line, "no Input layer");
    return 0;
}

/* ------------------------------------------------------------------ the .bin */

/* Each layer's weights, in line order (ncnn's load_model: ModelBin::load
 * type 0, a tagged array, for a Convolution's weights; type 1, raw
 * float32, for biases and slopes). */
static int load_bin(ncnn *c, const unsigned char *bin, size_t len) {
    size_t off = 0;
    for (int i = 0; i < c->nlayers; i++) {
        nlayer *l = &c->layers[i];
        size_t raw;
        if (l->type == L_CONV) {
            size_t n = (size_t)iparam(c, l, 6, 0), need;
            uint32_t tag;
            if (len - off < 4) goto truncated;
            memcpy(&tag, bin + off, 4);
            if (tag == TAG_F16) {
                l->wtype = DTYPE_F16;
                need = (2 * n + 3) / 4 * 4;
            } else if (tag == TAG_F32 || tag == TAG_F32_SCALED) {
                l->wtype = DTYPE_F32;
                need = 4 * n;
            } else {
                sdx4_set_error(SDX4_ERR_MODEL, "%s: layer %s (%s:%d): weights at byte %zu have tag 0x%08x, "
                               "%s", c->blabel, l->name, c->plabel, l->line, off, tag,
                               tag == TAG_INT8 ? "int8 (quantised weights are not supported)"
                                               : "neither float16 (0x01306b47) nor float32 (0)");
                return -1;
            }
            off += 4;
            if (len - off < need) goto truncated;
            l->weight = bin + off;
            off += need;
            raw = (size_t)iparam(c, l, 0, 0);
        } else if (l->type == L_PRELU) {
            raw = (size_t)iparam(c, l, 0, 0);
        } else {
            continue;
        }
        if ((len - off) / 4 < raw) goto truncated;
        l->raw = bin + off;
        off += 4 * raw;
        continue;
    truncated:
        sdx4_set_error(SDX4_ERR_MODEL, "%s: layer %s (%s:%d): the file ends at byte %zu, inside "
                       "this layer's weights (a truncated .bin, or another model's)",
                       c->blabel, l->name, c->plabel, l->line, len);
        return -1;
    }
    if (off != len) {
        sdx4_set_error(SDX4_ERR_MODEL, "%s: %zu bytes after the last layer's weights (at byte %zu): "
                       "not this .param's .bin", c->blabel, len - off, off);
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------ the graph walk */

/* An activation function (backend.h has the ACT_ names). */
typedef enum { FN_NONE, FN_LEAKY, FN_PRELU } fn_kind;

/* The activation after a convolution: FN_LEAKY's slope 0 is ReLU. */
typedef struct {
    fn_kind kind;
    double slope;
    const nlayer *prelu;
} act;

static nlayer *producer(const ncnn *c, int blob) {
    return &c->layers[c->blobs[c->blobs[blob].root].producer];
}

/* Layer l's j-th bottom, through Splits. */
static int bottom(const ncnn *c, const nlayer *l, int j) {
    return c->blobs[c->ids[l->ids + j]].root;
}

static int visit(ncnn *c, nlayer *l) {
    if (l->used) return fail_layer(c, l, "reached twice by %s's graph", c->arch);
    l->used = 1;
    return 0;
}

/* The layer that makes `blob`, visited, when it is of type t; else NULL
 * with an error saying what the architecture has there. */
static nlayer *expect(ncnn *c, int blob, ltype t, const char *what) {
    nlayer *l = producer(c, blob);
    if (l->type != t) {
        fail_layer(c, l, "found where %s has %s (a %s)", c->arch, what, types[t].name);
        return NULL;
    }
    return visit(c, l) ? NULL : l;
}

/* The Convolution that makes `blob`, with the activation between them:
 * fused into it (9=1, 9=2) or a ReLU or PReLU layer after it. */
static nlayer *conv_at(ncnn *c, int blob, const char *what, act *a) {
    nlayer *l = producer(c, blob);
    memset(a, 0, sizeof *a);
    if (l->type == L_RELU || l->type == L_PRELU) {
        a->kind = l->type == L_RELU ? FN_LEAKY : FN_PRELU;
        if (l->type == L_RELU) a->slope = fparam(c, l, 0, 0);
        else a->prelu = l;
        if (visit(c, l)) return NULL;
        l = producer(c, bottom(c, l, 0));
        if (l->type == L_CONV && iparam(c, l, 9, 0)) {
            fail_layer(c, l, "an activation fused into it and another after it");
            return NULL;
        }
    } else if (l->type == L_CONV && iparam(c, l, 9, 0)) {
        a->kind = FN_LEAKY;
        a->slope = iparam(c, l, 9, 0) == 2 ? param(c, l, 10)->v[0] : 0;
    }
    if (l->type != L_CONV) {
        fail_layer(c, l, "found where %s has %s (a Convolution)", c->arch, what);
        return NULL;
    }
    return visit(c, l) ? NULL : l;
}

static const char *act_text(const act *a, char *buf, size_t size) {
    if (a->kind == FN_NONE) return "none";
    if (a->kind == FN_PRELU) return "PReLU";
    if (a->slope == 0) return "ReLU";
    snprintf(buf, size, "LeakyReLU(%g)", a->slope);
    return buf;
}

/* The conv's activation is `want` (FN_NONE, or FN_LEAKY with `slope`). */
static int check_act(ncnn *c, const nlayer *conv, const char *what, const act *a, fn_kind want,
                     double slope) {
    if (a->kind == want && (want != FN_LEAKY || fabs(a->slope - slope) < 1e-6)) return 0;
    char buf[64], wbuf[64];
    act w = {want, slope, NULL};
    return fail_layer(c, conv, "%s's activation is %s; %s has %s", what, act_text(a, buf, sizeof buf),
                      c->arch, act_text(&w, wbuf, sizeof wbuf));
}

/* The add that makes `blob`: its operands and their coefficients
 * (BinaryOp add: 1 and 1; Eltwise sum: its coefficients, else 1 and 1). */
static nlayer *add_at(ncnn *c, int blob, const char *what, int opd[2], double co[2]) {
    nlayer *l = producer(c, blob);
    if (l->type != L_BINARYOP && l->type != L_ELTWISE) {
        fail_layer(c, l, "found where %s has %s (a BinaryOp or Eltwise add)", c->arch, what);
        return NULL;
    }
    const nparam *p = l->type == L_ELTWISE ? param(c, l, 1) : NULL;
    for (int j = 0; j < 2; j++) {
        opd[j] = bottom(c, l, j);
        co[j] = p ? p->v[j] : 1;
    }
    return visit(c, l) ? NULL : l;
}

/* A residual 0.2 * block + skip (RRDBNet's dense blocks and RRDBs). */
static int residual_at(ncnn *c, int blob, const char *what, int *block, int *skip) {
    int opd[2];
    double co[2];
    nlayer *l = add_at(c, blob, what, opd, co);
    if (!l) return -1;
    for (int j = 0; j < 2; j++) {
        if (fabs(co[j] - 0.2) < 1e-6 && fabs(co[1 - j] - 1) < 1e-6) {
            *block = opd[j];
            *skip = opd[1 - j];
            return 0;
        }
    }
    return fail_layer(c, l, "%s is %g * a + %g * b; RRDBNet's is 0.2 * block + x", what, co[0], co[1]);
}

/* The Concat that makes `blob`, of n inputs in PyTorch's order `want`
 * (-1: any). */
static nlayer *concat_at(ncnn *c, int blob, const char *what, const int *want, int n) {
    nlayer *l = expect(c, blob, L_CONCAT, what);
    if (!l) return NULL;
    if (l->nbottom != n) {
        fail_layer(c, l, "%d inputs; %s has %d", l->nbottom, what, n);
        return NULL;
    }
    for (int j = 0; j < n; j++) {
        if (want[j] >= 0 && bottom(c, l, j) != want[j]) {
            fail_layer(c, l, "input %d is not the blob %s has there (x, x1, x2, ... in PyTorch's order)",
                       j + 1, what);
            return NULL;
        }
    }
    return l;
}

/* The nearest Interp by `factor` that makes `blob`: its input. */
static int upsample_at(ncnn *c, int blob, const char *what, int factor) {
    nlayer *l = expect(c, blob, L_INTERP, what);
    if (!l) return -1;
    if (iparam(c, l, 0, 0) != 1 || fparam(c, l, 1, 1) != factor || fparam(c, l, 2, 1) != factor)
        return fail_layer(c, l, "resize type %d by %g x %g; %s is nearest by %d", iparam(c, l, 0, 0),
                          fparam(c, l, 1, 1), fparam(c, l, 2, 1), what, factor);
    return bottom(c, l, 0);
}

/* Appends a tensor whose data is in the .bin (or its copy of the param). */
static int emit(ncnn *c, const char *name, dtype type, int ndim, int64_t d0, int64_t d1,
                const void *data) {
    int64_t shape[4] = {d0, d1, 3, 3};
    return sdx4_state_dict_add(c->sd, name, type, ndim, shape, data);
}

/* Convolution l as <name>.weight [out, in, 3, 3] and <name>.bias [out]. */
static int emit_conv(ncnn *c, const nlayer *l, const char *name, int in, int out) {
    char key[96];
    if (iparam(c, l, 0, 0) != out || conv_in(c, l) != in)
        return fail_layer(c, l, "%s is %d -> %d channels; this graph's config needs %d -> %d", name,
                          conv_in(c, l), iparam(c, l, 0, 0), in, out);
    snprintf(key, sizeof key, "%s.weight", name);
    if (emit(c, key, l->wtype, 4, out, in, l->weight)) return -1;
    snprintf(key, sizeof key, "%s.bias", name);
    return emit(c, key, DTYPE_F32, 1, out, 0, l->raw);
}

/* ------------------------------------------------------------------ RRDBNet */

/* The ResidualDenseBlock whose output is `blob`:
 *   x_k = lrelu(conv_k(cat(x_0, ..., x_{k-1}))), k = 1..4
 *   out = conv5(cat(x_0, ..., x_4)) * 0.2 + x_0
 * Sets *in to x_0 and conv[0..4]; conv5's Concat names x_1..x_4, and the
 * other Concats must take the same blobs. */
static int rdb_at(ncnn *c, int blob, const char *name, int *in, nlayer *conv[5]) {
    char what[96];
    int x[5] = {-1, -1, -1, -1, -1}, block;
    act a;
    snprintf(what, sizeof what, "%s's residual", name);
    if (residual_at(c, blob, what, &block, &x[0])) return -1;
    for (int k = 4; k >= 0; k--) {
        snprintf(what, sizeof what, "%s.conv%d", name, k + 1);
        if (!(conv[k] = conv_at(c, k == 4 ? block : x[k + 1], what, &a)) ||
            check_act(c, conv[k], what, &a, k == 4 ? FN_NONE : FN_LEAKY, 0.2))
            return -1;
        int src = bottom(c, conv[k], 0);
        if (k == 0) {
            if (src != x[0]) return fail_layer(c, conv[0], "%s.conv1's input is not the block's", name);
            break;
        }
        snprintf(what, sizeof what, "%s.conv%d's input", name, k + 1);
        nlayer *cat = concat_at(c, src, what, x, k + 1);
        if (!cat) return -1;
        if (k == 4)
            for (int j = 1; j < 5; j++) x[j] = bottom(c, cat, j);
    }
    *in = x[0];
    return 0;
}

/* conv_first's input: the Input, or its pixel_unshuffle (a Reorg) for
 * scale 2 and 1. Sets *r to the unshuffle's factor; -1 when `blob` is
 * neither (without an error: the caller asks). */
static int unshuffled_input(const ncnn *c, int blob, int *r) {
    const nlayer *l = producer(c, blob);
    *r = 1;
    if (blob == c->input) return 0;
    if (l->type != L_REORG || bottom(c, l, 0) != c->input) return -1;
    *r = iparam(c, l, 0, 1);
    return 0;
}

/* RRDBNet (BasicSR's rrdbnet_arch.py), from conv_last back:
 *   feat = conv_first(pixel_unshuffle(x) or x)
 *   feat = feat + conv_body(body(feat))          body: num_block RRDBs
 *   feat = lrelu(conv_up1(up2x(feat))); feat = lrelu(conv_up2(up2x(feat)))
 *   out = conv_last(lrelu(conv_hr(feat)))
 * An RRDB is rdb3(rdb2(rdb1(x))) * 0.2 + x. */
static int rrdbnet(ncnn *c, int out) {
    static const char *tail[] = {"conv_last", "conv_hr", "conv_up2", "conv_up1"};
    nlayer *tl[4], *first = NULL, *body = NULL;
    int (*chain)[2] = NULL, nchain = 0, blob = out, r = 1, rc = -1;
    act a;
    c->arch = "RRDBNet";
    for (int i = 0; i < 4; i++) {
        if (!(tl[i] = conv_at(c, blob, tail[i], &a)) ||
            check_act(c, tl[i], tail[i], &a, i ? FN_LEAKY : FN_NONE, 0.2))
            return -1;
        blob = bottom(c, tl[i], 0);
        if (i >= 2 && (blob = upsample_at(c, blob, i == 2 ? "conv_up2's upsample" : "conv_up1's upsample",
                                          2)) < 0)
            return -1;
    }
    int opd[2], feat = -1;
    double co[2];
    nlayer *sum = add_at(c, blob, "feat + body_feat", opd, co);
    if (!sum) return -1;
    if (co[0] != 1 || co[1] != 1)
        return fail_layer(c, sum, "feat + body_feat is %g * a + %g * b", co[0], co[1]);
    for (int j = 0; j < 2 && feat < 0; j++) {
        const nlayer *p = producer(c, opd[j]);
        if (p->type == L_CONV && !unshuffled_input(c, bottom(c, p, 0), &r)) feat = j;
    }
    if (feat < 0) return fail_layer(c, sum, "neither input is conv_first's output");
    if (!(first = conv_at(c, opd[feat], "conv_first", &a)) ||
        check_act(c, first, "conv_first", &a, FN_NONE, 0) ||
        !(body = conv_at(c, opd[1 - feat], "conv_body", &a)) ||
        check_act(c, body, "conv_body", &a, FN_NONE, 0))
        return -1;
    if (r > 1) {
        nlayer *un = producer(c, bottom(c, first, 0));
        if (r != 2 && r != 4) return fail_layer(c, un, "pixel_unshuffle by %d; RRDBNet has 2 or 4", r);
        if (visit(c, un)) return -1;
    }
    feat = opd[feat];
    /* each RRDB's rdb3 output and input, last first */
    chain = malloc((size_t)c->nlayers * sizeof *chain);
    if (!chain) {
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "%s: out of memory", c->plabel);
        return -1;
    }
    for (blob = bottom(c, body, 0); blob != feat; nchain++) {
        if (residual_at(c, blob, "an RRDB's residual", &chain[nchain][0], &chain[nchain][1]))
            goto done;
        blob = chain[nchain][1];
    }
    if (nchain == 0) {
        fail_layer(c, body, "conv_body takes conv_first's output: no RRDB blocks");
        goto done;
    }
    gan_config *g = c->cfg;
    g->arch = ESRGAN_RRDBNET;
    g->num_feat = iparam(c, first, 0, 0);
    g->num_in_ch = conv_in(c, first) / (r * r);
    g->num_out_ch = iparam(c, tl[0], 0, 0);
    g->scale = 4 / r;
    g->num_block = nchain;
    if (conv_in(c, first) % (r * r)) {
        fail_layer(c, first, "%d input channels after a pixel_unshuffle by %d", conv_in(c, first), r);
        goto done;
    }
    if (emit_conv(c, first, "conv_first", g->num_in_ch * r * r, g->num_feat)) goto done;
    for (int i = 0; i < nchain; i++) {
        int inner = chain[nchain - 1 - i][0], x = chain[nchain - 1 - i][1];
        nlayer *conv[3][5];
        char name[3][48];
        for (int k = 2; k >= 0; k--) {
            snprintf(name[k], sizeof name[k], "body.%d.rdb%d", i, k + 1);
            if (rdb_at(c, inner, name[k], &inner, conv[k])) goto done;
        }
        if (inner != x) {
            fail_layer(c, conv[0][0], "body.%d.rdb1's input is not the RRDB's", i);
            goto done;
        }
        if (i == 0) g->num_grow_ch = iparam(c, conv[0][0], 0, 0);
        int nf = g->num_feat, gc = g->num_grow_ch;
        for (int k = 0; k < 3; k++)
            for (int j = 0; j < 5; j++) {
                char cname[64];
                snprintf(cname, sizeof cname, "%s.conv%d", name[k], j + 1);
                if (emit_conv(c, conv[k][j], cname, nf + j * gc, j == 4 ? nf : gc)) goto done;
            }
    }
    if (emit_conv(c, body, "conv_body", g->num_feat, g->num_feat)) goto done;
    for (int i = 3; i >= 0; i--)
        if (emit_conv(c, tl[i], tail[i], g->num_feat, i ? g->num_feat : g->num_out_ch)) goto done;
    rc = 0;
done:
    free(chain);
    return rc;
}

/* ---------------------------------------------------------- SRVGGNetCompact */

/* SRVGGNetCompact (BasicSR's srvgg_arch.py), from the output back:
 *   body: conv(in, feat), act, num_conv x (conv(feat, feat), act),
 *         conv(feat, out * upscale^2)
 *   out = pixel_shuffle(body(x), upscale) + nearest_upsample(x, upscale) */
static int srvgg(ncnn *c, int out) {
    int opd[2], rc = -1, n = 0;
    double co[2];
    c->arch = "SRVGGNetCompact";
    nlayer *sum = add_at(c, out, "the output's add", opd, co);
    if (!sum) return -1;
    if (co[0] != 1 || co[1] != 1)
        return fail_layer(c, sum, "the output is %g * a + %g * b", co[0], co[1]);
    int ps = producer(c, opd[0])->type == L_PIXELSHUFFLE ? 0 : 1;
    nlayer *shuffle = expect(c, opd[ps], L_PIXELSHUFFLE, "pixel_shuffle");
    if (!shuffle) return -1;
    int r = iparam(c, shuffle, 0, 1), up = upsample_at(c, opd[1 - ps], "the input's upsample", r);
    if (up < 0) return -1;
    if (up != c->input)
        return fail_layer(c, producer(c, opd[1 - ps]), "upsamples something other than the input");
    /* the convolutions and their activations, last first */
    nlayer **convs = malloc((size_t)c->nlayers * sizeof *convs);
    act *acts = malloc((size_t)c->nlayers * sizeof *acts);
    if (!convs || !acts) {
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "%s: out of memory", c->plabel);
        goto done;
    }
    for (int blob = bottom(c, shuffle, 0); n == 0 || blob != c->input; n++) {
        if (!(convs[n] = conv_at(c, blob, n ? "a body convolution" : "the last convolution", &acts[n])))
            goto done;
        /* the last has none; the others all have the one before the last's */
        if (n == 0 ? check_act(c, convs[0], "the last convolution", &acts[0], FN_NONE, 0)
                   : check_act(c, convs[n], "this convolution", &acts[n], acts[1].kind, acts[1].slope))
            goto done;
        blob = bottom(c, convs[n], 0);
    }
    if (n < 2) {
        fail_layer(c, convs[0], "the last convolution takes the input: no body");
        goto done;
    }
    gan_config *g = c->cfg;
    const nlayer *first = convs[n - 1];
    g->arch = ESRGAN_SRVGG;
    g->num_in_ch = conv_in(c, first);
    g->num_feat = iparam(c, first, 0, 0);
    g->num_out_ch = iparam(c, convs[0], 0, 0) / (r * r);
    g->scale = r;
    g->num_conv = n - 2;
    if (acts[1].kind == FN_PRELU) {
        g->act = GAN_ACT_PRELU;
    } else if (acts[1].kind == FN_LEAKY && acts[1].slope == 0) {
        g->act = GAN_ACT_RELU;
    } else if (acts[1].kind == FN_LEAKY && fabs(acts[1].slope - 0.1) < 1e-6) {
        g->act = GAN_ACT_LEAKYRELU;
    } else {
        char buf[64];
        fail_layer(c, first, "activation %s; SRVGGNetCompact has PReLU, ReLU or LeakyReLU(0.1)",
                   act_text(&acts[1], buf, sizeof buf));
        goto done;
    }
    if (iparam(c, convs[0], 0, 0) % (r * r)) {
        fail_layer(c, convs[0], "%d outputs for a pixel_shuffle by %d", iparam(c, convs[0], 0, 0), r);
        goto done;
    }
    if (g->num_in_ch != g->num_out_ch) {
        fail_layer(c, sum, "adds %d upsampled input channels to %d output channels", g->num_in_ch,
                   g->num_out_ch);
        goto done;
    }
    for (int i = 0; i < n; i++) {
        const nlayer *l = convs[n - 1 - i];
        const act *la = &acts[n - 1 - i];
        char name[48];
        snprintf(name, sizeof name, "body.%d", 2 * i);
        if (emit_conv(c, l, name, i ? g->num_feat : g->num_in_ch,
                      i < n - 1 ? g->num_feat : g->num_out_ch * r * r))
            goto done;
        if (la->kind != FN_PRELU) continue;
        snprintf(name, sizeof name, "body.%d.weight", 2 * i + 1);
        if (iparam(c, la->prelu, 0, 0) != g->num_feat) {
            fail_layer(c, la->prelu, "%d slopes for %d channels", iparam(c, la->prelu, 0, 0), g->num_feat);
            goto done;
        }
        if (emit(c, name, DTYPE_F32, 1, g->num_feat, 0, la->prelu->raw)) goto done;
    }
    rc = 0;
done:
    free(convs);
    free(acts);
    return rc;
}

/* ------------------------------------------------------------------ the API */

/* A bicubic Interp down after the network, as the output's side per input
 * side (outscale) of a network that upscales by `scale`; -1 with the error
 * set when it is another resize. */
static int outscale_of(ncnn *c, nlayer *l, int scale) {
    double f = fparam(c, l, 1, 1), k = f * scale;
    if (iparam(c, l, 0, 0) != 3 || fparam(c, l, 2, 1) != f || f >= 1 || fabs(k - round(k)) > 1e-5 ||
        round(k) < 1)
        return fail_layer(c, l, "resize type %d by %g x %g after the network: only a bicubic resize down "
                          "to a whole multiple of the input (outscale) is", iparam(c, l, 0, 0), f,
                          fparam(c, l, 2, 1));
    return (int)round(k);
}

/* The output (the one blob no layer takes, but a Split's copy), the
 * architecture that ends in its producer (or in the input of a resize
 * after it), and a visit of every layer. */
static int recognise(ncnn *c) {
    int out = -1;
    for (int b = 0; b < c->nblobs; b++) {
        if (c->blobs[b].consumers || c->layers[c->blobs[b].producer].type == L_SPLIT) continue;
        if (out >= 0)
            return fail_layer(c, &c->layers[c->blobs[b].producer],
                              "its output %s is taken by no layer, nor is %s (line %d): two outputs",
                              c->blobs[b].name, c->blobs[out].name, c->layers[c->blobs[out].producer].line);
        out = b;
    }
    if (out < 0) return fail_line(c, c->line, "no output: every blob is taken by a layer");
    nlayer *l = producer(c, out), *resize = NULL;
    if (l->type == L_INTERP) {
        resize = l;
        l->used = 1;
        out = bottom(c, l, 0);
        l = producer(c, out);
    }
    int rc;
    if (l->type == L_CONV || l->type == L_RELU || l->type == L_PRELU) {
        rc = rrdbnet(c, out);
    } else if (l->type == L_BINARYOP || l->type == L_ELTWISE) {
        rc = srvgg(c, out);
    } else {
        return fail_layer(c, l, "makes the output; RRDBNet ends in a Convolution, SRVGGNetCompact "
                          "in an add of the upsampled input");
    }
    if (rc) return -1;
    c->cfg->outscale = resize ? outscale_of(c, resize, c->cfg->scale) : c->cfg->scale;
    if (c->cfg->outscale < 0) return -1;
    for (int i = 0; i < c->nlayers; i++) {
        l = &c->layers[i];
        if (!l->used && l->type != L_INPUT && l->type != L_SPLIT)
            return fail_layer(c, l, "not part of the %s that makes the output", c->arch);
    }
    l = producer(c, c->input);
    if (iparam(c, l, 2, 0) && iparam(c, l, 2, 0) != c->cfg->num_in_ch)
        return fail_layer(c, l, "%d channels; the network takes %d", iparam(c, l, 2, 0), c->cfg->num_in_ch);
    return 0;
}

int sdx4_ncnn_parse(const char *param, size_t param_len, const char *param_label, const void *bin,
                    size_t bin_len, const char *bin_label, gan_config *cfg, state_dict *sd) {
    ncnn c = {.plabel = param_label, .blabel = bin_label, .input = -1, .cfg = cfg, .sd = sd};
    memset(cfg, 0, sizeof *cfg);
    memset(sd, 0, sizeof *sd);
    int rc = parse_param(&c, param, param_len) || load_bin(&c, bin, bin_len) || recognise(&c);
    if (rc) sdx4_state_dict_free(sd);
    free(c.text);
    free(c.layers);
    free(c.blobs);
    free(c.hash);
    free(c.ids);
    free(c.params);
    return rc ? -1 : 0;
}

/* The whole file, malloc'd (a byte more, so that an empty file has one). */
static char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        sdx4_set_error(SDX4_ERR_IO, "%s: %s", path, strerror(errno));
        return NULL;
    }
    char *buf = NULL;
    long size = fseek(f, 0, SEEK_END) ? -1 : ftell(f);
    errno = 0;
    if (size >= 0 && fseek(f, 0, SEEK_SET) == 0 && (buf = malloc((size_t)size + 1)) &&
        fread(buf, 1, (size_t)size, f) == (size_t)size) {
        fclose(f);
        *len = (size_t)size;
        return buf;
    }
    if (size >= 0 && !buf)
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "%s: out of memory (%ld bytes)", path, size);
    else
        sdx4_set_error(SDX4_ERR_IO, "%s: %s", path, errno ? strerror(errno) : "could not be read");
    free(buf);
    fclose(f);
    return NULL;
}

int sdx4_ncnn_import(const char *param_path, const char *bin_path, gan_config *cfg, state_dict *sd) {
    size_t plen, blen;
    char *param = read_file(param_path, &plen), *bin = param ? read_file(bin_path, &blen) : NULL;
    int rc = bin ? sdx4_ncnn_parse(param, plen, param_path, bin, blen, bin_path, cfg, sd) : -1;
    if (!bin) {
        memset(cfg, 0, sizeof *cfg);
        memset(sd, 0, sizeof *sd);
    }
    free(param);
    free(bin);
    return rc;
}
