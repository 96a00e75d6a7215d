/*
 * form.c - parsing and checking of upscale inputs (see form.h).
 *
 * A table lists every field with its type; the engine's parameters take
 * their ranges and defaults from the engine's own table (sdx4_params), so
 * the server cannot accept what the engine refuses nor document another
 * default, and the server's own fields carry theirs. Text values (from
 * multipart and the query string) and JSON values go through the same
 * checks, so a field is accepted or refused identically whatever the
 * encoding. Numbers from text follow a strict decimal grammar: "nan",
 * "inf", hex floats, blanks and trailing junk are refused before strtod
 * ever sees them. Prompts must be UTF-8 (overlong forms and surrogates
 * refused); tab, CR and LF become spaces, other control characters are
 * refused. A field set twice is an error rather than a silent overwrite.
 */
#include "form.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <jansson.h>

#include "base64.h"

typedef enum { KIND_TEXT, KIND_REAL, KIND_INT, KIND_SEED, KIND_FORMAT, KIND_BOOL, KIND_URL, KIND_CHOICE, KIND_MODEL } field_kind;

enum { FIELD_WEBHOOK = FIELD_OPTION_COUNT, FIELD_ASYNC, FIELD_IMAGE, FIELD_MODEL };

/* A field named like a row of the engine's table (sdx4_params) takes its
 * range and default from there; the server only narrows
 * num_inference_steps to its max-steps. The others are the server's own:
 * how the result is encoded and delivered. */
typedef struct {
    const char *name;
    int id;
    field_kind kind;
    double min, max;     /* the server's own numbers */
    const char *allowed; /* NULL: the range, as text */
} field_def;

static const field_def fields[] = {
    {"prompt", FIELD_PROMPT, KIND_TEXT, 0, 0, "UTF-8 text"},
    {"negative_prompt", FIELD_NEGATIVE_PROMPT, KIND_TEXT, 0, 0, "UTF-8 text"},
    {"noise_level", FIELD_NOISE_LEVEL, KIND_REAL, 0, 0, NULL},
    {"num_inference_steps", FIELD_STEPS, KIND_INT, 0, 0, NULL},
    {"guidance_scale", FIELD_GUIDANCE, KIND_REAL, 0, 0, NULL},
    {"seed", FIELD_SEED, KIND_SEED, 0, 0, NULL},
    {"eta", FIELD_ETA, KIND_REAL, 0, 0, NULL},
    {"vae_tiling", FIELD_VAE_TILING, KIND_CHOICE, 0, 0, "off, on or auto"},
    {"tile", FIELD_TILE, KIND_INT, 0, 0, NULL},
    {"tile_overlap", FIELD_TILE_OVERLAP, KIND_INT, 0, 0, NULL},
    {"scheduler", FIELD_SCHEDULER, KIND_TEXT, 0, 0, "ddim, ddpm, pndm, euler, euler-a, heun, dpm2, dpm2-a, lms, dpm++2m, dpm++2s, deis, unipc or a diffusers class name"},
    {"scheduler_options", FIELD_SCHEDULER_OPTIONS, KIND_TEXT, 0, 0, "a JSON object"},
    {"output_format", FIELD_FORMAT, KIND_FORMAT, 0, 0, "png, jpeg or webp"},
    {"quality", FIELD_QUALITY, KIND_INT, 1, 100, "1 to 100"},
    {"metadata", FIELD_METADATA, KIND_BOOL, 0, 0, "true or false"},
    {"webhook_url", FIELD_WEBHOOK, KIND_URL, 0, 0, "an http:// or https:// URL"},
    {"async", FIELD_ASYNC, KIND_BOOL, 0, 0, "true or false"},
    {"model", FIELD_MODEL, KIND_MODEL, 0, 0, "a model this server serves (GET /api/v1/models)"},
};
enum { FIELD_COUNT = sizeof fields / sizeof fields[0] };

/* A client-supplied name, made safe to quote in a problem. */
static void printable(char *out, size_t size, const char *in, size_t len) {
    size_t n = 0;
    for (size_t i = 0; i < len && n + 1 < size; i++)
        out[n++] = in[i] >= 0x20 && in[i] < 0x7f && in[i] != '"' ? in[i] : '?';
    out[n] = '\0';
}

static int fail(upscale_form *f) { return f->error.kind ? -1 : 0; }

int form_init(upscale_form *f, const form_limits *limits, form_kind kind) {
    memset(f, 0, sizeof *f);
    f->limits = *limits;
    f->kind = kind;
    f->batch = kind == FORM_BATCH;
    if (f->batch && !(f->per = calloc(FORM_MAX_IMAGES, sizeof *f->per))) return -1;
    return 0;
}

void options_free(upscale_options *o) {
    free(o->prompt);
    free(o->negative_prompt);
    free(o->scheduler);
    free(o->scheduler_options);
    free(o->vae_tiling);
    o->prompt = o->negative_prompt = o->scheduler = o->scheduler_options = o->vae_tiling = NULL;
}

void form_free(upscale_form *f) {
    options_free(&f->shared);
    if (f->per)
        for (int i = 0; i < FORM_MAX_IMAGES; i++) options_free(&f->per[i]);
    free(f->per);
    for (int i = 0; i < f->nimages; i++) free(f->images[i].data);
    free(f->webhook_url);
    memset(f, 0, sizeof *f);
}

