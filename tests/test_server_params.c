/*
 * test_server_params.c - the server and openapi.json against the engine's
 * table of upscale parameters (sdx4_params).
 *
 * The chain checked: every row of the table is a field of the server's
 * forms, listed by form_parameters (model-info's upscale_parameters) with
 * the row's range and default, narrowed only where the server says so
 * (num_inference_steps to max-steps); the forms accept each bound and
 * refuse the next value outward, naming the field; and every upscale
 * request schema of openapi.json describes each row as form_parameters
 * does with the default settings (type, minimum, maximum, default,
 * maxLength), so a range changed in the table and not in the API
 * description fails here. The tiled UNet's fields beyond their ranges:
 * the engine's gap in tile, an overlap below the tile from wherever the
 * two come, and the cache key they make. The metadata field: a boolean
 * in every encoding, off by default and out of the cache key unless on.
 */
#include <math.h>
#include <unistd.h>

#include <jansson.h>

#include "config.h"
#include "form.h"
#include "test.h"

extern char **environ;

/* The default settings: no settings file, no SDX4_* variable. */
static int default_limits(form_limits *limits) {
    char *names[256];
    int n = 0;
    for (char **e = environ; *e && n < 256; e++)
        if (!strncmp(*e, "SDX4_", 5)) names[n++] = strndup(*e, strcspn(*e, "="));
    for (int i = 0; i < n; i++) {
        unsetenv(names[i]);
        free(names[i]);
    }
    server_config cfg;
    char *argv[] = {"serve", "--model", "/nonexistent", NULL};
    if (config_load(&cfg, 3, argv, stderr) != 0) return -1;
    *limits = (form_limits){cfg.max_steps, cfg.max_prompt_chars, cfg.max_batch, NULL, 0};
    config_free(&cfg);
    return 0;
}

static const json_t *entry(const json_t *parameters, const char *name) {
    size_t i;
    const json_t *e;
    json_array_foreach(parameters, i, e) if (!strcmp(json_string_value(json_object_get(e, "name")), name)) return e;
    return NULL;
}

static bool same_number(const json_t *a, const json_t *b) {
    return json_is_number(a) && json_is_number(b) && json_number_value(a) == json_number_value(b);
}

static void test_form_parameters(const form_limits *limits) {
    json_t *list = form_parameters(limits);
    int n;
    const sdx4_param *rows = sdx4_params(&n);
    CHECK(json_array_size(list) == (size_t)n, "%zu parameters, %d rows", json_array_size(list), n);
    for (int i = 0; i < n; i++) {
        const sdx4_param *r = &rows[i];
        const json_t *e = entry(list, r->name);
        CHECK(e != NULL, "%s is not listed", r->name);
        if (!e) continue;
        const json_t *min = json_object_get(e, "minimum"), *max = json_object_get(e, "maximum"),
                     *def = json_object_get(e, "default");
        switch (r->type) {
        case SDX4_PARAM_TEXT:
            CHECK(!min && !max && json_integer_value(json_object_get(e, "max_length")) == limits->max_prompt_chars,
                  "%s: range", r->name);
            CHECK(def && !strcmp(json_string_value(def), ""), "%s: default", r->name);
            break;
        case SDX4_PARAM_SEED:
            CHECK(json_integer_value(min) == r->int_min && json_integer_value(max) == r->int_max && !def,
                  "seed: range or default");
            break;
        case SDX4_PARAM_CHOICE: {
            const json_t *values = json_object_get(e, "enum");
            CHECK(!min && !max && def && !strcmp(json_string_value(def), r->choices[r->int_default]),
                  "%s: range or default", r->name);
            for (int k = 0; r->choices[k]; k++) {
                const char *v = json_string_value(json_array_get(values, (size_t)k));
                CHECK(v && !strcmp(v, r->choices[k]), "%s: enum %d", r->name, k);
            }
            CHECK(json_array_size(values) == (size_t)r->int_max + 1, "%s: enum size", r->name);
            break;
        }
        case SDX4_PARAM_INT: {
            json_int_t top = r->int_max;
            if (!strcmp(r->name, "num_inference_steps") && limits->max_steps < top) top = limits->max_steps;
            CHECK(json_integer_value(min) == r->int_min && json_integer_value(max) == top &&
                      json_integer_value(def) == r->int_default,
                  "%s: range or default", r->name);
            break;
        }
        case SDX4_PARAM_REAL:
            CHECK(json_real_value(min) == r->real_min && json_real_value(max) == r->real_max &&
                      json_real_value(def) == r->real_default,
                  "%s: range or default", r->name);
            break;
        }
    }
    json_decref(list);
}

