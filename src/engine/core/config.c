/* config.c - JSON config getters with errors that name file and key. */
#include "core/config.h"

#include <math.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>

#include "core/error.h"

int sdx4_cfg_parse(config *c, const char *text, size_t len, const char *label) {
    json_error_t e;
    snprintf(c->label, sizeof c->label, "%s", label);
    c->root = json_loadb(text, len, 0, &e);
    if (!json_is_object(c->root)) {
        sdx4_set_error(SDX4_ERR_MODEL, "%s: %s at line %d", label,
                  c->root ? "not a JSON object" : e.text, e.line);
        json_decref(c->root);
        c->root = NULL;
        return -1;
    }
    return 0;
}

int sdx4_cfg_load(config *c, const char *dir, const char *file) {
    char path[4096];
    json_error_t e;
    snprintf(path, sizeof path, "%s/%s", dir, file);
    snprintf(c->label, sizeof c->label, "%s", file);
    c->root = json_load_file(path, 0, &e);
    if (!c->root) {
        FILE *f = fopen(path, "rb");
        if (!f) {
            sdx4_set_error(SDX4_ERR_MODEL, "%s: missing (looked in %s)", file, dir);
            return -1;
        }
        fclose(f);
        if (!e.text[0]) { /* jansson names every syntax error: its allocator failed */
            sdx4_set_error(SDX4_ERR_NO_MEMORY, "%s: out of memory", file);
            return -1;
        }
        sdx4_set_error(SDX4_ERR_MODEL, "%s: malformed JSON: %s at line %d", file, e.text, e.line);
        return -1;
    }
    if (!json_is_object(c->root)) {
        sdx4_set_error(SDX4_ERR_MODEL, "%s: not a JSON object", file);
        sdx4_cfg_free(c);
        return -1;
    }
    return 0;
}

void sdx4_cfg_free(config *c) {
    json_decref(c->root);
    c->root = NULL;
}

static json_t *get(const config *c, const char *key) {
    json_t *v = json_object_get(c->root, key);
    return json_is_null(v) ? NULL : v;
}

static int type_error(const config *c, const char *key, const char *want) {
    sdx4_set_error(SDX4_ERR_MODEL, "%s: %s must be %s", c->label, key, want);
    return -1;
}

int sdx4_cfg_int(const config *c, const char *key, int def, int *out) {
    json_t *v = get(c, key);
    if (!v) { *out = def; return 0; }
    if (!json_is_integer(v) || json_integer_value(v) < -(1 << 30) || json_integer_value(v) > (1 << 30))
        return type_error(c, key, "an integer");
    *out = (int)json_integer_value(v);
    return 0;
}

int sdx4_cfg_float(const config *c, const char *key, double def, double *out) {
    json_t *v = get(c, key);
    if (!v) { *out = def; return 0; }
    if (!json_is_number(v) || !isfinite(json_number_value(v))) return type_error(c, key, "a number");
    *out = json_number_value(v);
    return 0;
}

int sdx4_cfg_bool(const config *c, const char *key, int def, int *out) {
    json_t *v = get(c, key);
    if (!v) { *out = def; return 0; }
    if (!json_is_boolean(v)) return type_error(c, key, "true or false");
    *out = json_is_true(v);
    return 0;
}

int sdx4_cfg_str(const config *c, const char *key, const char *def, const char **out) {
    json_t *v = get(c, key);
    if (!v) { *out = def; return 0; }
    if (!json_is_string(v)) return type_error(c, key, "a string");
    *out = json_string_value(v);
    return 0;
}

static int list(const config *c, const char *key, int n, int *out, int booleans) {
    json_t *v = get(c, key);
    const char *want = booleans ? "a boolean or a list of booleans" : "an integer or a list of integers";
    if (!v) {
        sdx4_set_error(SDX4_ERR_MODEL, "%s: %s is missing", c->label, key);
        return -1;
    }
    if (booleans ? json_is_boolean(v) : json_is_integer(v)) {
        for (int i = 0; i < n; i++) out[i] = booleans ? json_is_true(v) : (int)json_integer_value(v);
        return n > 0 ? 0 : type_error(c, key, "a list");
    }
    if (!json_is_array(v)) return type_error(c, key, want);
    if ((int)json_array_size(v) != n) {
        sdx4_set_error(SDX4_ERR_MODEL, "%s: %s has %zu entries, expected %d", c->label, key,
                  json_array_size(v), n);
        return -1;
    }
    for (int i = 0; i < n; i++) {
        json_t *e = json_array_get(v, i);
        if (booleans ? !json_is_boolean(e) : !json_is_integer(e)) return type_error(c, key, want);
        if (!booleans && (json_integer_value(e) < 0 || json_integer_value(e) > (1 << 20)))
            return type_error(c, key, "a list of sizes");
        out[i] = booleans ? json_is_true(e) : (int)json_integer_value(e);
    }
    return 0;
}

int sdx4_cfg_int_list(const config *c, const char *key, int n, int *out) { return list(c, key, n, out, 0); }
int sdx4_cfg_bool_list(const config *c, const char *key, int n, int *out) { return list(c, key, n, out, 1); }

int sdx4_cfg_str_list(const config *c, const char *key, int max, const char **out, int *n) {
    json_t *v = get(c, key);
    if (!json_is_array(v) || json_array_size(v) == 0) return type_error(c, key, "a non-empty list of strings");
    if ((int)json_array_size(v) > max) {
        sdx4_set_error(SDX4_ERR_MODEL, "%s: %s has %zu entries, at most %d are supported", c->label, key,
                  json_array_size(v), max);
        return -1;
    }
    *n = (int)json_array_size(v);
    for (int i = 0; i < *n; i++) {
        json_t *e = json_array_get(v, i);
        if (!json_is_string(e)) return type_error(c, key, "a list of strings");
        out[i] = json_string_value(e);
    }
    return 0;
}

static int unsupported(const config *c, const char *key, json_t *v) {
    char *text = json_dumps(v, JSON_ENCODE_ANY | JSON_COMPACT);
    if (text && text[0] == '"') { /* strings read better unquoted */
        text[strlen(text) - 1] = 0;
        memmove(text, text + 1, strlen(text));
    }
    sdx4_set_error(SDX4_ERR_MODEL, "%s: %s=%s is not supported", c->label, key, text ? text : "?");
    free(text);
    return -1;
}

int sdx4_cfg_expect_str(const config *c, const char *key, const char *supported) {
    json_t *v = get(c, key);
    if (!v || (json_is_string(v) && !strcmp(json_string_value(v), supported))) return 0;
    return unsupported(c, key, v);
}

int sdx4_cfg_expect_null(const config *c, const char *key) {
    json_t *v = get(c, key);
    return v ? unsupported(c, key, v) : 0;
}

int sdx4_cfg_expect_int(const config *c, const char *key, int supported) {
    json_t *v = get(c, key);
    if (!v || (json_is_integer(v) && json_integer_value(v) == supported)) return 0;
    return unsupported(c, key, v);
}

int sdx4_cfg_expect_bool(const config *c, const char *key, int supported) {
    json_t *v = get(c, key);
    if (!v || (json_is_boolean(v) && json_is_true(v) == supported)) return 0;
    return unsupported(c, key, v);
}

int sdx4_cfg_expect_float(const config *c, const char *key, double supported) {
    json_t *v = get(c, key);
    if (!v || (json_is_number(v) && json_number_value(v) == supported)) return 0;
    return unsupported(c, key, v);
}