/* ---- value checks --------------------------------------------------------- */

/* Returns the length of one UTF-8 character at s, or 0 if invalid. */
static size_t utf8_char(const unsigned char *s, size_t len, unsigned *cp) {
    if (s[0] < 0x80) return *cp = s[0], 1;
    size_t n;
    unsigned min;
    if ((s[0] & 0xe0) == 0xc0) n = 2, min = 0x80, *cp = s[0] & 0x1f;
    else if ((s[0] & 0xf0) == 0xe0) n = 3, min = 0x800, *cp = s[0] & 0x0f;
    else if ((s[0] & 0xf8) == 0xf0) n = 4, min = 0x10000, *cp = s[0] & 0x07;
    else return 0;
    if (n > len) return 0;
    for (size_t i = 1; i < n; i++) {
        if ((s[i] & 0xc0) != 0x80) return 0;
        *cp = *cp << 6 | (s[i] & 0x3f);
    }
    if (*cp < min || *cp > 0x10ffff || (*cp >= 0xd800 && *cp <= 0xdfff)) return 0;
    return n;
}

/* A text value; `more_chars` characters that followed the first `len`
 * bytes were not kept (the cut may fall inside a character). */
static int check_text(upscale_form *f, const field_def *d, const char *v, size_t len, size_t more_chars,
                      char **out) {
    char *text = malloc(len + 1);
    if (!text) return problem_set(&f->error, PROBLEM_INTERNAL, "out of memory");
    const unsigned char *s = (const unsigned char *)v;
    size_t chars = more_chars;
    for (size_t i = 0; i < len; chars++) {
        unsigned cp;
        size_t n = utf8_char(s + i, len - i, &cp);
        if (!n && more_chars && len - i < 4) {
            chars++; /* the character the cut fell in */
            break;
        }
        if (!n) {
            free(text);
            return problem_field(&f->error, d->name, "UTF-8 text", "%s is not valid UTF-8 (byte %zu)",
                                 d->name, i);
        }
        if (cp == '\t' || cp == '\n' || cp == '\r') text[i] = ' ';
        else if (cp < 0x20 || cp == 0x7f || (cp >= 0x80 && cp <= 0x9f)) {
            free(text);
            return problem_field(&f->error, d->name, "UTF-8 text without control characters",
                                 "%s contains the control character U+%04X", d->name, cp);
        } else memcpy(text + i, s + i, n);
        i += n;
    }
    if (chars > (size_t)f->limits.max_prompt_chars) {
        free(text);
        char allowed[64];
        snprintf(allowed, sizeof allowed, "at most %d characters", f->limits.max_prompt_chars);
        return problem_field(&f->error, d->name, allowed, "%s is %zu characters long; at most %d are allowed",
                             d->name, chars, f->limits.max_prompt_chars);
    }
    text[len] = '\0';
    *out = text;
    return 0;
}

/* Strict decimal: [+-]? (digits [. digits?] | . digits) ([eE] [+-]? digits)? */
static bool decimal_syntax(const char *s, size_t len, bool integer) {
    size_t i = 0, digits = 0;
    if (i < len && (s[i] == '+' || s[i] == '-')) i++;
    while (i < len && isdigit((unsigned char)s[i])) i++, digits++;
    if (integer) return digits > 0 && i == len;
    if (i < len && s[i] == '.') {
        i++;
        while (i < len && isdigit((unsigned char)s[i])) i++, digits++;
    }
    if (!digits) return false;
    if (i < len && (s[i] == 'e' || s[i] == 'E')) {
        i++;
        if (i < len && (s[i] == '+' || s[i] == '-')) i++;
        size_t exp = 0;
        while (i < len && isdigit((unsigned char)s[i])) i++, exp++;
        if (!exp) return false;
    }
    return i == len;
}

/* The range of a number field as this server accepts it. */
static void field_range(const form_limits *limits, const field_def *d, double *min, double *max) {
    const sdx4_param *p = sdx4_param_find(d->name);
    if (!p) {
        *min = d->min, *max = d->max;
        return;
    }
    bool real = p->type == SDX4_PARAM_REAL;
    *min = real ? p->real_min : (double)p->int_min;
    *max = real ? p->real_max : (double)p->int_max;
    if (d->id == FIELD_STEPS && limits->max_steps < *max) *max = limits->max_steps;
}

static uint64_t seed_max(void) { return (uint64_t)sdx4_param_find("seed")->int_max; }

/* What a field accepts, for problems: "0 to 50", "UTF-8 text". */
static void allowed_text(const upscale_form *f, const field_def *d, char *buf, size_t size) {
    double min, max;
    if (d->allowed) snprintf(buf, size, "%s", d->allowed);
    else if (d->kind == KIND_SEED) snprintf(buf, size, "0 to %llu", (unsigned long long)seed_max());
    else field_range(&f->limits, d, &min, &max), snprintf(buf, size, "%g to %g", min, max);
}

static int bad_number(upscale_form *f, const field_def *d, const char *what) {
    char allowed[96];
    allowed_text(f, d, allowed, sizeof allowed);
    return problem_field(&f->error, d->name, allowed, "%s must be %s from %s", d->name, what, allowed);
}

