/*
 * tokenizer.h - CLIP's byte-level BPE tokenizer, as transformers 5 runs it.
 *
 * sdx4_tokenizer_encode() gives the ids of
 *     CLIPTokenizer.from_pretrained(model_dir + "/tokenizer")(
 *         text, padding="max_length", max_length=max_len, truncation=True
 *     ).input_ids
 * which in transformers 5 is the `tokenizers` pipeline:
 *   1. special tokens (bos, eos, unk, pad and tokenizer_config.json's
 *      added_tokens_decoder) are cut out of the raw text, longest match
 *      first; a token marked "normalized": true is looked for after step 2
 *      instead;
 *   2. each remaining span is normalized: NFC, runs of whitespace -> " ",
 *      lowercase;
 *   3. split by CLIP's pattern <|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|
 *      'm|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+ (whitespace dropped),
 *      then by GPT-2's byte-level pattern;
 *   4. each piece is BPE-merged over its UTF-8 bytes, the last byte carrying
 *      the "</w>" end-of-word suffix;
 *   5. <bos> tokens <eos>, cut to max_len keeping <eos> last, padded with
 *      the pad token.
 *
 * Text is UTF-8. Invalid bytes do not fail: each maximal invalid subsequence
 * becomes U+FFFD, as Python's bytes.decode("utf-8", errors="replace").
 *
 * Thread safety: a loaded tokenizer is immutable; sdx4_tokenizer_encode() may run
 * on one tokenizer from several threads at once. sdx4_tokenizer_free() must not
 * race with it.
 */
#ifndef SDX4_TOKENIZER_H
#define SDX4_TOKENIZER_H

#include <stdint.h>

typedef struct tokenizer tokenizer;

/* Loads <model_dir>/tokenizer/{vocab.json, merges.txt, tokenizer_config.json}
 * and, when tokenizer_config.json has no added_tokens_decoder,
 * special_tokens_map.json if present (its entries override the config's, as
 * transformers does). Every special token must be in vocab.json. Returns
 * NULL with sdx4_set_error() on failure; the message names the file. */
tokenizer *sdx4_tokenizer_load(const char *model_dir);

/* Accepts NULL. */
void sdx4_tokenizer_free(tokenizer *t);

/* tokenizer_config.json's model_max_length (77 for CLIP). */
int sdx4_tokenizer_max_length(const tokenizer *t);

/* Encodes `text` (NUL-terminated UTF-8) to exactly `max_len` ids in `ids`:
 * bos, tokens, eos, truncated to max_len (eos kept last) and padded with the
 * pad id. max_len must be at least 2. *n_before_truncation (may be NULL)
 * receives the length bos + tokens + eos would have without truncation.
 * Returns 0, or -1 with sdx4_set_error(). */
int sdx4_tokenizer_encode(const tokenizer *t, const char *text, int32_t *ids, int max_len,
                     int *n_before_truncation);

/* Writes a minimal byte-level tokenizer into `dir` (created if missing):
 * vocab.json with the 256 byte tokens, their "</w>" forms and the specials
 * <|startoftext|> and <|endoftext|>; merges.txt with only its version line;
 * tokenizer_config.json (model_max_length 77, pad <|endoftext|>) and
 * special_tokens_map.json. Every text then encodes byte by byte. For
 * `sdx4 make-model` when no real vocabulary is given. *vocab_size receives
 * the number of ids written (514). Returns 0, or -1 with sdx4_set_error(). */
int sdx4_tokenizer_write_byte_level(const char *dir, int *vocab_size);

#endif