/* A form field set to `value` as text: 0 accepted, else 1 with the problem
 * naming the field. */
static int form_refuses(const form_limits *limits, const char *name, const char *value) {
    upscale_form f;
    form_init(&f, limits, FORM_UPSCALE);
    int rc = form_set_text(&f, name, value, strlen(value));
    CHECK(rc == 0 || !strcmp(f.error.field, name), "%s=%s: field %s", name, value, f.error.field);
    form_free(&f);
    return rc != 0;
}

static void test_form_bounds(const form_limits *limits) {
    json_t *list = form_parameters(limits), *e;
    size_t i;
    json_array_foreach(list, i, e) {
        const char *name = json_string_value(json_object_get(e, "name"));
        const json_t *min = json_object_get(e, "minimum"), *max = json_object_get(e, "maximum");
        char text[64];
        if (json_is_integer(min)) {
            snprintf(text, sizeof text, "%lld", (long long)json_integer_value(min));
            CHECK(!form_refuses(limits, name, text), "%s=%s refused", name, text);
            snprintf(text, sizeof text, "%lld", (long long)json_integer_value(max));
            CHECK(!form_refuses(limits, name, text), "%s=%s refused", name, text);
            snprintf(text, sizeof text, "%lld", (long long)json_integer_value(min) - 1);
            CHECK(form_refuses(limits, name, text), "%s=%s accepted", name, text);
            snprintf(text, sizeof text, "%llu", (unsigned long long)json_integer_value(max) + 1);
            CHECK(form_refuses(limits, name, text), "%s=%s accepted", name, text);
        } else if (json_is_real(min)) {
            double lo = json_real_value(min), hi = json_real_value(max);
            snprintf(text, sizeof text, "%.17g", lo);
            CHECK(!form_refuses(limits, name, text), "%s=%s refused", name, text);
            snprintf(text, sizeof text, "%.17g", hi);
            CHECK(!form_refuses(limits, name, text), "%s=%s refused", name, text);
            snprintf(text, sizeof text, "%.17g", nextafter(lo, -INFINITY));
            CHECK(form_refuses(limits, name, text), "%s=%s accepted", name, text);
            snprintf(text, sizeof text, "%.17g", nextafter(hi, INFINITY));
            CHECK(form_refuses(limits, name, text), "%s=%s accepted", name, text);
        }
    }
    json_decref(list);

    /* a request without values gets the table's defaults */
    upscale_form f;
    upscale_options o;
    form_init(&f, limits, FORM_UPSCALE);
    form_resolve(&f, 0, &o);
    sdx4_upscale_params d;
    sdx4_upscale_params_default(&d);
    CHECK(o.steps == d.num_inference_steps && (float)o.guidance_scale == d.guidance_scale &&
              (float)o.noise_level == d.noise_level && (float)o.eta == d.eta && !strcmp(o.prompt, "") &&
              !strcmp(o.negative_prompt, ""),
          "form defaults");
    options_free(&o);
    form_free(&f);
}

/* ---- tile and tile_overlap ---------------------------------------------------- */

/* A form of `kind` with two images and `fields` ("name", "value" pairs,
 * NULL-ended) through form_finish: "" when accepted, else the field at
 * fault, with its problem's detail in `detail`. The options of image
 * `keep` go to *kept when accepted and kept is not NULL. */
static const char *tile_form(form_kind kind, const char *const *fields, char *detail, size_t size, int keep,
                             upscale_options *kept) {
    static char field[48];
    form_limits limits = {150, 1000, 8, NULL, 0};
    upscale_form f;
    form_init(&f, &limits, kind);
    for (int i = 0; i < (kind == FORM_BATCH ? 2 : 1); i++) form_image_begin(&f), form_image_append(&f, "x", 1);
    for (int i = 0; fields[i]; i += 2) form_set_text(&f, fields[i], fields[i + 1], strlen(fields[i + 1]));
    int rc = form_finish(&f);
    snprintf(field, sizeof field, "%s", rc ? f.error.field : "");
    snprintf(detail, size, "%s", f.error.detail);
    if (!rc && kept) form_resolve(&f, keep, kept);
    form_free(&f);
    return field;
}