static int bad_seed(upscale_form *f, const field_def *d) {
    char allowed[96];
    allowed_text(f, d, allowed, sizeof allowed);
    return problem_field(&f->error, d->name, allowed, "seed must be an integer from %s", allowed);
}

/* A tile within the row's range, as the engine checks it alone (0, or
 * SDX4_MIN_TILE and more); whether the overlap is below it waits for both
 * (form_finish). */
static int check_tile(upscale_form *f, upscale_options *o, const field_def *d, int tile) {
    sdx4_upscale_params p;
    sdx4_upscale_params_default(&p);
    p.tile = tile, p.tile_overlap = 0;
    if (sdx4_check_params(&p) != SDX4_OK) {
        char allowed[64];
        snprintf(allowed, sizeof allowed, "0 or %d to %lld", SDX4_MIN_TILE,
                 (long long)sdx4_param_find("tile")->int_max);
        return problem_field(&f->error, d->name, allowed, "%s", sdx4_last_error());
    }
    o->tile = tile;
    return 0;
}

/* Stores a checked value into the options (or the form for form-wide fields). */
static int store_number(upscale_form *f, upscale_options *o, const field_def *d, double v) {
    const char *what = d->kind == KIND_INT ? "an integer" : "a number";
    double min, max;
    field_range(&f->limits, d, &min, &max);
    if (!isfinite(v) || v < min || v > max) return bad_number(f, d, what);
    switch (d->id) {
    case FIELD_NOISE_LEVEL: o->noise_level = v; break;
    case FIELD_STEPS: o->steps = (int)v; break;
    case FIELD_GUIDANCE: o->guidance_scale = v; break;
    case FIELD_ETA: o->eta = v; break;
    case FIELD_QUALITY: o->quality = (int)v; break;
    case FIELD_TILE: return check_tile(f, o, d, (int)v);
    case FIELD_TILE_OVERLAP: o->tile_overlap = (int)v; break;
    }
    return 0;
}

static int parse_format(const char *v, size_t len, image_format *out) {
    static const struct {
        const char *name;
        image_format f;
    } names[] = {{"png", IMAGE_PNG}, {"jpeg", IMAGE_JPEG}, {"jpg", IMAGE_JPEG}, {"webp", IMAGE_WEBP}};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (strlen(names[i].name) == len && strncasecmp(v, names[i].name, len) == 0) {
            *out = names[i].f;
            return 0;
        }
    return -1;
}

static int check_url(upscale_form *f, const field_def *d, const char *v, size_t len) {
    /* values are not NUL-terminated: compare within len */
    bool ok = len <= 2048 && ((len > 7 && strncasecmp(v, "http://", 7) == 0) ||
                              (len > 8 && strncasecmp(v, "https://", 8) == 0));
    for (size_t i = 0; ok && i < len; i++) ok = v[i] > 0x20 && v[i] < 0x7f;
    if (!ok)
        return problem_field(&f->error, d->name, d->allowed,
                             "%s must be an http:// or https:// URL of at most 2048 characters", d->name);
    free(f->webhook_url);
    f->webhook_url = strndup(v, len);
    return 0;
}

/* A boolean: async (the form's) or metadata (the options'). */
static void store_bool(upscale_form *f, upscale_options *o, const field_def *d, bool v) {
    if (d->id == FIELD_ASYNC) f->async = v;
    else o->metadata = v;
}

/* ---- fields by name --------------------------------------------------------- */

/* Finds the field and the options it applies to, from "name" or "name[i]". */
static const field_def *lookup(upscale_form *f, const char *name, size_t name_len,
                               upscale_options **target, int *image) {
    size_t base = name_len;
    *image = -1;
    if (f->batch && name_len > 3 && name[name_len - 1] == ']') {
        const char *open = memchr(name, '[', name_len);
        if (open && open + 1 < name + name_len - 1) {
            long i = 0;
            for (const char *p = open + 1; p < name + name_len - 1; p++) {
                if (!isdigit((unsigned char)*p) || i > FORM_MAX_IMAGES) return NULL;
                i = i * 10 + (*p - '0');
            }
            if (i >= f->limits.max_batch) return NULL;
            *image = (int)i;
            base = (size_t)(open - name);
        }
    }
    for (int k = 0; k < FIELD_COUNT; k++) {
        const field_def *d = &fields[k];
        if (strlen(d->name) != base || strncmp(d->name, name, base) != 0) continue;
        if (d->id >= FIELD_OPTION_COUNT && *image >= 0) return NULL; /* form-wide only */
        if ((d->id == FIELD_ASYNC && !f->batch) || (d->id == FIELD_WEBHOOK && f->kind == FORM_UPSCALE))
            return NULL;
        *target = *image >= 0 ? &f->per[*image] : &f->shared;
        return d;
    }
    return NULL;
}

static int unknown_field(upscale_form *f, const char *name, size_t len) {
    char shown[40];
    printable(shown, sizeof shown, name, len);
    return problem_field(&f->error, shown, NULL, "unknown field \"%s\"", shown);
}

/* The scheduler fields as the engine checks them without a model (the
 * model's config can still refuse an option: runner.c makes that a 422).
 * Options are stored as JSON with sorted keys, so that the same choice
 * is the same cache key; "" is the model's own, stored as NULL. */
