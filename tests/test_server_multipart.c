/*
 * test_server_multipart.c - the multipart/form-data reader (multipart.c):
 * bodies RFC 2046 allows (one-character boundaries, preamble, epilogue,
 * padding, delimiter look-alikes in content) read the same whatever the
 * pieces they arrive in, and malformed ones are refused with a reason.
 */
#include <stdbool.h>

#include "multipart.h"
#include "test.h"

/* What a body read to: "[name]content" per part. */
typedef struct {
    char out[4096];
    size_t len;
} collected;

static int on_part(void *cls, const char *name, bool file) {
    collected *c = cls;
    c->len += (size_t)snprintf(c->out + c->len, sizeof c->out - c->len, file ? "[%s file]" : "[%s]", name);
    return 0;
}

static int on_data(void *cls, const char *data, size_t len) {
    collected *c = cls;
    if (c->len + len >= sizeof c->out) return -1;
    memcpy(c->out + c->len, data, len);
    c->len += len;
    c->out[c->len] = '\0';
    return 0;
}

/* Feeds body in pieces of `piece` bytes (0: whole); returns 0 when the
 * body was read to its end, with what it held in c. */
static int read_body(const char *type, const char *body, size_t len, size_t piece, collected *c,
                     char *error, size_t error_size) {
    memset(c, 0, sizeof *c);
    const char *why = "";
    multipart *m = multipart_new(type, on_part, on_data, c, &why);
    if (!m) {
        snprintf(error, error_size, "%s", why ? why : "out of memory");
        return -1;
    }
    int rc = 0;
    for (size_t i = 0; i < len && rc == 0;) {
        size_t n = piece && piece < len - i ? piece : len - i;
        rc = multipart_feed(m, body + i, n);
        i += n;
    }
    if (rc == 0) rc = multipart_end(m);
    snprintf(error, error_size, "%s", multipart_error(m));
    multipart_free(m);
    return rc;
}

/* The body reads to `want` in one piece, in pieces of every size up to 9
 * bytes, and split in two at every byte. */
static void check_reads(const char *what, const char *type, const char *body, size_t len,
                        const char *want) {
    collected c;
    char error[128];
    for (size_t piece = 0; piece <= 9; piece++) {
        int rc = read_body(type, body, len, piece, &c, error, sizeof error);
        CHECK(rc == 0 && strcmp(c.out, want) == 0, "%s (pieces of %zu): rc %d, read \"%s\" (%s)", what,
              piece, rc, c.out, error);
    }
    for (size_t cut = 1; cut < len; cut++) {
        memset(&c, 0, sizeof c);
        const char *why;
        multipart *m = multipart_new(type, on_part, on_data, &c, &why);
        int rc = multipart_feed(m, body, cut);
        if (rc == 0) rc = multipart_feed(m, body + cut, len - cut);
        if (rc == 0) rc = multipart_end(m);
        CHECK(rc == 0 && strcmp(c.out, want) == 0, "%s (cut at %zu): rc %d, read \"%s\"", what, cut, rc,
              c.out);
        multipart_free(m);
    }
}

static void check_refused(const char *what, const char *type, const char *body, const char *reason) {
    collected c;
    char error[128];
    for (size_t piece = 0; piece <= 3; piece++) {
        int rc = read_body(type, body, strlen(body), piece, &c, error, sizeof error);
        CHECK(rc == -1 && strstr(error, reason), "%s (pieces of %zu): rc %d, error \"%s\"", what, piece, rc,
              error);
    }
}

#define READS(what, type, body, want) check_reads(what, type, body, sizeof body - 1, want)

