/*
 * models.c - the models one server or worker serves (see models.h).
 *
 * Names. A request names its model by the folder's name, which the
 * operator already chose and sees in the log; a name must be unique, so
 * two folders of one name (a/x4 and b/x4) are refused at start rather
 * than one silently hiding the other. --model-id renames the first model
 * only, as it named the only one before several could be served.
 *
 * What applies. The engine takes one parameter table for every model
 * (sdx4_params); a GAN reads only `tile` of it (sdx4.h) and ignores the
 * rest, which the server still checks against the table's ranges, so that
 * a request valid for one model is valid for every other. The model list
 * says which parameters matter for each.
 *
 * Versions. A model's name says what the operator calls it, not which
 * weights answer: a folder updated in place keeps its name. So every
 * loaded model has a digest of its weight files (SHA-256 over each file's
 * name, size and bytes, in the engine's order), which every answer, job
 * and history row carries beside the name. It costs one read of the
 * files at load (about a second per GB, logged), in the loader thread.
 */
#include "models.h"

#include <dirent.h>
#include <errno.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nettle/sha2.h>

#include "cost.h"
#include "log.h"

static bool exists(const char *dir, const char *file) {
    char path[2048];
    snprintf(path, sizeof path, "%s/%s", dir, file);
    return access(path, F_OK) == 0;
}

/* A folder the engine opens: a diffusers one, or a GAN's (sdx4.h). */
static bool is_model_folder(const char *dir) {
    return exists(dir, "model_index.json") || (exists(dir, "config.json") && exists(dir, "model.safetensors"));
}

/* Appends a model of folder `dir`, named `name` (NULL: the folder's name). */
static int add(served_model **models, int *count, const char *dir, const char *name, char *err, size_t n) {
    if (*count >= MAX_MODELS) return snprintf(err, n, "more than %d models", MAX_MODELS), -1;
    char path[1024];
    if (strlen(dir) >= sizeof path) return snprintf(err, n, "%.200s...: the folder's path is too long", dir), -1;
    snprintf(path, sizeof path, "%s", dir);
    size_t len = strlen(path);
    while (len > 1 && path[len - 1] == '/') path[--len] = '\0';
    const char *base = name ? name : basename(path);
    if (!*base || strlen(base) >= sizeof (*models)->name)
        return snprintf(err, n, "%s: a model's name (%s) must have 1 to %zu characters", dir,
                        name ? "--model-id" : "its folder's name", sizeof (*models)->name - 1), -1;
    for (int i = 0; i < *count; i++)
        if (strcmp((*models)[i].name, base) == 0)
            return snprintf(err, n, "two models are named \"%s\" (%s and %s): models are named by their folder's "
                            "name, which must be unique", base, (*models)[i].dir, dir), -1;
    served_model *grown = realloc(*models, sizeof *grown * (size_t)(*count + 1));
    if (!grown) return snprintf(err, n, "out of memory"), -1;
    *models = grown;
    served_model *m = &grown[(*count)++];
    memset(m, 0, sizeof *m);
    snprintf(m->name, sizeof m->name, "%s", base);
    snprintf(m->dir, sizeof m->dir, "%s", dir);
    atomic_init(&m->demo, exists(dir, "DEMO_MODEL"));
    atomic_init(&m->state, MODEL_LOADING);
    return 0;
}

static int skip_hidden(const struct dirent *e) { return e->d_name[0] != '.'; }

/* Every model folder in `dir`, by name. */
static int scan(served_model **models, int *count, const char *dir, char *err, size_t n) {
    struct dirent **entries;
    int found = scandir(dir, &entries, skip_hidden, alphasort), added = 0, rc = 0;
    if (found < 0) return snprintf(err, n, "models-dir %s cannot be read: %s", dir, strerror(errno)), -1;
    for (int i = 0; i < found; i++) {
        char path[1024];
        struct stat st;
        int len = snprintf(path, sizeof path, "%s/%s", dir, entries[i]->d_name);
        if (rc == 0 && len < (int)sizeof path && stat(path, &st) == 0 && S_ISDIR(st.st_mode) &&
            is_model_folder(path)) {
            rc = add(models, count, path, NULL, err, n);
            added += rc == 0;
        }
        free(entries[i]);
    }
    free(entries);
    if (rc == 0 && !added)
        return snprintf(err, n, "models-dir %s holds no model folder (one with model_index.json, or with "
                        "config.json and model.safetensors)", dir), -1;
    return rc;
}