static int check_scheduler(upscale_form *f, const field_def *d, char **text) {
    sdx4_upscale_params p;
    sdx4_upscale_params_default(&p);
    if (d->id == FIELD_SCHEDULER) p.scheduler = *text;
    else p.scheduler_options = *text;
    if (sdx4_check_params(&p) != SDX4_OK) {
        free(*text);
        *text = NULL;
        return problem_field(&f->error, d->name, d->allowed, "%s", sdx4_last_error());
    }
    if (!**text) {
        free(*text);
        *text = NULL;
    } else if (d->id == FIELD_SCHEDULER_OPTIONS) {
        json_t *o = json_loads(*text, 0, NULL);
        char *sorted = json_dumps(o, JSON_COMPACT | JSON_SORT_KEYS);
        json_decref(o);
        if (!sorted) return problem_set(&f->error, PROBLEM_INTERNAL, "out of memory");
        free(*text);
        *text = sorted;
    }
    return 0;
}

/* One of the engine row's choices, into vae_tiling (the only field of
 * choices); the default is stored as NULL, so that naming it is the same
 * cache key as leaving it out. */
static int apply_choice(upscale_form *f, upscale_options *o, const field_def *d, const char *v, size_t len) {
    const sdx4_param *p = sdx4_param_find(d->name);
    for (int i = 0; p->choices[i]; i++) {
        if (strlen(p->choices[i]) != len || strncmp(p->choices[i], v, len)) continue;
        free(o->vae_tiling);
        o->vae_tiling = NULL;
        if (i != p->int_default && !(o->vae_tiling = strdup(p->choices[i])))
            return problem_set(&f->error, PROBLEM_INTERNAL, "out of memory");
        return 0;
    }
    return problem_field(&f->error, d->name, d->allowed, "%s must be %s", d->name, d->allowed);
}

/* The `model` field: one of the server's models, by exact name. The
 * problem lists them (the detail whole, `allowed` as far as it fits). */
static int apply_model(upscale_form *f, const field_def *d, const char *v, size_t len) {
    for (int i = 0; i < f->limits.nmodels; i++)
        if (strlen(f->limits.models[i]) == len && strncmp(f->limits.models[i], v, len) == 0) {
            f->model = i;
            return 0;
        }
    char shown[72], names[256] = "", allowed[sizeof f->error.allowed];
    printable(shown, sizeof shown, v, len);
    for (int i = 0; i < f->limits.nmodels; i++) {
        size_t n = strlen(names);
        snprintf(names + n, sizeof names - n, "%s%s", i == 0 ? "" : i == f->limits.nmodels - 1 ? " or " : ", ",
                 f->limits.models[i]);
    }
    snprintf(allowed, sizeof allowed, "%s", f->limits.nmodels ? names : d->allowed);
    return problem_field(&f->error, d->name, allowed, "unknown model \"%s\": this server serves %s", shown,
                         f->limits.nmodels ? names : "no model by name");
}

/* Marks a field as given; refuses a second value. */
static int claim(upscale_form *f, upscale_options *o, const field_def *d) {
    unsigned bit = 1u << d->id;
    if (o->given & bit)
        return problem_field(&f->error, d->name, NULL, "%s is given more than once", d->name);
    o->given |= bit;
    return 0;
}

/* Parses a text value into `o` (or the form, for form-wide fields); the
 * field has been claimed. A value cut short (more_chars > 0) is too long
 * for any field, and is refused as such. */
static int apply_text(upscale_form *f, upscale_options *o, const field_def *d, const char *v,
                      size_t len, size_t more_chars) {
    char buf[64], *end;
    if (more_chars && d->kind != KIND_TEXT) {
        allowed_text(f, d, buf, sizeof buf);
        return problem_field(&f->error, d->name, buf, "%s is too long (over %zu bytes)", d->name, len);
    }
    switch (d->kind) {
    case KIND_TEXT: {
        char *text = NULL;
        if (check_text(f, d, v, len, more_chars, &text)) return -1;
        if ((d->id == FIELD_SCHEDULER || d->id == FIELD_SCHEDULER_OPTIONS) &&
            check_scheduler(f, d, &text))
            return -1;
        char **slot = d->id == FIELD_PROMPT            ? &o->prompt
                      : d->id == FIELD_NEGATIVE_PROMPT ? &o->negative_prompt
                      : d->id == FIELD_SCHEDULER       ? &o->scheduler
                                                       : &o->scheduler_options;
        free(*slot);
        *slot = text;
        return 0;
    }
    case KIND_REAL:
    case KIND_INT: {
        const char *what = d->kind == KIND_INT ? "an integer" : "a number";
        if (len >= sizeof buf || !decimal_syntax(v, len, d->kind == KIND_INT))
            return bad_number(f, d, what);
        memcpy(buf, v, len);
        buf[len] = '\0';
        /* overflow gives HUGE_VAL, refused as not finite; underflow (ERANGE
         * too) a subnormal or zero, which is a number in range like any other */
        return store_number(f, o, d, strtod(buf, NULL));
    }
    case KIND_SEED: {
        if (len < 20 && decimal_syntax(v, len, true) && v[0] != '-') {
            memcpy(buf, v, len);
            buf[len] = '\0';
            errno = 0;
            unsigned long long seed = strtoull(buf, &end, 10);
            if (!errno && seed <= seed_max()) {
                o->seed = seed;
                return 0;
            }
        }
        return bad_seed(f, d);
    }
    case KIND_FORMAT:
        if (parse_format(v, len, &o->format))
            return problem_field(&f->error, d->name, d->allowed,
                                 "output_format must be png, jpeg or webp");
        return 0;
    case KIND_BOOL:
        if (len == 4 && strncasecmp(v, "true", 4) == 0) store_bool(f, o, d, true); /* a JSON boolean's text */
        else if (len == 5 && strncasecmp(v, "false", 5) == 0) store_bool(f, o, d, false);
        else
            return problem_field(&f->error, d->name, d->allowed, "%s must be true or false", d->name);
        return 0;
    case KIND_URL:
        return check_url(f, d, v, len);
    case KIND_CHOICE:
        return apply_choice(f, o, d, v, len);
    case KIND_MODEL:
        return apply_model(f, d, v, len);
    }
    return 0;
}

