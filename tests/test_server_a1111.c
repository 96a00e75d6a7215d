/*
 * test_server_a1111.c - AUTOMATIC1111's request bodies and sizes (a1111.c)
 * without a server: what each field takes and refuses, by name; the size
 * asked in each mode, exactly, and where it is left to the model; and the
 * resize and crop that make it (imageio_resize, runner_encode) hitting
 * every size exactly. tests/server/test_a1111.py drives the routes.
 */
#include <jansson.h>

#include "a1111.h"
#include "imageio.h"
#include "runner.h"
#include "test.h"

static const char *const models[] = {"model", "rrdb_x4", "srvgg_x2_relu"};
/* a 1x1 PNG, enough for the form (nothing is decoded here) */
static const char *const png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC";

/* Parses `body` for kind; returns the problem's field ("" none) and keeps
 * the request in *a and the model in *model. */
static const char *parse(form_kind kind, const char *body, a1111_request *a, int *model, char *detail) {
    static char field[64];
    upscale_form f;
    form_limits limits = {150, 1000, 8, models, 3};
    form_init(&f, &limits, kind);
    a1111_init(a);
    int rc = a1111_parse(&f, a, body, strlen(body));
    if (rc == 0) rc = form_finish(&f);
    snprintf(field, sizeof field, "%s", rc ? (f.error.field[0] ? f.error.field : "?") : "");
    snprintf(detail, 384, "%s", f.error.detail);
    *model = f.model;
    form_free(&f);
    return field;
}

