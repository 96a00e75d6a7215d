/*
 * a1111.c - AUTOMATIC1111's upscaling routes (see a1111.h).
 *
 * What A1111 does (modules/api/api.py, modules/postprocessing.py,
 * scripts/postprocessing_upscale.py, modules/upscaler.py): the request
 * names an upscaler, runs it on the image and resizes the result with
 * Lanczos to the size asked: upscaling_resize times the input
 * (resize_mode 0), or, in mode 1, by the larger of
 * upscaling_resize_w / width and upscaling_resize_h / height, keeping the
 * centre upscaling_resize_w x upscaling_resize_h when upscaling_crop is
 * set. Face restoration (GFPGAN, CodeFormer) and a second upscaler
 * blended in may follow. The answer is the PNG in base64 and html_info,
 * the "infotext" of what was done as one HTML paragraph.
 *
 * The mapping. upscaler_1 names one of this server's models (A1111's
 * names are its own: "R-ESRGAN 4x+" is realesrgan-x4plus here, as the
 * folder is named); GET /sdapi/v1/upscalers lists exactly those, and
 * without upscaler_1 the default model answers, as without `model` on
 * the native routes. The model runs once, at its own scale, and its output
 * is resized to the size asked (runner.c, with libvips: Lanczos-3 down,
 * bicubic up) unless it is that size already: a factor equal to the
 * model's scale returns the native route's bytes. Where sdx4 differs:
 *   - A1111 runs a model again (up to 3 times) while its output is smaller
 *     than asked; sdx4 runs it once and enlarges the rest.
 *   - A1111 rounds the target down to a multiple of 8 and pads with black
 *     where the resize falls short of a crop; sdx4 resizes to
 *     int(side x factor), computed exactly in mode 1, so a crop is always
 *     covered.
 *   - "None" (no upscale) is no model here: refused like any unknown name.
 *   - gfpgan_visibility, codeformer_visibility above 0 and a second
 *     upscaler with a visibility above 0 are refused (422 naming the
 *     field) rather than ignored: sdx4 cannot do them. codeformer_weight,
 *     show_extras_results (only A1111's folder mode reads it) and
 *     upscale_first change nothing without face restoration: accepted and
 *     checked, then ignored.
 *   - Values must have their JSON types (pydantic would take "2" for 2),
 *     and unknown fields are refused, as on every sdx4 route.
 *   - Errors are sdx4's problem documents (application/problem+json, with
 *     `field`), not A1111's {error, detail, body, errors}.
 */
#include "a1111.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base64.h"

/* The sides of a resized image: A1111's own largest factor, 8, times the
 * largest input (every A1111 factor fits), and imageio's largest side. */
#define MAX_FACTOR 8
#define MAX_SIDE 16384

void a1111_init(a1111_request *a) {
    *a = (a1111_request){.resize_mode = 0, .factor = 2, .width = 512, .height = 512, .crop = true};
}

/* ---- the request ------------------------------------------------------------------ */

/* A client-supplied text, made safe to quote in a problem. */
static void printable(char *out, size_t size, const char *in, size_t len) {
    size_t n = 0;
    for (size_t i = 0; i < len && n + 1 < size; i++)
        out[n++] = in[i] >= 0x20 && in[i] < 0x7f && in[i] != '"' ? in[i] : '?';
    out[n] = '\0';
}

/* The index of the model named by v in the form's list, or -1 (with the
 * problem set) when it names none. */
static int find_upscaler(upscale_form *f, const char *field, const json_t *v) {
    if (!json_is_string(v))
        return problem_field(&f->error, field, "an upscaler's name (GET /sdapi/v1/upscalers)",
                             "%s must be a string", field);
    const char *name = json_string_value(v);
    size_t len = json_string_length(v);
    for (int i = 0; i < f->limits.nmodels; i++)
        if (strlen(f->limits.models[i]) == len && memcmp(f->limits.models[i], name, len) == 0) return i;
    char shown[72], names[256] = "";
    printable(shown, sizeof shown, name, len);
    for (int i = 0; i < f->limits.nmodels; i++) {
        size_t n = strlen(names);
        snprintf(names + n, sizeof names - n, "%s%s", i == 0 ? "" : i == f->limits.nmodels - 1 ? " or " : ", ",
                 f->limits.models[i]);
    }
    return problem_field(&f->error, field, f->limits.nmodels ? names : "no upscaler",
                         "unknown upscaler \"%s\": this server's upscalers are its models, %s%s", shown,
                         f->limits.nmodels ? names : "none by name",
                         strcmp(shown, "None") == 0 ? " (A1111's \"None\" upscales nothing)" : "");
}