static void test_tiles(void) {
    char detail[384];
    const char *field = tile_form(FORM_UPSCALE, (const char *const[]){"tile", "16", NULL}, detail, sizeof detail, 0, NULL);
    CHECK(!strcmp(field, "tile") && !strcmp(detail, "tile 16 is outside 32..2048 (0: automatic)"), "tile 16: %s %s",
          field, detail);
    field = tile_form(FORM_UPSCALE, (const char *const[]){"tile", "64", "tile_overlap", "96", NULL}, detail,
                      sizeof detail, 0, NULL);
    CHECK(!strcmp(field, "tile_overlap") && !strcmp(detail, "tile_overlap 96 must be smaller than tile 64"),
          "overlap 96: %s %s", field, detail);
    field = tile_form(FORM_UPSCALE, (const char *const[]){"tile", "32", NULL}, detail, sizeof detail, 0, NULL);
    CHECK(!strcmp(field, "tile_overlap"), "tile 32 with the default overlap 32: %s %s", field, detail);
    /* in a batch: the shared tile with an image's own overlap, and the other way round */
    field = tile_form(FORM_BATCH, (const char *const[]){"tile", "64", "tile_overlap[1]", "64", NULL}, detail,
                      sizeof detail, 0, NULL);
    CHECK(!strcmp(field, "tile_overlap"), "image 1's overlap 64: %s %s", field, detail);
    upscale_options o;
    field = tile_form(FORM_BATCH, (const char *const[]){"tile_overlap", "8", "tile[1]", "32", NULL}, detail,
                      sizeof detail, 1, &o);
    CHECK(!strcmp(field, ""), "image 1's tile 32 with the shared overlap 8: %s %s", field, detail);
    if (!*field) {
        CHECK(o.tile == 32 && o.tile_overlap == 8, "image 1: tile %d overlap %d", o.tile, o.tile_overlap);
        options_free(&o);
    }

    /* the cache key: tile 0 with the default overlap is the key without the
     * fields; another overlap is part of it (automatic windows use it) */
    char *keys[4];
    const char *const *cases[4] = {(const char *const[]){NULL}, (const char *const[]){"tile", "0", NULL},
                                   (const char *const[]){"tile", "0", "tile_overlap", "16", NULL},
                                   (const char *const[]){"tile", "48", "tile_overlap", "16", NULL}};
    for (int i = 0; i < 4; i++) {
        keys[i] = NULL;
        if (tile_form(FORM_UPSCALE, cases[i], detail, sizeof detail, 0, &o)[0]) continue;
        keys[i] = options_canonical(&o);
        options_free(&o);
    }
    CHECK(keys[0] && keys[1] && keys[2] && keys[3], "keys");
    if (keys[0] && keys[1] && keys[2] && keys[3])
        CHECK(!strcmp(keys[0], keys[1]) && strstr(keys[2], "tile=0\x1ftile_overlap=16") &&
                  strstr(keys[3], "tile=48\x1ftile_overlap=16"),
              "keys: %s | %s | %s", keys[0], keys[2], keys[3]);
    for (int i = 0; i < 4; i++) free(keys[i]);
}

/* ---- openapi.json ---------------------------------------------------------- */

static int schemas_checked;

/* One description of parameter e in openapi.json (`where` names it). */
static void check_described(const json_t *e, const json_t *s, const char *where, bool pattern) {
    const char *name = json_string_value(json_object_get(e, "name"));
    CHECK(json_is_object(s), "%s: %s is not described", where, name);
    if (!json_is_object(s)) return;
    CHECK(json_equal(json_object_get(s, "type"), json_object_get(e, "type")), "%s: %s type", where, name);
    static const char *const keys[][2] = {{"minimum", "minimum"}, {"maximum", "maximum"},
                                          {"maxLength", "max_length"}, {"default", "default"}};
    for (size_t k = 0; k < sizeof keys / sizeof keys[0]; k++) {
        const json_t *a = json_object_get(s, keys[k][0]), *b = json_object_get(e, keys[k][1]);
        if (pattern && !strcmp(keys[k][0], "default") && !a) continue; /* per-image: the shared value */
        bool same = (!a && !b) || (a && b && (json_equal(a, b) || same_number(a, b)));
        char *want = b ? json_dumps(b, JSON_ENCODE_ANY) : NULL, *got = a ? json_dumps(a, JSON_ENCODE_ANY) : NULL;
        CHECK(same, "%s: %s %s is %s, the table says %s", where, name, keys[k][0], got ? got : "absent",
              want ? want : "absent");
        free(want);
        free(got);
    }
    /* the engine's gap, which no range can state, as "not" in JSON bodies
     * (schemathesis fails on "not" beside multipart file parts) */
    if (!strcmp(name, "tile") && strstr(where, "application/json")) {
        const json_t *gap = json_object_get(s, "not");
        CHECK(json_integer_value(json_object_get(gap, "minimum")) == 1 &&
                  json_integer_value(json_object_get(gap, "maximum")) == SDX4_MIN_TILE - 1,
              "%s: tile lacks \"not\": 1 to %d", where, SDX4_MIN_TILE - 1);
    }
}