int form_set_text(upscale_form *f, const char *name, const char *v, size_t len) {
    return form_set_cut_text(f, name, v, len, 0);
}

int form_set_cut_text(upscale_form *f, const char *name, const char *v, size_t len, size_t more_chars) {
    if (f->error.kind) return -1;
    if (strcmp(name, "image") == 0 || (f->batch && strcmp(name, "images") == 0))
        return problem_field(&f->error, "image", "a file part",
                             "image must be sent as a file part of multipart/form-data");
    upscale_options *o;
    int image;
    size_t name_len = strlen(name);
    const field_def *d = lookup(f, name, name_len, &o, &image);
    if (!d) return unknown_field(f, name, name_len);
    if (claim(f, o, d)) return -1;
    return apply_text(f, o, d, v, len, more_chars);
}

/* ---- images ------------------------------------------------------------------ */

int form_image_begin(upscale_form *f) {
    if (f->error.kind) return -1;
    int max = f->batch ? f->limits.max_batch : 1;
    if (f->nimages >= max) {
        char allowed[32];
        snprintf(allowed, sizeof allowed, "at most %d", max);
        return problem_field(&f->error, "image", allowed,
                             f->batch ? "a batch holds at most %d images"
                                      : "only %d image per request (see /api/v1/batch-upscale)",
                             max);
    }
    f->nimages++;
    return 0;
}

int form_image_append(upscale_form *f, const void *data, size_t len) {
    if (f->error.kind) return -1;
    if (!len) return 0;
    if (!f->nimages) return problem_set(&f->error, PROBLEM_INTERNAL, "image data before its part");
    form_blob *b = &f->images[f->nimages - 1];
    if (b->len + len > b->cap) {
        size_t cap = b->cap ? b->cap : 65536;
        while (cap < b->len + len) cap *= 2;
        void *grown = realloc(b->data, cap);
        if (!grown) return problem_set(&f->error, PROBLEM_INTERNAL, "out of memory");
        b->data = grown;
        b->cap = cap;
    }
    memcpy((char *)b->data + b->len, data, len);
    b->len += len;
    return 0;
}

/* "data:image/png;base64,...." or bare base64 -> a new image. */
int form_image_base64(upscale_form *f, const char *field, const char *text, size_t len) {
    if (len >= 5 && strncasecmp(text, "data:", 5) == 0) {
        const char *comma = memchr(text, ',', len);
        if (!comma || comma - text < 12 || strncasecmp(comma - 7, ";base64", 7) != 0)
            return problem_field(&f->error, field, "base64 or a base64 data URL",
                                 "%s is a data URL without ;base64", field);
        len -= (size_t)(comma + 1 - text);
        text = comma + 1;
    }
    size_t n;
    void *bytes = base64_decode(text, len, &n);
    if (!bytes)
        return problem_field(&f->error, field, "base64 or a base64 data URL", "%s is not valid base64",
                             field);
    if (form_image_begin(f)) {
        free(bytes);
        return -1;
    }
    form_blob *b = &f->images[f->nimages - 1];
    b->data = bytes;
    b->len = b->cap = n;
    return 0;
}

/* ---- JSON ----------------------------------------------------------------------- */

/* One JSON member: of the body (item == NULL) or of a batch item. */
static int json_field(upscale_form *f, upscale_options *item, const char *key, json_t *v) {
    upscale_options *o;
    int image;
    const field_def *d = lookup(f, key, strlen(key), &o, &image);
    if (!d || image >= 0 || (item && d->id >= FIELD_OPTION_COUNT))
        return unknown_field(f, key, strlen(key));
    if (item) o = item;
    if (claim(f, o, d)) return -1;

    switch (d->kind) {
    case KIND_TEXT:
    case KIND_URL:
    case KIND_FORMAT:
    case KIND_CHOICE:
    case KIND_MODEL:
        if (!json_is_string(v))
            return problem_field(&f->error, d->name, d->allowed, "%s must be a string", d->name);
        return apply_text(f, o, d, json_string_value(v), json_string_length(v), 0);
    case KIND_REAL:
        if (!json_is_number(v)) return bad_number(f, d, "a number");
        return store_number(f, o, d, json_number_value(v));
    case KIND_INT: /* 33.0 is an integer to JSON Schema, and to us */
        if (json_is_real(v) && json_real_value(v) == floor(json_real_value(v)))
            return store_number(f, o, d, json_real_value(v));
        if (!json_is_integer(v)) return bad_number(f, d, "an integer");
        return store_number(f, o, d, (double)json_integer_value(v));
    case KIND_SEED: /* a string too: JavaScript numbers lose digits past 2^53 */
        if (json_is_integer(v) && json_integer_value(v) >= 0 && (uint64_t)json_integer_value(v) <= seed_max()) {
            o->seed = (uint64_t)json_integer_value(v);
            return 0;
        }
        if (json_is_string(v)) return apply_text(f, o, d, json_string_value(v), json_string_length(v), 0);
        if (json_is_real(v) && json_real_value(v) >= 0 && json_real_value(v) < 0x1p63 &&
            json_real_value(v) == floor(json_real_value(v)) &&
            (uint64_t)json_real_value(v) <= seed_max()) { /* 42.0, as for the other integers */
            o->seed = (uint64_t)json_real_value(v);
            return 0;
        }
        return bad_seed(f, d);
    case KIND_BOOL:
        if (!json_is_boolean(v))
            return problem_field(&f->error, d->name, d->allowed, "%s must be true or false", d->name);
        store_bool(f, o, d, json_is_true(v));
        return 0;
    }
    return 0;
}