/* A JSON number from min to max (exclusive of min when `above`). */
static int number(upscale_form *f, const char *field, const json_t *v, double min, bool above, double max,
                  const char *allowed, double *out) {
    double x = json_number_value(v);
    if (!json_is_number(v) || (above ? x <= min : x < min) || x > max)
        return problem_field(&f->error, field, allowed, "%s must be a number %s", field, allowed);
    *out = x;
    return 0;
}

/* A JSON integer (or a real without a fraction) from min to max. */
static int integer(upscale_form *f, const char *field, const json_t *v, int min, int max, const char *allowed,
                   int *out) {
    double x = json_number_value(v);
    if (!json_is_number(v) || x != floor(x) || x < min || x > max)
        return problem_field(&f->error, field, allowed, "%s must be an integer %s", field, allowed);
    *out = (int)x;
    return 0;
}

static int boolean(upscale_form *f, const char *field, const json_t *v, bool *out) {
    if (!json_is_boolean(v)) return problem_field(&f->error, field, "true or false", "%s must be true or false", field);
    *out = json_is_true(v);
    return 0;
}

/* imageList: [{data: base64, name}]; the names are A1111's for saved files,
 * which sdx4 does not save: checked as text, then unused. */
static int image_list(upscale_form *f, const json_t *v) {
    if (!json_is_array(v))
        return problem_field(&f->error, "imageList", "an array of {data, name}", "imageList must be an array");
    size_t i;
    json_t *item;
    json_array_foreach(v, i, item) {
        char field[48];
        snprintf(field, sizeof field, "imageList[%zu]", i);
        if (!json_is_object(item))
            return problem_field(&f->error, field, "an object {data, name}", "%s must be an object {data, name}",
                                 field);
        const char *key;
        json_t *x;
        json_object_foreach(item, key, x) {
            if (strcmp(key, "name") == 0 && !json_is_string(x))
                return problem_field(&f->error, field, "a string", "%s.name must be a string", field);
            if (strcmp(key, "name") != 0 && strcmp(key, "data") != 0) {
                char shown[40];
                printable(shown, sizeof shown, key, strlen(key));
                return problem_field(&f->error, field, "data and name", "%s has an unknown field \"%s\"", field,
                                     shown);
            }
        }
        json_t *data = json_object_get(item, "data");
        if (!data) return problem_set(&f->error, PROBLEM_MISSING_IMAGE, "%s has no \"data\"", field);
        snprintf(field, sizeof field, "imageList[%zu].data", i);
        if (!json_is_string(data))
            return problem_field(&f->error, field, "base64 or a base64 data URL", "%s must be a string of base64",
                                 field);
        if (form_image_base64(f, field, json_string_value(data), json_string_length(data))) return -1;
    }
    return 0;
}

/* A visibility of something sdx4 does not do: 0, or refused. */
static int nothing_visible(upscale_form *f, const char *field, const json_t *v, const char *what) {
    double x = 0;
    if (number(f, field, v, 0, false, 1, "from 0 to 1", &x)) return -1;
    if (x > 0)
        return problem_field(&f->error, field, "0", "%s must be 0: sdx4 has no %s", field, what);
    return 0;
}

/* One member of the body. upscaler_2 and its visibility are judged
 * together once the whole body is read. */
