/*
 * convert.h - GAN upscalers from other tools' files into sdx4's model
 * folder (model/esrgan.h): config.json and model.safetensors under
 * PyTorch's names.
 *
 * Each importer turns its format into a state dict, the tensors under the
 * names and shapes PyTorch gives them, and a config; convert.c checks the
 * two against what the loader will ask for and writes the folder.
 *   convert.c       PyTorch state dicts saved as safetensors (Real-ESRGAN's
 *                   and BasicSR's names, "params_ema." prefixes, old ESRGAN)
 *   ncnn_import.c   ncnn's .param/.bin pairs (realesrgan-ncnn-vulkan's models)
 */
#ifndef SDX4_CONVERT_H
#define SDX4_CONVERT_H

#include <stddef.h>
#include <stdint.h>

#include "core/dtype.h"
#include "model/esrgan.h"

typedef struct {
    char *name;      /* "conv_first.weight" */
    dtype type;      /* DTYPE_F32 or DTYPE_F16 */
    int ndim;
    int64_t shape[4];
    void *data;      /* malloc'd, nbytes */
    size_t nbytes;
} sd_tensor;

typedef struct {
    sd_tensor *t;
    int n, cap;
} state_dict;

/* Appends a copy of `data` (ndim 1..4, type F32 or F16) under `name`; -1
 * with the error set. */
int sdx4_state_dict_add(state_dict *sd, const char *name, dtype type, int ndim,
                        const int64_t *shape, const void *data);
const sd_tensor *sdx4_state_dict_find(const state_dict *sd, const char *name);
void sdx4_state_dict_free(state_dict *sd);

/* ncnn's model of an RRDBNet or SRVGGNetCompact (param: the text .param
 * file; bin: its weights) as a state dict and config. Anything else in the
 * graph (other layer types, a layout neither architecture has) is refused
 * with a message naming the file, line and layer. -1 with the error set. */
int sdx4_ncnn_import(const char *param_path, const char *bin_path, gan_config *cfg, state_dict *sd);
/* The same on files in memory (the fuzz target's entry); labels name them
 * in errors. */
int sdx4_ncnn_parse(const char *param, size_t param_len, const char *param_label, const void *bin,
                    size_t bin_len, const char *bin_label, gan_config *cfg, state_dict *sd);

/* mkdir -p (make_model.c): the folder and its missing parents; -1 with
 * the error set, also when a file is in the way. */
int sdx4_make_dirs(const char *path);

#endif