static void test_fields(void) {
    char body[1024], detail[384];
    a1111_request a;
    int model;
    snprintf(body, sizeof body, "{\"image\": \"%s\"}", png);
    CHECK(!*parse(FORM_UPSCALE, body, &a, &model, detail) && model == 0 && a.resize_mode == 0 && a.factor == 2 &&
              a.width == 512 && a.height == 512 && a.crop,
          "defaults: %s", detail);
    snprintf(body, sizeof body,
             "{\"image\": \"data:image/png;base64,%s\", \"upscaler_1\": \"srvgg_x2_relu\", \"resize_mode\": 1, "
             "\"upscaling_resize\": 3.5, \"upscaling_resize_w\": 300, \"upscaling_resize_h\": 200.0, "
             "\"upscaling_crop\": false, \"upscaler_2\": \"None\", \"extras_upscaler_2_visibility\": 1, "
             "\"gfpgan_visibility\": 0, \"codeformer_visibility\": 0.0, \"codeformer_weight\": 1, "
             "\"show_extras_results\": false, \"upscale_first\": true}",
             png);
    CHECK(!*parse(FORM_UPSCALE, body, &a, &model, detail) && model == 2 && a.resize_mode == 1 && a.factor == 3.5 &&
              a.width == 300 && a.height == 200 && !a.crop,
          "every field: %s", detail);
    snprintf(body, sizeof body, "{\"imageList\": [{\"data\": \"%s\", \"name\": \"a.png\"}, {\"data\": \"%s\"}], "
             "\"upscaler_1\": \"rrdb_x4\", \"upscaler_2\": \"model\"}", png, png);
    CHECK(!*parse(FORM_BATCH, body, &a, &model, detail) && model == 1, "batch: %s", detail);

    static const struct {
        form_kind kind;
        const char *members, *field;
    } bad[] = {
        {FORM_UPSCALE, "\"upscaler_1\": \"None\"", "upscaler_1"},
        {FORM_UPSCALE, "\"upscaler_1\": 1", "upscaler_1"},
        {FORM_UPSCALE, "\"upscaler_2\": \"nope\"", "upscaler_2"},
        {FORM_UPSCALE, "\"upscaler_2\": \"rrdb_x4\", \"extras_upscaler_2_visibility\": 0.01",
         "extras_upscaler_2_visibility"},
        {FORM_UPSCALE, "\"extras_upscaler_2_visibility\": 1.01", "extras_upscaler_2_visibility"},
        {FORM_UPSCALE, "\"gfpgan_visibility\": 0.001", "gfpgan_visibility"},
        {FORM_UPSCALE, "\"codeformer_visibility\": 1", "codeformer_visibility"},
        {FORM_UPSCALE, "\"codeformer_weight\": -0.5", "codeformer_weight"},
        {FORM_UPSCALE, "\"resize_mode\": 0.5", "resize_mode"},
        {FORM_UPSCALE, "\"resize_mode\": true", "resize_mode"},
        {FORM_UPSCALE, "\"upscaling_resize\": 0", "upscaling_resize"},
        {FORM_UPSCALE, "\"upscaling_resize\": 8.000001", "upscaling_resize"},
        {FORM_UPSCALE, "\"upscaling_resize\": null", "upscaling_resize"},
        {FORM_UPSCALE, "\"upscaling_resize_w\": 16385", "upscaling_resize_w"},
        {FORM_UPSCALE, "\"upscaling_resize_h\": 99999999999999999999999", "upscaling_resize_h"},
        {FORM_UPSCALE, "\"upscaling_crop\": \"true\"", "upscaling_crop"},
        {FORM_UPSCALE, "\"show_extras_results\": 0", "show_extras_results"},
        {FORM_UPSCALE, "\"seed\": 1", "seed"},
        {FORM_UPSCALE, "\"imageList\": []", "imageList"},
        {FORM_BATCH, "\"image\": \"x\"", "image"},
        {FORM_BATCH, "\"imageList\": {}", "imageList"},
        {FORM_BATCH, "\"imageList\": [\"abc\"]", "imageList[0]"},
        {FORM_BATCH, "\"imageList\": [{\"data\": \"!\"}]", "imageList[0].data"},
        {FORM_BATCH, "\"imageList\": [{\"data\": 5}]", "imageList[0].data"},
        {FORM_BATCH, "\"imageList\": [{\"data\": \"AAAA\", \"name\": 5}]", "imageList[0]"},
        {FORM_BATCH, "\"imageList\": [{\"data\": \"AAAA\", \"image\": \"AAAA\"}]", "imageList[0]"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        if (bad[i].kind == FORM_BATCH) snprintf(body, sizeof body, "{%s}", bad[i].members);
        else snprintf(body, sizeof body, "{\"image\": \"%s\", %s}", png, bad[i].members);
        const char *field = parse(bad[i].kind, body, &a, &model, detail);
        CHECK(!strcmp(field, bad[i].field), "%s: refused as %s (%s)", bad[i].members, field, detail);
    }
    /* no image, an empty list, malformed bodies: problems without a field */
    CHECK(!strcmp(parse(FORM_UPSCALE, "{\"upscaler_1\": \"rrdb_x4\"}", &a, &model, detail), "?"), "no image");
    CHECK(!strcmp(parse(FORM_BATCH, "{\"imageList\": [{\"name\": \"a\"}]}", &a, &model, detail), "?") &&
              strstr(detail, "no \"data\""), "no data: %s", detail);
    CHECK(!strcmp(parse(FORM_UPSCALE, "[1]", &a, &model, detail), "?"), "not an object");
    CHECK(!strcmp(parse(FORM_UPSCALE, "{\"a\": 1, \"a\": 2}", &a, &model, detail), "?"), "duplicate keys");
}

/* a1111_size's resize and crop for a request. */
static void size(const a1111_request *a, int w, int h, int scale, int max_side, int *rc, upscale_options *o,
                 problem *p) {
    memset(o, 0, sizeof *o);
    memset(p, 0, sizeof *p);
    *rc = a1111_size(a, w, h, scale, max_side, o, p);
}

static void test_sizes(void) {
    a1111_request a;
    upscale_options o;
    problem p;
    int rc;
    a1111_init(&a);
    size(&a, 80, 64, 4, 512, &rc, &o, &p); /* by 2: 160 x 128 */
    CHECK(rc == 0 && o.resize_width == 160 && o.resize_height == 128 && !o.crop_width, "by 2: %d %dx%d", rc,
          o.resize_width, o.resize_height);
    a.factor = 4; /* the model's own: left as it is */
    size(&a, 80, 64, 4, 512, &rc, &o, &p);
    CHECK(rc == 0 && !o.resize_width && !o.resize_height && !o.crop_width, "by the scale");
    size(&a, 80, 64, 0, 512, &rc, &o, &p); /* scale unknown (an API node): resized, to the same */
    CHECK(rc == 0 && o.resize_width == 320 && o.resize_height == 256, "scale unknown");
    a.factor = 2.3; /* int(side x factor): 184 x 147 */
    size(&a, 80, 64, 2, 512, &rc, &o, &p);
    CHECK(rc == 0 && o.resize_width == 184 && o.resize_height == 147, "2.3: %dx%d", o.resize_width, o.resize_height);
    a.factor = 8; /* at most 8 x max-side */
    size(&a, 512, 64, 4, 512, &rc, &o, &p);
    CHECK(rc == 0 && o.resize_width == 4096, "by 8");
    a.factor = 0.001;
    size(&a, 80, 64, 4, 512, &rc, &o, &p);
    CHECK(rc == -1 && !strcmp(p.field, "upscaling_resize") && strstr(p.detail, "0x0"), "too small: %s", p.detail);

    a1111_init(&a);
    a.resize_mode = 1, a.width = 100, a.height = 100; /* cover 100 x 100: 125 x 100, its centre kept */
    size(&a, 80, 64, 4, 512, &rc, &o, &p);
    CHECK(rc == 0 && o.resize_width == 125 && o.resize_height == 100 && o.crop_width == 100 && o.crop_height == 100,
          "to 100x100: %dx%d crop %dx%d", o.resize_width, o.resize_height, o.crop_width, o.crop_height);
    a.crop = false;
    size(&a, 80, 64, 4, 512, &rc, &o, &p);
    CHECK(rc == 0 && o.resize_width == 125 && o.resize_height == 100 && !o.crop_width, "uncropped");
    a.crop = true, a.width = 160, a.height = 128; /* the same aspect: no crop; twice the input */
    size(&a, 80, 64, 2, 512, &rc, &o, &p);
    CHECK(rc == 0 && !o.resize_width && !o.crop_width, "the model's own size: %dx%d crop %dx%d", o.resize_width,
          o.resize_height, o.crop_width, o.crop_height);
    a.width = 7, a.height = 300; /* the height rules: 80 x 300 / 64 = 375 wide */
    size(&a, 80, 64, 4, 512, &rc, &o, &p);
    CHECK(rc == 0 && o.resize_width == 375 && o.resize_height == 300 && o.crop_width == 7, "tall: %dx%d",
          o.resize_width, o.resize_height);
    a.width = 4096, a.height = 4096; /* covering 4096 x 4096 makes 5120 x 4096 */
    size(&a, 80, 64, 4, 512, &rc, &o, &p);
    CHECK(rc == -1 && !strcmp(p.field, "upscaling_resize_h") && strstr(p.detail, "5120x4096"), "too large: %s",
          p.detail);
    size(&a, 64, 64, 4, 2048, &rc, &o, &p); /* within 8 x 2048 */
    CHECK(rc == 0 && o.resize_width == 4096, "a larger max-side");
    a.width = 16384, a.height = 16384; /* 8 x 4096 would be 32768: imageio's 16384 is the bound */
    size(&a, 64, 64, 4, 4096, &rc, &o, &p);
    CHECK(rc == 0 && o.resize_width == 16384, "16384");
    a.width = 16384, a.height = 16383;
    size(&a, 64, 65, 4, 4096, &rc, &o, &p);
    CHECK(rc == -1 && !strcmp(p.field, "upscaling_resize_w"), "over 16384: %s", p.detail);
}

/* runner_encode with a resize and a crop: the sizes asked, exactly, and
 * the crop the centre of the resized image. */
static void test_resize(void) {
    sdx4_image in = {.width = 37, .height = 23, .pixels = malloc(37 * 23 * 3)};
    for (int i = 0; i < 37 * 23 * 3; i++) in.pixels[i] = (uint8_t)(i * 7);
    static const int sizes[][2] = {{1, 1}, {18, 11}, {74, 46}, {111, 23}, {100, 61}, {37, 23}, {999, 7}};
    for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
        sdx4_image out;
        char err[256];
        int rc = imageio_resize(&in, sizes[k][0], sizes[k][1], &out, err, sizeof err);
        CHECK(rc == 0 && out.width == sizes[k][0] && out.height == sizes[k][1], "%dx%d: %s", sizes[k][0], sizes[k][1],
              rc ? err : "wrong size");
        if (rc == 0) sdx4_image_free(&out);
    }
    sdx4_image out;
    char err[256];
    CHECK(imageio_resize(&in, 0, 5, &out, err, sizeof err) == -1, "a side of 0");
    CHECK(imageio_resize(&in, 16385, 5, &out, err, sizeof err) == -1, "a side over 16384");

    /* resized to 74 x 46 then cropped to 30 x 20: the centre of the resize */
    sdx4_image big;
    CHECK(imageio_resize(&in, 74, 46, &big, err, sizeof err) == 0, "%s", err);
    upscale_options o = {.format = IMAGE_PNG, .resize_width = 74, .resize_height = 46, .crop_width = 30,
                         .crop_height = 20};
    sdx4_image copy = {.width = in.width, .height = in.height, .pixels = malloc(37 * 23 * 3)};
    memcpy(copy.pixels, in.pixels, 37 * 23 * 3);
    task_outcome outcome = {0};
    runner_encode(&copy, &o, NULL, &outcome);
    CHECK(outcome.state == JOB_SUCCEEDED && outcome.width == 30 && outcome.height == 20, "crop: %d %dx%d %s",
          outcome.state, outcome.width, outcome.height, outcome.error.detail);
    sdx4_image decoded = {0};
    if (outcome.state == JOB_SUCCEEDED && imageio_decode(outcome.output, outcome.len, &decoded, err, sizeof err) == 0) {
        bool same = true;
        for (int y = 0; y < 20; y++)
            same &= !memcmp(decoded.pixels + (size_t)y * 30 * 3, big.pixels + ((size_t)(y + 13) * 74 + 22) * 3, 30 * 3);
        CHECK(same, "the crop is not the centre (left 22, top 13)");
        sdx4_image_free(&decoded);
    }
    free(outcome.output);
    /* a crop the resize does not cover fails the task, naming why */
    o = (upscale_options){.format = IMAGE_PNG, .crop_width = 38, .crop_height = 2};
    copy = (sdx4_image){.width = in.width, .height = in.height, .pixels = malloc(37 * 23 * 3)};
    memcpy(copy.pixels, in.pixels, 37 * 23 * 3);
    outcome = (task_outcome){0};
    runner_encode(&copy, &o, NULL, &outcome);
    CHECK(outcome.state == JOB_FAILED && strstr(outcome.error.detail, "38x2"), "uncovered crop: %s",
          outcome.error.detail);
    sdx4_image_free(&big);
    sdx4_image_free(&in);
}

/* GET /sdapi/v1/upscalers from the models' list. */
static void test_upscalers(void) {
    json_t *models = json_loads("{\"models\": [{\"name\": \"a\", \"architecture\": \"RRDBNet\", \"scale\": 4},"
                                "{\"name\": \"b\", \"default\": false, \"ready\": false}]}",
                                0, NULL);
    json_t *list = a1111_upscalers(models);
    json_t *want = json_loads("[{\"name\": \"a\", \"model_name\": \"RRDBNet\", \"model_path\": null, \"model_url\": "
                              "null, \"scale\": 4.0}, {\"name\": \"b\", \"model_name\": null, \"model_path\": null, "
                              "\"model_url\": null, \"scale\": null}]",
                              0, NULL);
    CHECK(json_equal(list, want), "upscalers: %s", json_dumps(list, JSON_COMPACT));
    json_decref(want);
    json_decref(list);
    json_decref(models);
}

int main(void) {
    if (imageio_init("test_server_a1111")) return 1;
    test_fields();
    test_sizes();
    test_resize();
    test_upscalers();
    imageio_shutdown();
    return test_finish("test_server_a1111");
}