static int member(upscale_form *f, a1111_request *a, const char *key, const json_t *v, int *upscaler_2,
                 double *visibility_2) {
    bool ignored;
    double unused = 0;
    if (strcmp(key, "image") == 0 && !f->batch) {
        if (!json_is_string(v))
            return problem_field(&f->error, "image", "base64 or a base64 data URL", "image must be a string of base64");
        return form_image_base64(f, "image", json_string_value(v), json_string_length(v));
    }
    if (strcmp(key, "imageList") == 0 && f->batch) return image_list(f, v);
    if (strcmp(key, "upscaler_1") == 0) {
        int m = find_upscaler(f, key, v);
        if (m < 0) return -1;
        f->model = m;
        return 0;
    }
    if (strcmp(key, "upscaler_2") == 0) {
        if (json_is_string(v) && strcmp(json_string_value(v), "None") == 0) return 0;
        return (*upscaler_2 = find_upscaler(f, key, v)) < 0 ? -1 : 0;
    }
    if (strcmp(key, "extras_upscaler_2_visibility") == 0)
        return number(f, key, v, 0, false, 1, "from 0 to 1", visibility_2);
    if (strcmp(key, "resize_mode") == 0) return integer(f, key, v, 0, 1, "0 or 1", &a->resize_mode);
    if (strcmp(key, "upscaling_resize") == 0)
        return number(f, key, v, 0, true, MAX_FACTOR, "above 0, at most 8", &a->factor);
    if (strcmp(key, "upscaling_resize_w") == 0) return integer(f, key, v, 1, MAX_SIDE, "from 1 to 16384", &a->width);
    if (strcmp(key, "upscaling_resize_h") == 0) return integer(f, key, v, 1, MAX_SIDE, "from 1 to 16384", &a->height);
    if (strcmp(key, "upscaling_crop") == 0) return boolean(f, key, v, &a->crop);
    if (strcmp(key, "gfpgan_visibility") == 0) return nothing_visible(f, key, v, "face restoration (GFPGAN)");
    if (strcmp(key, "codeformer_visibility") == 0) return nothing_visible(f, key, v, "face restoration (CodeFormer)");
    if (strcmp(key, "codeformer_weight") == 0) return number(f, key, v, 0, false, 1, "from 0 to 1", &unused);
    if (strcmp(key, "show_extras_results") == 0 || strcmp(key, "upscale_first") == 0)
        return boolean(f, key, v, &ignored);
    char shown[40];
    printable(shown, sizeof shown, key, strlen(key));
    return problem_field(&f->error, shown, NULL, "unknown field \"%s\"", shown);
}

int a1111_parse(upscale_form *f, a1111_request *a, const char *body, size_t len) {
    if (f->error.kind) return -1;
    json_error_t jerr;
    json_t *root = json_loadb(body, len, JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL, &jerr);
    /* an integer past 64 bits is a number out of range, not bad JSON:
     * read as reals, it is refused by its field's range */
    if (!root && json_error_code(&jerr) == json_error_numeric_overflow)
        root = json_loadb(body, len, JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL | JSON_DECODE_INT_AS_REAL, &jerr);
    if (!root)
        return problem_set(&f->error, PROBLEM_MALFORMED, "malformed JSON at line %d column %d: %s", jerr.line,
                           jerr.column, jerr.text);
    if (!json_is_object(root)) {
        json_decref(root);
        return problem_set(&f->error, PROBLEM_MALFORMED, "the JSON body must be an object");
    }
    int upscaler_2 = -1;
    double visibility_2 = 0;
    const char *key;
    json_t *v;
    json_object_foreach(root, key, v) {
        if (member(f, a, key, v, &upscaler_2, &visibility_2)) break;
    }
    json_decref(root);
    if (!f->error.kind && upscaler_2 >= 0 && visibility_2 > 0)
        problem_field(&f->error, "extras_upscaler_2_visibility", "0 unless upscaler_2 is \"None\"",
                      "extras_upscaler_2_visibility must be 0: sdx4 blends no second upscaler (%s) into the first",
                      f->limits.models[upscaler_2]);
    return f->error.kind ? -1 : 0;
}

int a1111_size(const a1111_request *a, int width, int height, int scale, int max_side, upscale_options *o,
               problem *p) {
    long long limit = (long long)MAX_FACTOR * max_side, w, h;
    if (limit > MAX_SIDE) limit = MAX_SIDE;
    const char *field;
    if (a->resize_mode == 0) { /* int(side * factor), as A1111's target size */
        w = (long long)floor(width * a->factor);
        h = (long long)floor(height * a->factor);
        field = "upscaling_resize";
    } else if ((long long)a->width * height >= (long long)a->height * width) {
        /* scaled by width / the image's: the other side covers height */
        w = a->width;
        h = (long long)height * a->width / width;
        field = "upscaling_resize_w";
    } else {
        w = (long long)width * a->height / height;
        h = a->height;
        field = "upscaling_resize_h";
    }
    if (w < 1 || h < 1 || w > limit || h > limit) {
        char allowed[64];
        snprintf(allowed, sizeof allowed, "sides from 1 to %lld pixels", limit);
        return problem_field(p, field, allowed,
                             "the %dx%d image would be resized to %lldx%lld pixels; each side must be from 1 to %lld "
                             "(%d times --max-side, at most %d)", width, height, w, h, limit, MAX_FACTOR, MAX_SIDE);
    }
    bool crop = a->resize_mode == 1 && a->crop && (w != a->width || h != a->height);
    o->crop_width = crop ? a->width : 0;
    o->crop_height = crop ? a->height : 0;
    /* the model's own output is left as it is: the native route's bytes */
    bool own = scale > 0 && w == (long long)width * scale && h == (long long)height * scale;
    o->resize_width = own ? 0 : (int)w;
    o->resize_height = own ? 0 : (int)h;
    return 0;
}

