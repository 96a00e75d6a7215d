/*
 * config.h - typed access to the JSON configs of a diffusers folder.
 *
 * Every getter names the file and key in its error, and the engine reads
 * every dimension from here. cfg_expect_*() is how a value the engine does
 * not implement is refused by name instead of being ignored:
 *   "unet/config.json: resnet_time_scale_shift=scale_shift is not supported"
 */
#ifndef SDX4_CONFIG_H
#define SDX4_CONFIG_H

#include <jansson.h>

typedef struct {
    json_t *root;
    char label[256]; /* "unet/config.json" */
} config;

/* Loads dir/file (file may contain a sub-folder: "unet/config.json"). */
int sdx4_cfg_load(config *c, const char *dir, const char *file);
/* Parses JSON text in memory (the fuzz target's entry). */
int sdx4_cfg_parse(config *c, const char *text, size_t len, const char *label);
void sdx4_cfg_free(config *c);

/* Getters: a missing key or JSON null gives the default; a value of the
 * wrong type is an error. */
int sdx4_cfg_int(const config *c, const char *key, int def, int *out);
int sdx4_cfg_float(const config *c, const char *key, double def, double *out);
int sdx4_cfg_bool(const config *c, const char *key, int def, int *out);
/* Returns a pointer into the config (valid until sdx4_cfg_free) or def. */
int sdx4_cfg_str(const config *c, const char *key, const char *def, const char **out);
/* An int array; a lone int is broadcast to `n` entries when `n` > 0
 * (attention_head_dim may be either). Fails unless the length is n. */
int sdx4_cfg_int_list(const config *c, const char *key, int n, int *out);
int sdx4_cfg_bool_list(const config *c, const char *key, int n, int *out);
/* A string array of at most `max` entries; *n receives its length. */
int sdx4_cfg_str_list(const config *c, const char *key, int max, const char **out, int *n);

/* Refuse a value the engine does not implement. A missing or null key
 * passes (diffusers' default is the supported one). */
int sdx4_cfg_expect_str(const config *c, const char *key, const char *supported);
int sdx4_cfg_expect_null(const config *c, const char *key);
int sdx4_cfg_expect_int(const config *c, const char *key, int supported);
int sdx4_cfg_expect_bool(const config *c, const char *key, int supported);
int sdx4_cfg_expect_float(const config *c, const char *key, double supported);

#endif