/* Every schema under `s` that describes any of the parameters describes
 * them all, as the table does. */
static void walk(const json_t *s, const json_t *parameters, const char *where) {
    const char *key;
    const json_t *v;
    size_t i;
    if (json_is_array(s)) {
        json_array_foreach(s, i, v) walk(v, parameters, where);
        return;
    }
    if (!json_is_object(s)) return;
    const json_t *props = json_object_get(s, "properties"), *patterns = json_object_get(s, "patternProperties"), *e;
    bool any = false;
    json_array_foreach(parameters, i, e) any |= json_object_get(props, json_string_value(json_object_get(e, "name"))) != NULL;
    if (any) {
        schemas_checked++;
        json_array_foreach(parameters, i, e)
            check_described(e, json_object_get(props, json_string_value(json_object_get(e, "name"))), where, false);
    }
    if (json_is_object(patterns)) {
        json_object_foreach((json_t *)patterns, key, v) {
            json_array_foreach(parameters, i, e) {
                char prefix[64];
                snprintf(prefix, sizeof prefix, "^%s\\[", json_string_value(json_object_get(e, "name")));
                if (!strncmp(key, prefix, strlen(prefix))) check_described(e, v, where, true), schemas_checked++;
            }
        }
    }
    json_object_foreach((json_t *)s, key, v) if (strcmp(key, "properties")) walk(v, parameters, where);
    json_object_foreach((json_t *)props, key, v) walk(v, parameters, where);
}

static void test_openapi(const form_limits *limits) {
    json_error_t jerr;
    json_t *spec = json_load_file(SDX4_SOURCE_DIR "/openapi.json", 0, &jerr);
    CHECK(spec != NULL, "openapi.json: %s", jerr.text);
    if (!spec) return;
    json_t *parameters = form_parameters(limits);
    static const char *const paths[] = {"/api/v1/upscale", "/api/v1/batch-upscale", "/api/v1/jobs"};
    for (size_t p = 0; p < sizeof paths / sizeof paths[0]; p++) {
        const json_t *content =
            json_object_get(json_object_get(json_object_get(json_object_get(json_object_get(spec, "paths"), paths[p]),
                                                            "post"),
                                            "requestBody"),
                            "content");
        const char *type;
        json_t *media;
        int before = schemas_checked;
        json_object_foreach((json_t *)content, type, media) {
            char where[128];
            snprintf(where, sizeof where, "%s %s", paths[p], type);
            walk(json_object_get(media, "schema"), parameters, where);
        }
        CHECK(schemas_checked > before, "%s: no request schema describes the parameters", paths[p]);
    }
    /* model-info's own description lists upscale_parameters */
    const json_t *info = json_object_get(json_object_get(json_object_get(spec, "components"), "schemas"), "ModelInfo");
    CHECK(json_object_get(json_object_get(info, "properties"), "upscale_parameters") != NULL,
          "ModelInfo lacks upscale_parameters");
    json_decref(parameters);
    json_decref(spec);
}

/* ---- the model field ------------------------------------------------------------ */

/* The `model` field picks one of the server's models by its exact name,
 * for the whole request (not per image), and an unknown one is refused
 * naming the field and listing the models. */
static void test_model_field(void) {
    static const char *const models[] = {"x4-upscaler", "rrdb_x4", "srvgg_x2_relu"};
    form_limits limits = {150, 1000, 8, models, 3};
    upscale_form f;
    form_init(&f, &limits, FORM_UPSCALE);
    CHECK(f.model == 0, "no model field: the default");
    CHECK(form_set_text(&f, "model", "rrdb_x4", 7) == 0 && f.model == 1, "model=rrdb_x4: %s", f.error.detail);
    CHECK(form_set_text(&f, "model", "x4-upscaler", 11) != 0 && !strcmp(f.error.field, "model"),
          "a second model accepted");
    form_free(&f);

    form_init(&f, &limits, FORM_JOB);
    CHECK(form_set_text(&f, "model", "rrdb", 4) != 0 && !strcmp(f.error.field, "model") &&
              !strcmp(f.error.allowed, "x4-upscaler, rrdb_x4 or srvgg_x2_relu") &&
              strstr(f.error.detail, "unknown model \"rrdb\"") && strstr(f.error.detail, "srvgg_x2_relu") &&
              problem_status(f.error.kind) == 422,
          "model=rrdb: %s (%s)", f.error.detail, f.error.allowed);
    form_free(&f);

    form_init(&f, &limits, FORM_BATCH); /* one model for the whole batch */
    CHECK(form_set_text(&f, "model[1]", "rrdb_x4", 7) != 0 && !strcmp(f.error.field, "model[1]"),
          "a per-image model accepted: %s", f.error.detail);
    form_free(&f);

    form_init(&f, &limits, FORM_BATCH);
    const char *body = "{\"model\": \"srvgg_x2_relu\", \"images\": [\"eA==\", \"eA==\"]}";
    CHECK(form_parse_json(&f, body, strlen(body)) == 0 && form_finish(&f) == 0 && f.model == 2,
          "JSON model: %s", f.error.detail);
    form_free(&f);

    form_init(&f, &limits, FORM_UPSCALE);
    body = "{\"model\": 1, \"image\": \"eA==\"}";
    CHECK(form_parse_json(&f, body, strlen(body)) != 0 && !strcmp(f.error.field, "model"), "a number as the model");
    form_free(&f);

    form_init(&f, &limits, FORM_BATCH);
    body = "{\"images\": [{\"image\": \"eA==\", \"model\": \"rrdb_x4\"}]}";
    CHECK(form_parse_json(&f, body, strlen(body)) != 0 && !strcmp(f.error.field, "model"),
          "an image's own model accepted: %s", f.error.detail);
    form_free(&f);
}