static int json_image(upscale_form *f, const char *field, json_t *v) {
    if (!json_is_string(v))
        return problem_field(&f->error, field, "base64 or a base64 data URL",
                             "%s must be a string of base64", field);
    return form_image_base64(f, field, json_string_value(v), json_string_length(v));
}

/* A real at or beyond 2^63 in v: an integer jansson could not hold as one. */
static bool holds_huge(json_t *v) {
    const char *key;
    json_t *x;
    size_t i;
    if (json_is_real(v)) return fabs(json_real_value(v)) >= 0x1p63;
    if (json_is_object(v)) {
        json_object_foreach(v, key, x) if (holds_huge(x)) return true;
    } else if (json_is_array(v)) {
        json_array_foreach(v, i, x) if (holds_huge(x)) return true;
    }
    return false;
}

/* jansson refuses an integer beyond 64 bits as a syntax error, but the
 * body is well-formed JSON with a value out of range: read again with
 * integers as reals, the member that holds one is refused like any value
 * out of range (422, naming its field; a seed of 2^63 is just too big). */
static int integer_overflow(upscale_form *f, const char *body, size_t len, const json_error_t *first) {
    json_error_t jerr;
    json_t *root =
        json_loadb(body, len, JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL | JSON_DECODE_INT_AS_REAL, &jerr);
    const char *key;
    json_t *v;
    json_object_foreach(root, key, v) { /* none when root is not an object */
        if (!holds_huge(v)) continue;
        if (strcmp(key, "image") == 0 && !f->batch) json_image(f, "image", v);
        else if (strcmp(key, "images") == 0 && f->batch && !json_is_array(v))
            problem_field(&f->error, "images", "an array", "images must be an array");
        else if (strcmp(key, "images") == 0 && f->batch) {
            size_t i;
            json_t *item, *x;
            const char *k;
            json_array_foreach(v, i, item) {
                char name[32];
                snprintf(name, sizeof name, "images[%zu]", i);
                if (!json_is_object(item)) json_image(f, name, item);
                else json_object_foreach(item, k, x) {
                    if (!holds_huge(x)) continue;
                    upscale_options scratch = {0}; /* the request is refused: nothing is kept */
                    if (strcmp(k, "image") == 0) json_image(f, name, x);
                    else json_field(f, &scratch, k, x);
                    options_free(&scratch);
                    break;
                }
                if (f->error.kind) break;
            }
        } else json_field(f, NULL, key, v);
        break;
    }
    json_decref(root);
    if (!f->error.kind)
        problem_set(&f->error, PROBLEM_MALFORMED, "malformed JSON at line %d column %d: %s", first->line,
                    first->column, first->text);
    return -1;
}

int form_parse_json(upscale_form *f, const char *body, size_t len) {
    if (f->error.kind) return -1;
    json_error_t jerr;
    /* NUL inside strings is the fields' business (refused where it matters) */
    json_t *root = json_loadb(body, len, JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL, &jerr);
    if (!root && json_error_code(&jerr) == json_error_numeric_overflow)
        return integer_overflow(f, body, len, &jerr);
    if (!root)
        return problem_set(&f->error, PROBLEM_MALFORMED, "malformed JSON at line %d column %d: %s",
                           jerr.line, jerr.column, jerr.text);
    if (!json_is_object(root)) {
        json_decref(root);
        return problem_set(&f->error, PROBLEM_MALFORMED, "the JSON body must be an object");
    }
    const char *key;
    json_t *v;
    json_object_foreach(root, key, v) {
        if (strcmp(key, "image") == 0 && !f->batch) json_image(f, "image", v);
        else if (strcmp(key, "images") == 0 && f->batch) {
            if (!json_is_array(v)) {
                problem_field(&f->error, "images", "an array", "images must be an array");
                break;
            }
            size_t i;
            json_t *item;
            json_array_foreach(v, i, item) {
                char name[32];
                snprintf(name, sizeof name, "images[%zu]", i);
                if (json_is_object(item)) {
                    json_t *img = json_object_get(item, "image");
                    if (!img) {
                        problem_set(&f->error, PROBLEM_MISSING_IMAGE, "%s has no \"image\"", name);
                        break;
                    }
                    if (json_image(f, name, img)) break;
                    const char *k;
                    json_t *x;
                    json_object_foreach(item, k, x) {
                        if (strcmp(k, "image") != 0 && json_field(f, &f->per[f->nimages - 1], k, x)) break;
                    }
                } else json_image(f, name, item);
                if (f->error.kind) break;
            }
        } else json_field(f, NULL, key, v);
        if (f->error.kind) break;
    }
    json_decref(root);
    return fail(f);
}