int main(void) {
    const char *b = "multipart/form-data; boundary=B";
    READS("one-character boundary", b,
          "--B\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\na cat\r\n"
          "--B\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
          "Content-Type: image/png\r\n\r\n\x89PNG\r\n--B--\r\n",
          "[prompt]a cat[image file]\x89PNG");
    READS("epilogue and preamble", b,
          "preamble --B here\r\n--B\r\nContent-Disposition: form-data; name=a\r\n\r\n1\r\n--B--\r\n"
          "the epilogue: \r\n--B\r\nnot a part\r\n",
          "[a]1");
    READS("closing delimiter without CRLF", b,
          "--B\r\nContent-Disposition: form-data; name=a\r\n\r\n1\r\n--B--", "[a]1");
    READS("transport padding after a delimiter", b,
          "--B \t\r\ncontent-disposition: Form-Data; NAME=a\r\n\r\n1\r\n--B--\r\n", "[a]1");
    READS("delimiter look-alikes in content", b,
          "--B\r\nContent-Disposition: form-data; name=a\r\n\r\n\r\r\n-\r\n-B\r\n--\r\r\n--C\r\n--B\r\n"
          "Content-Disposition: form-data; name=b\r\n\r\n\r\n\r\n--B--\r\n",
          "[a]\r\r\n-\r\n-B\r\n--\r\r\n--C[b]\r\n");
    READS("empty content and an empty name", b,
          "--B\r\nContent-Disposition: form-data; name=\"\"\r\n\r\n\r\n--B--\r\n", "[]");
    READS("quoted boundary among other parameters",
          "Multipart/Form-Data; charset=utf-8; Boundary=\"a b:c\"; x=y",
          "--a b:c\r\nContent-Disposition: form-data; name=\"q\\\"x\"; filename=\"f;g\"\r\n\r\nv\r\n--a b:c--",
          "[q\"x file]v");

    check_refused("no closing delimiter", b, "--B\r\nContent-Disposition: form-data; name=a\r\n\r\n1\r\n",
                  "ends before its closing boundary");
    check_refused("only a preamble", b, "no delimiter at all", "ends before its closing boundary");
    check_refused("a part without a name", b,
                  "--B\r\nContent-Disposition: form-data; filename=x\r\n\r\n1\r\n--B--",
                  "not form-data with one name");
    check_refused("a part without Content-Disposition", b, "--B\r\nContent-Type: text/plain\r\n\r\n1\r\n--B--",
                  "no Content-Disposition");
    check_refused("two names", b, "--B\r\nContent-Disposition: form-data; name=a; name=b\r\n\r\n1\r\n--B--",
                  "one name");
    check_refused("a header line without a colon", b, "--B\r\nbroken\r\n\r\n1\r\n--B--", "no colon");
    check_refused("junk after a delimiter", b, "--B\r\nContent-Disposition: form-data; name=a\r\n\r\n1\r\n--Bx",
                  "neither CRLF");
    check_refused("bare LF after a delimiter", b, "--B\rX", "does not end with CRLF");

    collected c;
    char error[128];
    static const char nul_body[] = "--B\r\nContent-Disposition: form-data; name=a\0b\r\n\r\n1\r\n--B--";
    CHECK(read_body(b, nul_body, sizeof nul_body - 1, 0, &c, error, sizeof error) == -1 && strstr(error, "NUL"),
          "NUL in part headers: %s", error);

    static char big[MULTIPART_MAX_HEADERS + 200];
    int n = snprintf(big, sizeof big, "--B\r\nContent-Disposition: form-data; name=a\r\nX-Pad: ");
    memset(big + n, 'p', MULTIPART_MAX_HEADERS);
    memcpy(big + n + MULTIPART_MAX_HEADERS, "\r\n\r\n1\r\n--B--", 13);
    check_refused("part headers over the limit", b, big, "headers are over");

    /* Content-Types that name no usable boundary */
    static char long_type[MULTIPART_MAX_BOUNDARY + 64];
    n = snprintf(long_type, sizeof long_type, "multipart/form-data; boundary=");
    memset(long_type + n, 'x', MULTIPART_MAX_BOUNDARY + 1);
    const char *bad_types[] = {"multipart/form-data", "multipart/form-data; boundary=",
                               "multipart/form-data; boundary=\"\"", "multipart/form-data; boundary=a; boundary=b",
                               "multipart/form-dataX; boundary=a", "multipart/form-data; boundary=\"open",
                               "text/plain; boundary=a", long_type};
    for (size_t i = 0; i < sizeof bad_types / sizeof bad_types[0]; i++) {
        const char *why = NULL;
        multipart *m = multipart_new(bad_types[i], on_part, on_data, &c, &why);
        CHECK(!m && why && strstr(why, "boundary"), "Content-Type %.60s accepted", bad_types[i]);
        multipart_free(m);
    }
    return test_finish("test_server_multipart");
}