/* ---- metadata -------------------------------------------------------------------- */

static void test_metadata_field(void) {
    char detail[256];
    upscale_options o;
    const char *field = tile_form(FORM_UPSCALE, (const char *const[]){NULL}, detail, sizeof detail, 0, &o);
    char *off = options_canonical(&o);
    CHECK(!*field && !o.metadata, "off by default");
    options_free(&o);
    field = tile_form(FORM_UPSCALE, (const char *const[]){"metadata", "false", NULL}, detail, sizeof detail, 0, &o);
    char *named_off = options_canonical(&o);
    options_free(&o);
    field = tile_form(FORM_UPSCALE, (const char *const[]){"metadata", "TRUE", NULL}, detail, sizeof detail, 0, &o);
    char *on = options_canonical(&o);
    CHECK(!*field && o.metadata, "metadata=TRUE: %s", detail);
    options_free(&o);
    CHECK(off && named_off && on && !strcmp(off, named_off) && strcmp(off, on) && strstr(on, "metadata=1") &&
              !strstr(off, "metadata"),
          "cache keys: %s | %s", off, on);
    free(off), free(named_off), free(on);
    /* per image in a batch, over the shared value */
    field = tile_form(FORM_BATCH, (const char *const[]){"metadata", "true", "metadata[1]", "false", NULL}, detail,
                      sizeof detail, 1, &o);
    CHECK(!*field && !o.metadata, "image 1's own metadata=false: %s", detail);
    if (!*field) options_free(&o);
    /* anything but a boolean, named */
    const char *const bad[] = {"yes", "1", "", "true ", NULL};
    for (int i = 0; bad[i]; i++) {
        field = tile_form(FORM_UPSCALE, (const char *const[]){"metadata", bad[i], NULL}, detail, sizeof detail, 0,
                          NULL);
        CHECK(!strcmp(field, "metadata") && !strcmp(detail, "metadata must be true or false"), "metadata=%s: %s %s",
              bad[i], field, detail);
    }
    form_limits limits = {150, 1000, 8, NULL, 0};
    upscale_form f;
    const char *bodies[] = {"{\"metadata\": true, \"image\": \"eA==\"}", "{\"metadata\": \"true\", \"image\": \"eA==\"}",
                            "{\"metadata\": 1, \"image\": \"eA==\"}"};
    for (int i = 0; i < 3; i++) {
        form_init(&f, &limits, FORM_JOB);
        int rc = form_parse_json(&f, bodies[i], strlen(bodies[i]));
        if (i == 0) {
            CHECK(rc == 0 && form_finish(&f) == 0, "JSON true: %s", f.error.detail);
            form_resolve(&f, 0, &o);
            CHECK(o.metadata, "JSON true not kept");
            options_free(&o);
        } else {
            CHECK(rc != 0 && !strcmp(f.error.field, "metadata"), "JSON %s accepted", bodies[i]);
        }
        form_free(&f);
    }
}

int main(void) {
    test_model_field();
    test_metadata_field();
    form_limits limits;
    CHECK(default_limits(&limits) == 0, "default settings refused");
    test_form_parameters(&limits);
    form_limits narrow = {40, 10, 2, NULL, 0};
    test_form_parameters(&narrow);
    test_form_bounds(&limits);
    test_form_bounds(&narrow);
    test_tiles();
    test_openapi(&limits);
    printf("openapi.json: %d schemas checked\n", schemas_checked);
    return test_finish("test_server_params");
}