/* ---- results ------------------------------------------------------------------------ */

/* Each image's tile_overlap below its tile, the two from wherever they
 * came (the defaults, the shared fields, the image's own). */
static int check_overlaps(upscale_form *f) {
    for (int i = 0; i < f->nimages; i++) {
        upscale_options o;
        form_resolve(f, i, &o);
        sdx4_upscale_params p;
        sdx4_upscale_params_default(&p);
        p.tile = o.tile, p.tile_overlap = o.tile_overlap;
        options_free(&o);
        if (sdx4_check_params(&p) != SDX4_OK)
            return problem_field(&f->error, "tile_overlap", "below tile", "%s", sdx4_last_error());
    }
    return 0;
}

int form_finish(upscale_form *f) {
    if (f->error.kind) return -1;
    if (!f->nimages)
        return problem_set(&f->error, PROBLEM_MISSING_IMAGE,
                           f->batch ? "no image: send file parts named \"image\" or a JSON \"images\" array"
                                    : "no image: send a file part or a JSON field named \"image\"");
    if (f->webhook_url && f->batch && !f->async)
        return problem_field(&f->error, "webhook_url", "with async=true",
                             "webhook_url is called when a job finishes: it needs async=true");
    for (int i = 0; i < f->nimages; i++)
        if (!f->images[i].len)
            return problem_set(&f->error, PROBLEM_MISSING_IMAGE, "image %d is empty", i);
    if (f->batch)
        for (int i = f->nimages; i < FORM_MAX_IMAGES; i++)
            if (f->per[i].given) /* named as the images' fault: they are too few */
                return problem_field(&f->error, "image", NULL,
                                     "parameters given for image %d of a batch of %d", i, f->nimages);
    return check_overlaps(f);
}

static void merge(upscale_options *out, const upscale_options *in) {
    unsigned g = in->given;
    if (g & 1u << FIELD_PROMPT) free(out->prompt), out->prompt = strdup(in->prompt);
    if (g & 1u << FIELD_NEGATIVE_PROMPT)
        free(out->negative_prompt), out->negative_prompt = strdup(in->negative_prompt);
    if (g & 1u << FIELD_NOISE_LEVEL) out->noise_level = in->noise_level;
    if (g & 1u << FIELD_STEPS) out->steps = in->steps;
    if (g & 1u << FIELD_GUIDANCE) out->guidance_scale = in->guidance_scale;
    if (g & 1u << FIELD_SEED) out->seed = in->seed;
    if (g & 1u << FIELD_ETA) out->eta = in->eta;
    if (g & 1u << FIELD_FORMAT) out->format = in->format;
    if (g & 1u << FIELD_QUALITY) out->quality = in->quality;
    if (g & 1u << FIELD_SCHEDULER)
        free(out->scheduler), out->scheduler = in->scheduler ? strdup(in->scheduler) : NULL;
    if (g & 1u << FIELD_SCHEDULER_OPTIONS)
        free(out->scheduler_options),
            out->scheduler_options = in->scheduler_options ? strdup(in->scheduler_options) : NULL;
    if (g & 1u << FIELD_VAE_TILING)
        free(out->vae_tiling), out->vae_tiling = in->vae_tiling ? strdup(in->vae_tiling) : NULL;
    if (g & 1u << FIELD_TILE) out->tile = in->tile;
    if (g & 1u << FIELD_TILE_OVERLAP) out->tile_overlap = in->tile_overlap;
    if (g & 1u << FIELD_METADATA) out->metadata = in->metadata;
    out->given |= g;
}

void form_resolve(const upscale_form *f, int i, upscale_options *out) {
    memset(out, 0, sizeof *out);
    out->prompt = strdup("");
    out->negative_prompt = strdup("");
    out->noise_level = sdx4_param_find("noise_level")->real_default;
    out->steps = (int)sdx4_param_find("num_inference_steps")->int_default;
    out->guidance_scale = sdx4_param_find("guidance_scale")->real_default;
    out->eta = sdx4_param_find("eta")->real_default;
    out->tile = (int)sdx4_param_find("tile")->int_default;
    out->tile_overlap = (int)sdx4_param_find("tile_overlap")->int_default;
    out->format = IMAGE_PNG;
    merge(out, &f->shared);
    if (f->batch) merge(out, &f->per[i]);
}

