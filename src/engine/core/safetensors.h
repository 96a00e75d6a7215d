/*
 * safetensors.h - reading and writing the safetensors format.
 *
 * A file is an 8-byte little-endian header length, a JSON header mapping
 * tensor names to {dtype, shape, data_offsets}, then the raw data. Every
 * header field is validated against the file's size before use, so a
 * truncated or lying file is an error naming the file and tensor, never a
 * read out of bounds.
 *
 * Nothing is mmapped: a mapping reads the file at every touch, so a file
 * truncated under the process raises SIGBUS and one rewritten in place
 * changes the tensors silently. Instead there are two ways in:
 *   sdx4_st_open()         reads the whole file into memory it owns (golden
 *                     data, small files), tensors point into that copy;
 *   sdx4_st_open_header()  reads and validates the header only and keeps the
 *                     file open; sdx4_st_read() then copies one tensor into the
 *                     caller's memory (model weights: each read straight
 *                     into the memory that will hold it, or converted and
 *                     dropped; the page cache is told to drop what was
 *                     read, so the weights are not held twice). A file
 *                     that shrinks or changes (size or mtime) while it is
 *                     read is an error, not garbage.
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
    uint64_t offset;  /* of the data, from the start of the file */
    const void *data; /* the data in memory; NULL after sdx4_st_open_header() */
    size_t nbytes;
} st_tensor;

typedef struct {
    char *path;
    void *buf;           /* sdx4_st_open(): the whole file */
    int fd, has_fd;      /* sdx4_st_open_header(): the open file */
    int64_t size;        /* sdx4_st_open_header(): size and mtime when opened */
    int64_t mtime_ns;
    st_tensor *tensors;
    int count;
    char *metadata_json; /* the "__metadata__" object as JSON text, or NULL */
} st_file;

/* Reads a whole file into memory and validates it. On error sets the
 * message (with the path). */
int sdx4_st_open(st_file *f, const char *path);
/* Reads and validates the header only, naming the file `label` in errors
 * ("unet/diffusion_..."); the file stays open until sdx4_st_close(). */
int sdx4_st_open_header(st_file *f, const char *path, const char *label);
/* Reads the data of t (a tensor of f, opened by sdx4_st_open_header()) into
 * dst, t->nbytes bytes. -1, naming file and tensor, when the file is now
 * shorter or has changed since it was opened. */
int sdx4_st_read(const st_file *f, const st_tensor *t, void *dst);
/* Validates a buffer already in memory (the fuzz target's entry); `buf`
 * must outlive `f`. `label` names it in errors. */
int sdx4_st_parse(st_file *f, const void *buf, size_t size, const char *label);
void sdx4_st_close(st_file *f);
const st_tensor *sdx4_st_find(const st_file *f, const char *name);
/* A metadata value as a string (the writer of the goldens stores JSON
 * text in it), or NULL. Returns malloc'd memory. */
char *sdx4_st_metadata(const st_file *f, const char *key);

/* Writing: describe every tensor first, then stream their data in the
 * same order (fill() is called once per tensor with a buffer of nbytes). */
typedef struct {
    const char *name;
    dtype type;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
} st_entry;

typedef int (*st_fill_fn)(void *user, int index, void *buf, size_t nbytes);

int sdx4_st_write(const char *path, const st_entry *entries, int count,
             const char *metadata_json, st_fill_fn fill, void *user);

#endif
