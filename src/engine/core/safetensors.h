/*
 * safetensors.h - reading and writing the safetensors format.
 *
 * A file is an 8-byte little-endian header length, a JSON header mapping
 * tensor names to {dtype, shape, data_offsets}, then the raw data. Files
 * are mmapped and tensors point into the mapping: nothing is copied. Every
 * header field is validated against the file's size before use, so a
 * truncated or lying file is an error naming the file and tensor, never a
 * read out of bounds.
 */
#ifndef SDX4_SAFETENSORS_H
#define SDX4_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "core/dtype.h"

#define ST_MAX_DIMS 8

typedef struct {
    char *name;
    dtype type;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    const void *data; /* inside the mapping */
    size_t nbytes;
} st_tensor;

typedef struct {
    char *path;
    void *map;
    size_t map_size;
    st_tensor *tensors;
    int count;
    char *metadata_json; /* the "__metadata__" object as JSON text, or NULL */
} st_file;

/* Maps and validates a file. On error sets the message (with the path). */
int st_open(st_file *f, const char *path);
/* The same, naming the file `label` in errors ("unet/diffusion_..."). */
int st_open_as(st_file *f, const char *path, const char *label);
/* Validates a buffer already in memory (the fuzz target's entry); `buf`
 * must outlive `f`. `label` names it in errors. */
int st_parse(st_file *f, const void *buf, size_t size, const char *label);
void st_close(st_file *f);
const st_tensor *st_find(const st_file *f, const char *name);
/* A metadata value as a string (the writer of the goldens stores JSON
 * text in it), or NULL. Returns malloc'd memory. */
char *st_metadata(const st_file *f, const char *key);

/* Writing: describe every tensor first, then stream their data in the
 * same order (fill() is called once per tensor with a buffer of nbytes). */
typedef struct {
    const char *name;
    dtype type;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
} st_entry;

typedef int (*st_fill_fn)(void *user, int index, void *buf, size_t nbytes);

int st_write(const char *path, const st_entry *entries, int count,
             const char *metadata_json, st_fill_fn fill, void *user);

#endif
