/*
 * docs.c - /openapi.json and interactive documentation at /docs.
 *
 * openapi.json lives at the root of the repository and is assembled into
 * the binary (.incbin), so the server always describes itself with the
 * document its tests were checked against, wherever it is installed.
 *
 * /docs is Swagger UI served from local files, never a CDN. Debian ships
 * Swagger UI's dist folder in r-cran-swagger (/usr/lib/R/site-library/
 * swagger/dist3) and in python3-flasgger; --docs-assets may name any
 * other copy. The Debian copies are Swagger UI 3, which reads OpenAPI 3.0
 * only, so the page loads our 3.1 document and presents it as 3.0.3: the
 * document keeps to the subset of 3.1 that means the same in 3.0 (no type
 * arrays, no null types), so nothing is lost. Only the three files the
 * page loads are served, by exact name: no path from the URL ever reaches
 * the file system.
 */
#include "docs.h"

#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

__asm__(".section .rodata\n"
        ".global sdx4_openapi_json\n"
        ".hidden sdx4_openapi_json\n"
        "sdx4_openapi_json:\n"
        ".incbin \"" SDX4_OPENAPI_FILE "\"\n"
        ".global sdx4_openapi_json_end\n"
        ".hidden sdx4_openapi_json_end\n"
        "sdx4_openapi_json_end:\n"
        ".byte 0\n"
        ".previous\n");
extern const char sdx4_openapi_json[], sdx4_openapi_json_end[];

static const char *const known_dirs[] = {
    "/usr/lib/R/site-library/swagger/dist3",
    "/usr/lib/python3/dist-packages/flasgger/ui3/static",
    "/usr/share/sdx4/swagger-ui",
};

static const struct {
    const char *name, *type;
} assets[] = {
    {"swagger-ui.css", "text/css; charset=utf-8"},
    {"swagger-ui-bundle.js", "text/javascript; charset=utf-8"},
    {"swagger-ui-standalone-preset.js", "text/javascript; charset=utf-8"},
};

static char assets_dir[512];

static const char page_with_ui[] =
    "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
    "<title>sdx4 API</title>\n<link rel=\"stylesheet\" href=\"/docs/swagger-ui.css\">\n"
    "</head>\n<body>\n<div id=\"ui\"></div>\n"
    "<script src=\"/docs/swagger-ui-bundle.js\"></script>\n"
    "<script>\n"
    "fetch('/openapi.json').then(function (r) { return r.json(); }).then(function (spec) {\n"
    "  /* Swagger UI 3 reads OpenAPI 3.0; the document uses the 3.0-compatible part of 3.1.\n"
    "     validatorUrl: null keeps the page from calling the online validator. */\n"
    "  spec.openapi = '3.0.3';\n"
    "  SwaggerUIBundle({spec: spec, dom_id: '#ui', deepLinking: true, validatorUrl: null,\n"
    "                   presets: [SwaggerUIBundle.presets.apis]});\n"
    "});\n"
    "</script>\n</body>\n</html>\n";

static const char page_without_ui[] =
    "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
    "<title>sdx4 API</title>\n</head>\n<body>\n<h1>sdx4 API</h1>\n"
    "<p>The interactive documentation needs Swagger UI's files, which are not installed. "
    "Install the Debian package <code>r-cran-swagger</code> (or <code>python3-flasgger</code>), "
    "or start the server with <code>--docs-assets DIR</code>.</p>\n"
    "<p>The API description is at <a href=\"/openapi.json\">/openapi.json</a>.</p>\n"
    "</body>\n</html>\n";

static int has_assets(const char *dir) {
    for (size_t i = 0; i < sizeof assets / sizeof assets[0]; i++) {
        char path[640];
        snprintf(path, sizeof path, "%s/%s", dir, assets[i].name);
        if (access(path, R_OK) != 0) return 0;
    }
    return 1;
}

const char *docs_init(const char *dir) {
    assets_dir[0] = '\0';
    if (dir) {
        if (has_assets(dir)) snprintf(assets_dir, sizeof assets_dir, "%s", dir);
    } else {
        for (size_t i = 0; i < sizeof known_dirs / sizeof known_dirs[0] && !assets_dir[0]; i++)
            if (has_assets(known_dirs[i])) snprintf(assets_dir, sizeof assets_dir, "%s", known_dirs[i]);
    }
    return assets_dir[0] ? assets_dir : NULL;
}

const char *docs_openapi(size_t *len) {
    *len = (size_t)(sdx4_openapi_json_end - sdx4_openapi_json);
    return sdx4_openapi_json;
}

const char *docs_page(size_t *len) {
    const char *page = assets_dir[0] ? page_with_ui : page_without_ui;
    *len = strlen(page);
    return page;
}

int docs_asset(const char *name, const char **content_type, size_t *size) {
    if (!assets_dir[0]) return -1;
    for (size_t i = 0; i < sizeof assets / sizeof assets[0]; i++) {
        if (strcmp(name, assets[i].name) != 0) continue;
        char path[640];
        snprintf(path, sizeof path, "%s/%s", assets_dir, assets[i].name);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        struct stat st;
        if (fd < 0) return -1;
        if (fstat(fd, &st) != 0) {
            close(fd);
            return -1;
        }
        *content_type = assets[i].type;
        *size = (size_t)st.st_size;
        return fd;
    }
    return -1;
}