/* ---- the answers -------------------------------------------------------------------- */

json_t *a1111_upscalers(const json_t *models) {
    json_t *list = json_array();
    size_t i;
    const json_t *m;
    /* A1111 lists scale as a number (4.0); model_name is its upscaler's
     * family, here the architecture; no path or URL is given away */
    json_array_foreach(json_object_get(models, "models"), i, m) {
        const json_t *scale = json_object_get(m, "scale");
        json_array_append_new(list, json_pack("{s:O,s:O?,s:n,s:n,s:o}", "name", json_object_get(m, "name"),
                                              "model_name", json_object_get(m, "architecture"), "model_path",
                                              "model_url", "scale",
                                              json_is_number(scale) ? json_real(json_number_value(scale))
                                                                    : json_null()));
    }
    return list;
}

/* A number as Python's str() writes a float: 2.0, 2.5. */
static void python_float(char *buf, size_t size, double x) {
    if (x == floor(x) && fabs(x) < 1e15) snprintf(buf, size, "%.1f", x);
    else snprintf(buf, size, "%.15g", x);
}

/* A1111's infotext of the upscale, in plaintext_to_html's paragraph. */
static json_t *html_info(const a1111_request *a, const char *upscaler) {
    char text[512], size[64];
    if (a->resize_mode == 0) {
        python_float(size, sizeof size, a->factor);
        snprintf(text, sizeof text, "Postprocess upscale by: %s, ", size);
    } else {
        snprintf(text, sizeof text, "Postprocess upscale to: %dx%d, ", a->width, a->height);
        if (a->crop)
            snprintf(text + strlen(text), sizeof text - strlen(text), "Postprocess crop to: %dx%d, ", a->width,
                     a->height);
    }
    snprintf(text + strlen(text), sizeof text - strlen(text), "Postprocess upscaler: %s", upscaler);
    char html[2048] = "<p>";
    size_t n = 3;
    for (const char *c = text; *c && n + 8 < sizeof html; c++) { /* html.escape */
        const char *e = *c == '&' ? "&amp;" : *c == '<' ? "&lt;" : *c == '>' ? "&gt;" : *c == '"' ? "&quot;"
                        : *c == '\'' ? "&#x27;" : NULL;
        if (e) n += (size_t)snprintf(html + n, sizeof html - n, "%s", e);
        else html[n++] = *c;
    }
    snprintf(html + n, sizeof html - n, "</p>");
    return json_string(html);
}

json_t *a1111_answer(const a1111_request *a, const char *upscaler, job *j, problem *p) {
    job_view v;
    job_get_view(j, &v);
    bool batch = job_kind(j) == FORM_BATCH;
    if (v.state != JOB_SUCCEEDED) {
        *p = batch ? v.error : job_task(j, 0)->error;
        if (!p->kind) problem_set(p, PROBLEM_INTERNAL, "no result");
        return NULL;
    }
    /* the tasks are final: their outputs no longer change (jobs.h) */
    json_t *images = json_array();
    for (int i = 0; i < job_ntasks(j); i++) {
        task *t = job_task(j, i);
        if (t->state != JOB_SUCCEEDED) {
            *p = t->error;
            if (!p->kind) problem_set(p, PROBLEM_INTERNAL, "no result");
            if (batch) {
                char detail[sizeof p->detail];
                snprintf(detail, sizeof detail, "imageList[%d]: %.340s", i, p->detail);
                memcpy(p->detail, detail, sizeof detail);
            }
            json_decref(images);
            return NULL;
        }
        char *b64 = base64_encode(t->output, t->output_len, NULL);
        if (!b64) {
            json_decref(images);
            problem_set(p, PROBLEM_INTERNAL, "out of memory");
            return NULL;
        }
        json_array_append_new(images, json_string(b64));
        free(b64);
    }
    json_t *doc = json_pack("{s:o}", "html_info", html_info(a, upscaler));
    if (batch) json_object_set_new(doc, "images", images);
    else {
        json_object_set(doc, "image", json_array_get(images, 0));
        json_decref(images);
    }
    return doc;
}