int models_resolve(const server_config *cfg, served_model **out, int *count, char *err, size_t n) {
    served_model *models = NULL;
    int c = 0, rc = 0;
    for (int i = 0; rc == 0 && i < cfg->models.count; i++)
        rc = add(&models, &c, cfg->models.items[i], i == 0 ? cfg->model_id : NULL, err, n);
    if (rc == 0 && cfg->models_dir) {
        int before = c;
        rc = scan(&models, &c, cfg->models_dir, err, n);
        if (rc == 0 && before == 0 && cfg->model_id) { /* --model-id names the default, here the first found */
            rc = -1;
            if (models_find(models, c, cfg->model_id) > 0)
                snprintf(err, n, "--model-id %s is the name of another model of %s", cfg->model_id, cfg->models_dir);
            else if (strlen(cfg->model_id) >= sizeof models->name)
                snprintf(err, n, "--model-id must have 1 to %zu characters", sizeof models->name - 1);
            else rc = 0, snprintf(models[0].name, sizeof models->name, "%s", cfg->model_id);
        }
    }
    if (rc == 0 && !c) {
        snprintf(err, n, "no model folder (--model or --models-dir)");
        rc = -1;
    }
    if (rc) {
        free(models);
        return -1;
    }
    for (int i = 0; i < c; i++) pthread_mutex_init(&models[i].lock, NULL); /* where they stay */
    *out = models, *count = c;
    return 0;
}

void models_free(served_model *models, int count) {
    for (int i = 0; models && i < count; i++) {
        models_release(models[i].current);
        pthread_mutex_destroy(&models[i].lock);
    }
    free(models);
}

model_version *models_acquire(served_model *m) {
    pthread_mutex_lock(&m->lock);
    model_version *v = m->current;
    if (v) atomic_fetch_add(&v->refs, 1);
    pthread_mutex_unlock(&m->lock);
    return v;
}

void models_release(model_version *v) {
    if (!v || atomic_fetch_sub(&v->refs, 1) != 1) return;
    cost_destroy(v->cost);
    sdx4_engine_close(v->engine);
    free(v);
}

void models_install(served_model *m, model_version *v) {
    pthread_mutex_lock(&m->lock);
    model_version *old = m->current;
    m->current = v; /* the caller's reference passes to m */
    m->gan = strcmp(v->info.kind, "gan") == 0;
    atomic_store(&m->demo, v->demo);
    pthread_mutex_unlock(&m->lock);
    models_release(old); /* freed here, or by the last batch still running on it */
}

long long models_parameters(const sdx4_model_info *mi) {
    return (long long)(mi->text_encoder_params + mi->unet_params + mi->vae_params + mi->gan_params);
}

int models_digest(const sdx4_model_info *mi, char hex[65], char *err, size_t n) {
    struct sha256_ctx ctx;
    sha256_init(&ctx);
    enum { CHUNK = 1 << 20 };
    uint8_t *buf = malloc(CHUNK);
    if (!buf) return snprintf(err, n, "out of memory"), -1;
    int rc = 0;
    for (int i = 0; rc == 0 && i < 4 && mi->weight_files[i]; i++) {
        const char *path = mi->weight_files[i], *base = strrchr(path, '/');
        FILE *f = fopen(path, "rb");
        struct stat st;
        if (!f || fstat(fileno(f), &st) != 0) {
            snprintf(err, n, "cannot read %s to take its digest: %s", path, strerror(errno));
            rc = -1;
            if (f) fclose(f);
            break;
        }
        char header[512];
        int len = snprintf(header, sizeof header, "%s%c%lld%c", base ? base + 1 : path, 0, (long long)st.st_size, 0);
        sha256_update(&ctx, (size_t)len, (const uint8_t *)header);
        long long total = 0;
        for (size_t got; (got = fread(buf, 1, CHUNK, f)) > 0; total += (long long)got) sha256_update(&ctx, got, buf);
        if (ferror(f) || total != (long long)st.st_size)
            snprintf(err, n, "%s changed or could not be read while its digest was taken", path), rc = -1;
        fclose(f);
    }
    free(buf);
    uint8_t digest[SHA256_DIGEST_SIZE];
    sha256_digest(&ctx, sizeof digest, digest);
    for (int i = 0; i < SHA256_DIGEST_SIZE; i++) snprintf(hex + 2 * i, 3, "%02x", digest[i]);
    return rc;
}