char *options_canonical(const upscale_options *o) {
    char *text = NULL;
    int quality = o->format == IMAGE_PNG ? 0 : o->quality;
    /* the scheduler, the VAE tiling and the UNet's tiles only when chosen,
     * so that the keys of requests without them stay those cached before
     * they existed (tile 0 with the default overlap: what those ran, as
     * automatic tiles leave an image that fits the budget whole) */
    char tiles[64] = "";
    if (o->tile > 0 || o->tile_overlap != sdx4_param_find("tile_overlap")->int_default) snprintf(tiles, sizeof tiles, "\x1ftile=%d\x1ftile_overlap=%d", o->tile, o->tile_overlap);
    /* the resize after the model likewise (a1111.c's routes only), and
     * the metadata written into the file */
    char resize[112] = "";
    if (o->resize_width || o->crop_width)
        snprintf(resize, sizeof resize, "\x1fresize=%dx%d\x1f" "crop=%dx%d", o->resize_width, o->resize_height,
                 o->crop_width, o->crop_height);
    if (o->metadata) strcat(resize, "\x1fmetadata=1");
    if (asprintf(&text, "prompt=%s\x1fnegative=%s\x1fnoise=%.17g\x1fsteps=%d\x1fguidance=%.17g"
                        "\x1fseed=%llu\x1f" "eta=%.17g\x1f" "format=%d\x1fquality=%d%s%s%s%s%s%s%s%s",
                 o->prompt, o->negative_prompt, o->noise_level, o->steps, o->guidance_scale,
                 (unsigned long long)o->seed, o->eta, (int)o->format, quality,
                 o->scheduler ? "\x1fscheduler=" : "", o->scheduler ? o->scheduler : "",
                 o->scheduler_options ? "\x1fscheduler_options=" : "",
                 o->scheduler_options ? o->scheduler_options : "",
                 o->vae_tiling ? "\x1fvae_tiling=" : "", o->vae_tiling ? o->vae_tiling : "", tiles, resize) < 0)
        return NULL;
    return text;
}

json_t *form_parameters(const form_limits *limits) {
    static const char *const schema_types[] = {
        [SDX4_PARAM_INT] = "integer", [SDX4_PARAM_REAL] = "number",
        [SDX4_PARAM_SEED] = "integer", [SDX4_PARAM_TEXT] = "string", [SDX4_PARAM_CHOICE] = "string"};
    json_t *list = json_array();
    for (int k = 0; k < FIELD_COUNT; k++) {
        const field_def *d = &fields[k];
        const sdx4_param *p = sdx4_param_find(d->name);
        if (!p) continue;
        json_t *e = json_pack("{s:s,s:s,s:s}", "name", p->name, "type", schema_types[p->type],
                              "description", p->help);
        double min, max;
        switch (p->type) {
        case SDX4_PARAM_TEXT:
            json_object_set_new(e, "max_length", json_integer(limits->max_prompt_chars));
            json_object_set_new(e, "default", json_string(""));
            break;
        case SDX4_PARAM_CHOICE: {
            json_t *values = json_array();
            for (int i = 0; p->choices[i]; i++) json_array_append_new(values, json_string(p->choices[i]));
            json_object_set_new(e, "enum", values);
            json_object_set_new(e, "default", json_string(p->choices[p->int_default]));
            break;
        }
        case SDX4_PARAM_SEED: /* no default: a request without one gets a random seed */
            json_object_set_new(e, "minimum", json_integer(p->int_min));
            json_object_set_new(e, "maximum", json_integer(p->int_max));
            break;
        case SDX4_PARAM_INT:
            field_range(limits, d, &min, &max);
            json_object_set_new(e, "minimum", json_integer((json_int_t)min));
            json_object_set_new(e, "maximum", json_integer((json_int_t)max));
            json_object_set_new(e, "default", json_integer(p->int_default));
            break;
        case SDX4_PARAM_REAL:
            field_range(limits, d, &min, &max);
            json_object_set_new(e, "minimum", json_real(min));
            json_object_set_new(e, "maximum", json_real(max));
            json_object_set_new(e, "default", json_real(p->real_default));
            break;
        }
        json_array_append_new(list, e);
    }
    return list;
}

int form_accept_format(const char *accept, image_format *format) {
    if (!accept || !*accept) return 0;
    double best_q = 0;
    image_format best = IMAGE_UNKNOWN;
    bool any = false;
    const char *p = accept;
    while (*p) {
        const char *end = strchr(p, ',');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        char item[128];
        if (len >= sizeof item) len = sizeof item - 1;
        memcpy(item, p, len);
        item[len] = '\0';
        p = end ? end + 1 : p + strlen(p);

        double q = 1;
        char *semi = strchr(item, ';');
        if (semi) {
            *semi = '\0';
            char *qp = strstr(semi + 1, "q=");
            if (qp) q = strtod(qp + 2, NULL);
        }
        char *type = item;
        while (*type == ' ') type++;
        for (char *e = type + strlen(type); e > type && e[-1] == ' ';) *--e = '\0';
        if (!(q > 0)) continue;
        image_format f = IMAGE_UNKNOWN;
        if (strcasecmp(type, "*/*") == 0 || strcasecmp(type, "image/*") == 0) any = true;
        else if (strcasecmp(type, "image/png") == 0) f = IMAGE_PNG;
        else if (strcasecmp(type, "image/jpeg") == 0) f = IMAGE_JPEG;
        else if (strcasecmp(type, "image/webp") == 0) f = IMAGE_WEBP;
        if (f != IMAGE_UNKNOWN && q > best_q) best_q = q, best = f;
    }
    if (best != IMAGE_UNKNOWN) *format = best;
    else if (!any) return -1;
    return 0;
}
