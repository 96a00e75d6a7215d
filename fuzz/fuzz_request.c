/*
 * fuzz_request.c - arbitrary bytes as the inputs of an upscale request, as
 * the HTTP layer hands them to form.c: a JSON body (single, job or batch),
 * a series of multipart fields and query values (name NUL value NUL ...,
 * streamed image parts included), an Accept header, base64, and a raw
 * multipart/form-data body for multipart.c (fed in two pieces); the JSON
 * bodies also as AUTOMATIC1111's (a1111.c). Every
 * input must end in a resolved set of options or a problem naming the
 * fault; none may crash, leak or read out of bounds.
 *
 * The first byte chooses the encoding and the endpoint; the rest is the
 * payload.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "a1111.h"
#include "base64.h"
#include "form.h"
#include "multipart.h"

static void finish(upscale_form *f) {
    if (form_finish(f) == 0) {
        for (int i = 0; i < f->nimages; i++) {
            upscale_options o;
            form_resolve(f, i, &o);
            free(options_canonical(&o));
            options_free(&o);
        }
    } else if (!f->error.kind) {
        abort(); /* a refusal always says why */
    }
    problem_status(f->error.kind);
    form_free(f);
}

static int part_seen(void *cls, const char *name, bool file) {
    (void)file;
    if (!name) abort();
    ++*(int *)cls;
    return 0;
}

static int data_seen(void *cls, const char *data, size_t len) {
    if (!*(int *)cls || !len || !data) abort(); /* content only inside a part, never empty */
    return 0;
}

/* name NUL value NUL ...; the name "image" streams its value as a part */
static void fields(upscale_form *f, const char *p, size_t n) {
    while (n) {
        const char *name_end = memchr(p, '\0', n);
        if (!name_end) break;
        size_t name_len = (size_t)(name_end - p) + 1;
        const char *value = p + name_len;
        size_t left = n - name_len;
        const char *value_end = memchr(value, '\0', left);
        size_t value_len = value_end ? (size_t)(value_end - value) : left;
        if (strcmp(p, "image") == 0) {
            if (form_image_begin(f) == 0) {
                form_image_append(f, value, value_len / 2);
                form_image_append(f, value + value_len / 2, value_len - value_len / 2);
            }
        } else {
            form_set_text(f, p, value, value_len);
        }
        size_t used = name_len + value_len + (value_end ? 1 : 0);
        p += used;
        n -= used;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    const char *payload = (const char *)data + 1;
    size_t n = size - 1;
    static const char *const models[] = {"x4-upscaler", "rrdb_x4"};
    form_limits limits = {150, 200, 8, models, 2};
    upscale_form f;
    form_kind kind = (form_kind)(data[0] % 3);
    switch (data[0] / 3 % 5) {
    case 0:
        if (form_init(&f, &limits, kind) == 0) {
            form_parse_json(&f, payload, n);
            finish(&f);
        }
        /* the same body as AUTOMATIC1111's extra-single-image or
         * extra-batch-images (a1111.c), and the sizes it asks for */
        if (kind != FORM_JOB && form_init(&f, &limits, kind) == 0) {
            a1111_request a;
            a1111_init(&a);
            if (a1111_parse(&f, &a, payload, n) == 0) {
                upscale_options o = {0};
                problem p = {0};
                if (a1111_size(&a, 64, 48, 4, 512, &o, &p) && !p.kind) abort();
                if (a1111_size(&a, 2048, 1, 0, 2048, &o, &p) && !p.kind) abort();
            } else if (!f.error.kind) {
                abort();
            }
            finish(&f);
        }
        break;
    case 1:
        if (form_init(&f, &limits, kind) == 0) {
            fields(&f, payload, n);
            finish(&f);
        }
        break;
    case 2: {
        char *accept = malloc(n + 1);
        if (!accept) return 0;
        memcpy(accept, payload, n);
        accept[n] = '\0';
        image_format format = IMAGE_UNKNOWN;
        form_accept_format(accept, &format);
        free(accept);
        break;
    }
    case 3: {
        size_t len;
        void *bytes = base64_decode(payload, n, &len);
        if (bytes) {
            char *again = base64_encode(bytes, len, NULL);
            size_t len2;
            void *round = again ? base64_decode(again, strlen(again), &len2) : NULL;
            if (round && (len2 != len || memcmp(round, bytes, len) != 0)) abort();
            free(round);
            free(again);
            free(bytes);
        }
        break;
    }
    case 4: {
        int parts = 0;
        const char *why;
        multipart *m = multipart_new("multipart/form-data; boundary=b", part_seen, data_seen, &parts, &why);
        if (!m) return 0;
        size_t half = n / 2;
        if (multipart_feed(m, payload, half) == 0 && multipart_feed(m, payload + half, n - half) == 0)
            multipart_end(m);
        else if (!*multipart_error(m))
            abort(); /* a refusal always says why */
        multipart_free(m);
        break;
    }
    }
    return 0;
}
