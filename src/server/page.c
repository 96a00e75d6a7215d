/*
 * page.c - the web page at GET /: upscale from a browser.
 *
 * The page is one file, src/server/page/index.html: HTML, CSS and plain
 * JavaScript with no build step and nothing fetched from elsewhere. It is
 * assembled into the binary as openapi.json is (docs.c): the assembler's
 * .incbin reads the file named by SDX4_PAGE_FILE, which CMakeLists.txt
 * defines, and CMake rebuilds this file when the page changes. So the
 * page always matches the server it comes from, wherever that is
 * installed, and editing it needs no tool but an editor.
 *
 * The page is a client of the public API like any other (model-info,
 * models, jobs, their events and results), with the caller's API key when
 * the server wants one: it needs no key itself, and grants nothing.
 *
 * Its one <style> and one <script> are inline, so the page is a single
 * answer. The Content-Security-Policy admits exactly those two by their
 * SHA-256, computed here once from the bytes served, rather than any
 * inline code ('unsafe-inline'); connections go to this origin only and
 * images come from it or from the page's own blob: URLs (the chosen file,
 * the result). Editing the page changes the hashes with it.
 */
#include "page.h"

#include <nettle/sha2.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base64.h"

__asm__(".section .rodata\n"
        ".global sdx4_page_html\n"
        ".hidden sdx4_page_html\n"
        "sdx4_page_html:\n"
        ".incbin \"" SDX4_PAGE_FILE "\"\n"
        ".global sdx4_page_html_end\n"
        ".hidden sdx4_page_html_end\n"
        "sdx4_page_html_end:\n"
        ".byte 0\n"
        ".previous\n");
extern const char sdx4_page_html[], sdx4_page_html_end[];

static pthread_once_t csp_once = PTHREAD_ONCE_INIT;
static char csp[512];

/* 'sha256-...' of the text between the first <tag> and </tag> (the page
 * writes neither tag before its element), or 'none' when there is none. */
static void element_hash(const char *tag, char *out, size_t size) {
    char open[16], close[16];
    snprintf(open, sizeof open, "<%s>", tag);
    snprintf(close, sizeof close, "</%s>", tag);
    const char *start = strstr(sdx4_page_html, open);
    const char *end = start ? strstr(start, close) : NULL;
    snprintf(out, size, "'none'");
    if (!end) return;
    start += strlen(open);
    uint8_t digest[SHA256_DIGEST_SIZE];
    struct sha256_ctx ctx;
    sha256_init(&ctx);
    sha256_update(&ctx, (size_t)(end - start), (const uint8_t *)start);
    sha256_digest(&ctx, sizeof digest, digest);
    char *b64 = base64_encode(digest, sizeof digest, NULL);
    if (b64) snprintf(out, size, "'sha256-%s'", b64);
    free(b64);
}

static void make_csp(void) {
    char style[64], script[64];
    element_hash("style", style, sizeof style);
    element_hash("script", script, sizeof script);
    snprintf(csp, sizeof csp,
             "default-src 'none'; style-src %s; script-src %s; connect-src 'self'; img-src 'self' blob:; "
             "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
             style, script);
}

struct MHD_Response *page_response(void) {
    pthread_once(&csp_once, make_csp);
    struct MHD_Response *resp = MHD_create_response_from_buffer(
        (size_t)(sdx4_page_html_end - sdx4_page_html), (void *)sdx4_page_html, MHD_RESPMEM_PERSISTENT);
    if (!resp) return NULL;
    MHD_add_response_header(resp, "Content-Type", "text/html; charset=utf-8");
    MHD_add_response_header(resp, "Content-Security-Policy", csp);
    MHD_add_response_header(resp, "X-Content-Type-Options", "nosniff");
    MHD_add_response_header(resp, "Referrer-Policy", "no-referrer");
    MHD_add_response_header(resp, "Cache-Control", "no-cache");
    return resp;
}