model_version *models_open(const served_model *m, const char *dir, const server_config *cfg, char *err, size_t n) {
    double t0 = mono_now();
    sdx4_engine_options o;
    config_engine_options(cfg, dir, &o);
    struct stat st;
    if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode))
        return snprintf(err, n, "cannot open the model %s: no such folder", dir), NULL;
    model_version *v = calloc(1, sizeof *v);
    if (!v) return snprintf(err, n, "out of memory"), NULL;
    atomic_init(&v->refs, 1);
    snprintf(v->dir, sizeof v->dir, "%s", dir);
    v->demo = exists(dir, "DEMO_MODEL");
    if (sdx4_engine_open(&o, &v->engine) != SDX4_OK) {
        /* the engine's messages begin with the folder where it is at fault */
        const char *why = sdx4_last_error();
        if (strncmp(why, dir, strlen(dir)) == 0) snprintf(err, n, "cannot open the model %s", why);
        else snprintf(err, n, "cannot open the model %s: %s", dir, why);
        free(v);
        return NULL;
    }
    sdx4_engine_info(v->engine, &v->info);
    double t1 = mono_now();
    if (models_digest(&v->info, v->hash, err, n)) {
        models_release(v);
        return NULL;
    }
    v->cost = cost_create(v->engine, cfg->min_side, cfg->max_side); /* NULL: no estimates */
    const sdx4_model_info *mi = &v->info;
    json_t *fields = json_pack("{s:s,s:s,s:s,s:s,s:s,s:i,s:s,s:I,s:s,s:f,s:f}", "model", m->name, "dir", dir,
                               "kind", mi->kind, "architecture", mi->architecture, "device", mi->device, "scale",
                               mi->vae_scale_factor, "dtype", mi->compute_dtype, "parameters",
                               (json_int_t)models_parameters(mi), "hash", v->hash, "seconds", mono_now() - t0,
                               "hash_seconds", mono_now() - t1);
    if (v->demo) json_object_set_new(fields, "note", json_string(DEMO_NOTE));
    log_event(v->demo ? LOG_WARN : LOG_INFO, "model_loaded", fields);
    return v;
}

int models_load(served_model *m, const server_config *cfg, char *err, size_t n) {
    model_version *v = models_open(m, m->dir, cfg, err, n);
    if (!v) return -1;
    models_install(m, v);
    return 0;
}

bool models_is_gan(const served_model *m) { return m->gan; }

int models_find(const served_model *models, int count, const char *name) {
    for (int i = 0; name && i < count; i++)
        if (strcmp(models[i].name, name) == 0) return i;
    return -1;
}

char *models_names(const served_model *models, int count) {
    size_t size = 1;
    for (int i = 0; i < count; i++) size += strlen(models[i].name) + 4;
    char *text = calloc(1, size);
    for (int i = 0; text && i < count; i++) {
        if (i) strcat(text, i == count - 1 ? " or " : ", ");
        strcat(text, models[i].name);
    }
    return text;
}

json_t *models_applicable_parameters(const sdx4_model_info *info) {
    json_t *names = json_array();
    int count;
    const sdx4_param *p = sdx4_params(&count);
    bool gan = info->kind && strcmp(info->kind, "gan") == 0;
    for (int i = 0; i < count; i++)
        if (!gan || strcmp(p[i].name, "tile") == 0) json_array_append_new(names, json_string(p[i].name));
    return names;
}

json_t *models_entry(const served_model *m, const model_version *v, bool is_default) {
    const sdx4_model_info *mi = &v->info;
    return json_pack("{s:s,s:s,s:b,s:b,s:s,s:s,s:i,s:I,s:{s:s,s:s},s:o}", "name", m->name, "model_hash", v->hash,
                     "default", is_default, "ready", atomic_load(&m->state) == MODEL_READY, "kind", mi->kind,
                     "architecture", mi->architecture, "scale", mi->vae_scale_factor, "parameters",
                     (json_int_t)models_parameters(mi), "dtype", "compute", mi->compute_dtype, "weights",
                     mi->weights_dtype, "applicable_parameters", models_applicable_parameters(mi));
}
