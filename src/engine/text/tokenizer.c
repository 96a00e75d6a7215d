/*
 * tokenizer.c - CLIP's byte-level BPE tokenizer (the pipeline is in
 * tokenizer.h).
 *
 * Loading reads vocab.json only to resolve names: the id of each byte as a
 * word-inner token and as a word's last token ("x</w>"), the ids of the
 * special tokens, and for every line "left right" of merges.txt the ids of
 * left, right and left+right. What encoding needs is kept: two 256-entry
 * byte tables and one open-addressing hash table (left id, right id) ->
 * (rank, merged id) with the 48894 merges of CLIP. The JSON is then freed.
 *
 * Encoding works on UTF-8 bytes throughout. GPT-2's byte-to-character map
 * (which makes vocab.json's keys printable) matters only when reading the
 * vocabulary; in between, a word is its bytes and a token is an id. BPE
 * follows tokenizers' Word::merge_all: a min-heap of candidate merges
 * ordered by (rank, position) over a linked list of symbols, a candidate
 * being dropped when its pair has changed since it was pushed. That is
 * O(n log n) in a word's length, so a prompt of one long run of letters
 * costs no more than many short words.
 *
 * Unicode facts (NFC, lowercase, the categories L, N and whitespace) come
 * from utf8proc. Nothing is cached between calls: every buffer belongs to
 * one sdx4_tokenizer_encode() call, which is what makes a loaded tokenizer safe
 * to share between threads.
 */
#include "text/tokenizer.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <utf8proc.h>

#include "core/config.h"
#include "core/error.h"

#define VOCAB_FILE "tokenizer/vocab.json"
#define MERGES_FILE "tokenizer/merges.txt"
#define CONFIG_FILE "tokenizer/tokenizer_config.json"
#define SPECIAL_MAP_FILE "tokenizer/special_tokens_map.json"

typedef struct {
    char *content;  /* UTF-8; for a normalized token, its normalized form */
    size_t len;
    int32_t id;
    int normalized; /* matched in normalized text instead of raw text */
} special_token;

/* Merging the adjacent ids of `pair` (left << 32 | right) gives new_id;
 * the merge of lowest rank applies first. */
typedef struct {
    uint64_t pair; /* EMPTY_PAIR: free slot */
    int32_t rank, new_id;
} merge_entry;

#define EMPTY_PAIR UINT64_MAX

struct tokenizer {
    int max_length;                  /* model_max_length */
    int32_t bos_id, eos_id, pad_id;
    int32_t unk_id;                  /* for a byte with no token; -1: none */
    int32_t byte_id[256];            /* a byte inside a word; -1: absent */
    int32_t byte_end_id[256];        /* a word's last byte, "x</w>"; -1: absent */
    special_token *specials;         /* (n_specials) */
    int n_specials;
    merge_entry *merges;             /* (1 << merge_bits) slots */
    int merge_bits;
};

/* ------------------------------------------------------------------------
 * Small helpers: growable bytes, UTF-8, character classes
 * ------------------------------------------------------------------------ */

typedef struct {
    char *p;
    size_t len, cap;
} bytes;

static int bytes_reserve(bytes *b, size_t extra) {
    if (b->len + extra <= b->cap) return 0;
    size_t cap = b->cap ? b->cap : 64;
    while (cap < b->len + extra) cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) {
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "tokenizer: out of memory");
        return -1;
    }
    b->p = p;
    b->cap = cap;
    return 0;
}

/* Length of the valid UTF-8 character at s, or 0 with *bad set to the
 * length of its maximal invalid subpart (>= 1): the unit that Python's
 * errors="replace" turns into one U+FFFD. */
static size_t utf8_char_len(const unsigned char *s, size_t len, size_t *bad) {
    unsigned c = s[0], lo = 0x80, hi = 0xBF;
    size_t need;
    if (c < 0x80) return 1;
    if (c >= 0xC2 && c <= 0xDF) {
        need = 1;
    } else if (c >= 0xE0 && c <= 0xEF) {
        need = 2;
        if (c == 0xE0) lo = 0xA0; /* overlong */
        if (c == 0xED) hi = 0x9F; /* surrogates */
    } else if (c >= 0xF0 && c <= 0xF4) {
        need = 3;
        if (c == 0xF0) lo = 0x90; /* overlong */
        if (c == 0xF4) hi = 0x8F; /* above U+10FFFF */
    } else {
        *bad = 1;
        return 0;
    }
    for (size_t i = 1; i <= need; i++) {
        if (i >= len || s[i] < lo || s[i] > hi) {
            *bad = i;
            return 0;
        }
        lo = 0x80;
        hi = 0xBF;
    }
    return need + 1;
}

/* text as valid UTF-8, each invalid subpart replaced by U+FFFD. */
static int utf8_sanitize(const char *text, size_t len, bytes *out) {
    const unsigned char *s = (const unsigned char *)text;
    if (bytes_reserve(out, len + 1)) return -1;
    for (size_t i = 0; i < len;) {
        size_t bad = 0, n = utf8_char_len(s + i, len - i, &bad);
        if (n) {
            memcpy(out->p + out->len, s + i, n);
            out->len += n;
            i += n;
        } else {
            /* a replacement (3 bytes) may outgrow the 1-byte subpart */
            if (bytes_reserve(out, 3 + (len - i))) return -1;
            memcpy(out->p + out->len, "\xEF\xBF\xBD", 3);
            out->len += 3;
            i += bad;
        }
    }
    return 0;
}

/* Decodes one character of valid UTF-8; returns its length. */
static size_t next_char(const char *s, size_t len, int32_t *c) {
    utf8proc_ssize_t n = utf8proc_iterate((const utf8proc_uint8_t *)s, (utf8proc_ssize_t)len, c);
    return n > 0 ? (size_t)n : 1; /* unreachable for sanitized text */
}

/* Oniguruma's \s in Unicode mode, the regex engine of tokenizers. */
static int is_space(int32_t c) {
    if ((c >= 0x09 && c <= 0x0D) || c == 0x85) return 1;
    utf8proc_category_t k = utf8proc_category(c);
    return k == UTF8PROC_CATEGORY_ZS || k == UTF8PROC_CATEGORY_ZL || k == UTF8PROC_CATEGORY_ZP;
}

static int is_letter(int32_t c) {
    utf8proc_category_t k = utf8proc_category(c);
    return k == UTF8PROC_CATEGORY_LU || k == UTF8PROC_CATEGORY_LL || k == UTF8PROC_CATEGORY_LT ||
           k == UTF8PROC_CATEGORY_LM || k == UTF8PROC_CATEGORY_LO;
}

static int is_number(int32_t c) {
    utf8proc_category_t k = utf8proc_category(c);
    return k == UTF8PROC_CATEGORY_ND || k == UTF8PROC_CATEGORY_NL || k == UTF8PROC_CATEGORY_NO;
}

/* tokenizers' normalizer Sequence([NFC(), Replace(\s+, " "), Lowercase()])
 * of the valid UTF-8 s[0..len), written to out (replacing its content). */
static int normalize(const char *s, size_t len, bytes *out) {
    out->len = 0;
    if (len == 0) return 0;
    utf8proc_uint8_t *nfc = NULL;
    utf8proc_ssize_t n = utf8proc_map((const utf8proc_uint8_t *)s, (utf8proc_ssize_t)len, &nfc,
                                      UTF8PROC_STABLE | UTF8PROC_COMPOSE);
    if (n < 0) {
        sdx4_set_error(n == UTF8PROC_ERROR_NOMEM ? SDX4_ERR_NO_MEMORY : SDX4_ERR_INVALID_ARGUMENT,
                  "tokenizer: NFC normalization failed: %s", utf8proc_errmsg(n));
        return -1;
    }
    int in_space = 0;
    for (utf8proc_ssize_t i = 0; i < n;) {
        int32_t c;
        i += (utf8proc_ssize_t)next_char((const char *)nfc + i, (size_t)(n - i), &c);
        if (bytes_reserve(out, 8)) {
            free(nfc);
            return -1;
        }
        utf8proc_uint8_t *dst = (utf8proc_uint8_t *)out->p + out->len;
        if (is_space(c)) {
            if (!in_space) out->p[out->len++] = ' ';
            in_space = 1;
            continue;
        }
        in_space = 0;
        if (c == 0x130) {
            /* Rust's char::to_lowercase, which tokenizers uses, maps İ to
             * "i̇" (SpecialCasing.txt); utf8proc's simple mapping gives "i" */
            out->len += (size_t)utf8proc_encode_char('i', dst);
            out->len += (size_t)utf8proc_encode_char(0x307, dst + 1);
        } else {
            out->len += (size_t)utf8proc_encode_char(utf8proc_tolower(c), dst);
        }
    }
    free(nfc);
    return 0;
}

/* ------------------------------------------------------------------------
 * The merge table
 * ------------------------------------------------------------------------ */

static uint64_t pair_key(int32_t left, int32_t right) {
    return (uint64_t)(uint32_t)left << 32 | (uint32_t)right;
}

static size_t merge_slot(const tokenizer *t, uint64_t pair) {
    size_t mask = ((size_t)1 << t->merge_bits) - 1;
    size_t i = (size_t)((pair * 0x9E3779B97F4A7C15ull) >> (64 - t->merge_bits));
    while (t->merges[i].pair != EMPTY_PAIR && t->merges[i].pair != pair) i = (i + 1) & mask;
    return i;
}

static const merge_entry *merge_find(const tokenizer *t, int32_t left, int32_t right) {
    const merge_entry *m = &t->merges[merge_slot(t, pair_key(left, right))];
    return m->pair == EMPTY_PAIR ? NULL : m;
}

/* A pair listed twice keeps its last line, as tokenizers' HashMap does. */
static void merge_insert(tokenizer *t, int32_t left, int32_t right, int32_t rank, int32_t new_id) {
    uint64_t pair = pair_key(left, right);
    merge_entry *m = &t->merges[merge_slot(t, pair)];
    m->pair = pair;
    m->rank = rank;
    m->new_id = new_id;
}

/* ------------------------------------------------------------------------
 * Encoding
 * ------------------------------------------------------------------------ */

typedef struct {
    int32_t id;
    int32_t prev, next; /* neighbours in the word; -1 at the ends */
    int removed;        /* merged into its left neighbour */
} symbol;

typedef struct {
    int32_t rank, pos, new_id;
} candidate;

typedef struct {
    const tokenizer *t;
    int32_t *out;  /* tokens kept, at most cap */
    size_t cap;
    size_t n;      /* tokens produced, kept or not */
    bytes norm;    /* the span being normalized */
    symbol *syms;  /* BPE scratch for one word, (scratch) */
    candidate *heap; /* (3 * scratch): n-1 pairs, then at most 2 per merge */
    size_t scratch;
} encoder;

static void emit(encoder *e, int32_t id) {
    if (e->n < e->cap) e->out[e->n] = id;
    e->n++;
}

static int heap_less(const candidate *a, const candidate *b) {
    return a->rank != b->rank ? a->rank < b->rank : a->pos < b->pos;
}

static void heap_push(candidate *h, size_t *n, candidate c) {
    size_t i = (*n)++;
    while (i > 0 && heap_less(&c, &h[(i - 1) / 2])) {
        h[i] = h[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    h[i] = c;
}

static candidate heap_pop(candidate *h, size_t *n) {
    candidate top = h[0], last = h[--*n];
    size_t i = 0;
    for (;;) {
        size_t child = 2 * i + 1;
        if (child >= *n) break;
        if (child + 1 < *n && heap_less(&h[child + 1], &h[child])) child++;
        if (!heap_less(&h[child], &last)) break;
        h[i] = h[child];
        i = child;
    }
    h[i] = last;
    return top;
}

static void push_pair(const tokenizer *t, candidate *heap, size_t *n, const symbol *syms,
                      int32_t pos) {
    const merge_entry *m = merge_find(t, syms[pos].id, syms[syms[pos].next].id);
    if (m) heap_push(heap, n, (candidate){m->rank, pos, m->new_id});
}

/* BPE of one word (its UTF-8 bytes); emits its tokens. */
static int bpe_word(encoder *e, const unsigned char *w, size_t n) {
    const tokenizer *t = e->t;
    if (n > e->scratch) {
        if (n > INT32_MAX / 4) {
            sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "tokenizer: a word of %zu bytes is too long", n);
            return -1;
        }
        free(e->syms);
        free(e->heap);
        e->syms = malloc(n * sizeof *e->syms);
        e->heap = malloc(3 * n * sizeof *e->heap);
        e->scratch = e->syms && e->heap ? n : 0;
        if (!e->scratch) {
            sdx4_set_error(SDX4_ERR_NO_MEMORY, "tokenizer: out of memory");
            return -1;
        }
    }
    symbol *syms = e->syms;
    for (size_t i = 0; i < n; i++) {
        int32_t id = (i + 1 == n ? t->byte_end_id : t->byte_id)[w[i]];
        if (id < 0) id = t->unk_id;
        if (id < 0) {
            sdx4_set_error(SDX4_ERR_MODEL, "%s: no token for byte 0x%02x and no unk_token", VOCAB_FILE,
                      w[i]);
            return -1;
        }
        syms[i] = (symbol){id, (int32_t)i - 1, i + 1 < n ? (int32_t)i + 1 : -1, 0};
    }
    size_t nheap = 0;
    for (size_t i = 0; i + 1 < n; i++) push_pair(t, e->heap, &nheap, syms, (int32_t)i);
    while (nheap > 0) {
        candidate c = heap_pop(e->heap, &nheap);
        symbol *s = &syms[c.pos];
        if (s->removed || s->next < 0) continue;
        symbol *right = &syms[s->next];
        const merge_entry *m = merge_find(t, s->id, right->id);
        if (!m || m->new_id != c.new_id) continue; /* a stale candidate */
        s->id = c.new_id;
        right->removed = 1;
        s->next = right->next;
        if (s->next >= 0) syms[s->next].prev = c.pos;
        if (s->prev >= 0) push_pair(t, e->heap, &nheap, syms, s->prev);
        if (s->next >= 0) push_pair(t, e->heap, &nheap, syms, c.pos);
    }
    for (int32_t i = 0; i >= 0; i = syms[i].next) emit(e, syms[i].id);
    return 0;
}

static size_t prefix_len(const char *s, size_t len, const char *prefix) {
    size_t n = strlen(prefix);
    return n <= len && memcmp(s, prefix, n) == 0 ? n : 0;
}

/* The match of CLIP's pattern
 *   <|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|
 *   [^\s\p{L}\p{N}]+
 * at the start of s (alternatives tried in order, as the regex does).
 * Returns the bytes consumed: a piece (*piece = 1), or one whitespace
 * character that the pattern skips (*piece = 0). *literal tells a match of
 * the first two alternatives. */
static size_t clip_match(const char *s, size_t len, int literals, int *piece, int *literal) {
    static const char *const contractions[] = {"'s", "'t", "'re", "'ve", "'m", "'ll", "'d"};
    size_t n;
    *piece = 1;
    *literal = 0;
    if (literals && ((n = prefix_len(s, len, "<|startoftext|>")) ||
                     (n = prefix_len(s, len, "<|endoftext|>")))) {
        *literal = 1;
        return n;
    }
    for (size_t k = 0; k < sizeof contractions / sizeof *contractions; k++)
        if ((n = prefix_len(s, len, contractions[k]))) return n;
    int32_t c;
    n = next_char(s, len, &c);
    if (is_number(c)) return n;
    if (is_space(c)) {
        *piece = 0;
        return n;
    }
    int letters = is_letter(c);
    while (n < len) {
        size_t k = next_char(s + n, len - n, &c);
        if (letters ? !is_letter(c) : (is_space(c) || is_letter(c) || is_number(c))) break;
        n += k;
    }
    return n;
}

/* Pre-tokenizes normalized text and encodes each piece. tokenizers runs
 * GPT-2's byte-level pattern ('s|'t|...| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+
 * |\s+) over each of CLIP's pieces afterwards: it leaves every piece whole
 * (none holds whitespace or more than one digit) except the two literals,
 * which it cuts into "<|", the word, "|>". That is this scanner with the
 * literals off, hence the recursion. */
static int encode_pieces(encoder *e, const char *s, size_t len, int literals) {
    for (size_t i = 0; i < len;) {
        int piece, literal;
        size_t n = clip_match(s + i, len - i, literals, &piece, &literal);
        int rc = 0;
        if (literal)
            rc = encode_pieces(e, s + i, n, 0);
        else if (piece)
            rc = bpe_word(e, (const unsigned char *)s + i, n);
        if (rc) return -1;
        i += n;
    }
    return 0;
}

/* The special token of the given kind that starts at s, the longest if
 * several do (tokenizers' leftmost-longest Aho-Corasick); -1 if none. */
static int match_special(const tokenizer *t, const char *s, size_t len, int normalized,
                         size_t *match_len) {
    int best = -1;
    for (int k = 0; k < t->n_specials; k++) {
        const special_token *sp = &t->specials[k];
        if (sp->normalized != normalized || sp->len > len || sp->content[0] != s[0]) continue;
        if ((best < 0 || sp->len > t->specials[best].len) && memcmp(s, sp->content, sp->len) == 0)
            best = k;
    }
    if (best >= 0) *match_len = t->specials[best].len;
    return best;
}

/* Cuts the special tokens of one kind out of s; the spans between go to
 * encode_normalized() (raw text) or encode_pieces() (normalized text). */
static int encode_normalized(encoder *e, const char *s, size_t len);

static int split_specials(encoder *e, const char *s, size_t len, int normalized) {
    size_t start = 0, i = 0;
    while (i < len) {
        size_t n;
        int k = match_special(e->t, s + i, len - i, normalized, &n);
        if (k < 0) {
            i++;
            continue;
        }
        if (i > start &&
            (normalized ? encode_pieces(e, s + start, i - start, 1)
                        : encode_normalized(e, s + start, i - start)))
            return -1;
        emit(e, e->t->specials[k].id);
        i += n;
        start = i;
    }
    if (len > start)
        return normalized ? encode_pieces(e, s + start, len - start, 1)
                          : encode_normalized(e, s + start, len - start);
    return 0;
}

static int encode_normalized(encoder *e, const char *s, size_t len) {
    if (normalize(s, len, &e->norm)) return -1;
    return split_specials(e, e->norm.p, e->norm.len, 1);
}

int sdx4_tokenizer_encode(const tokenizer *t, const char *text, int32_t *ids, int max_len,
                     int *n_before_truncation) {
    if (!t || !text || !ids || max_len < 2) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "sdx4_tokenizer_encode: %s",
                  max_len < 2 ? "max_len must be at least 2" : "NULL argument");
        return -1;
    }
    bytes clean = {0};
    encoder e = {.t = t, .out = ids + 1, .cap = (size_t)max_len - 2};
    int rc = utf8_sanitize(text, strlen(text), &clean);
    if (rc == 0) rc = split_specials(&e, clean.p, clean.len, 0);
    free(clean.p);
    free(e.norm.p);
    free(e.syms);
    free(e.heap);
    if (rc) return -1;

    /* RobertaProcessing adds bos/eos; truncation cuts the text's tokens */
    size_t kept = e.n < e.cap ? e.n : e.cap;
    ids[0] = t->bos_id;
    ids[1 + kept] = t->eos_id;
    for (int i = 2 + (int)kept; i < max_len; i++) ids[i] = t->pad_id;
    if (n_before_truncation) *n_before_truncation = e.n > INT_MAX - 2 ? INT_MAX : (int)e.n + 2;
    return 0;
}

int sdx4_tokenizer_max_length(const tokenizer *t) { return t->max_length; }

/* ------------------------------------------------------------------------
 * Loading
 * ------------------------------------------------------------------------ */

/* GPT-2's reversible byte -> character map (bytes_to_unicode): printable
 * Latin-1 bytes stand for themselves, the other 68 take U+0100... in byte
 * order. Sorting bytes by their character gives CLIP's vocabulary order. */
static void byte_chars(int32_t map[256]) {
    int32_t next = 256;
    for (int b = 0; b < 256; b++) {
        int printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
        map[b] = printable ? b : next++;
    }
}

static int32_t vocab_id(const json_t *vocab, const char *key, size_t len) {
    json_t *v = json_object_getn(vocab, key, len);
    return v ? (int32_t)json_integer_value(v) : -1;
}

static int check_vocab(const json_t *vocab) {
    const char *key;
    json_t *v;
    json_object_foreach((json_t *)vocab, key, v) {
        if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) >= INT32_MAX) {
            sdx4_set_error(SDX4_ERR_MODEL, "%s: the id of \"%.40s\" is not an integer in [0, 2^31)",
                      VOCAB_FILE, key);
            return -1;
        }
    }
    return 0;
}

static void byte_tables(tokenizer *t, const json_t *vocab) {
    int32_t map[256];
    byte_chars(map);
    for (int b = 0; b < 256; b++) {
        char key[16];
        size_t n = (size_t)utf8proc_encode_char(map[b], (utf8proc_uint8_t *)key);
        t->byte_id[b] = vocab_id(vocab, key, n);
        memcpy(key + n, "</w>", 4);
        t->byte_end_id[b] = vocab_id(vocab, key, n + 4);
    }
}

static char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    bytes b = {0};
    size_t got;
    int no_memory = 0; /* a partial text must not pass for the whole file */
    do {
        if ((no_memory = bytes_reserve(&b, 1 << 16))) break;
        got = fread(b.p + b.len, 1, b.cap - b.len, f);
        b.len += got;
    } while (got > 0);
    int failed = no_memory || ferror(f), why = no_memory ? ENOMEM : errno; /* the caller names it */
    fclose(f);
    if (failed) {
        free(b.p);
        errno = why;
        return NULL;
    }
    *len = b.len;
    return b.p;
}

/* merges.txt as tokenizers reads it: lines "left right", a "#version"
 * line skipped, the rank being the line's order among the others. */
static int load_merges(tokenizer *t, const char *model_dir, const json_t *vocab) {
    char path[4096];
    size_t len;
    snprintf(path, sizeof path, "%s/%s", model_dir, MERGES_FILE);
    char *text = read_file(path, &len);
    if (!text) {
        sdx4_set_error(SDX4_ERR_MODEL, "%s: %s (looked in %s)", MERGES_FILE,
                  errno == ENOENT ? "missing" : strerror(errno), model_dir);
        return -1;
    }
    size_t lines = 1;
    for (size_t i = 0; i < len; i++) lines += text[i] == '\n';
    t->merge_bits = 4;
    while (((size_t)1 << t->merge_bits) < 2 * lines) t->merge_bits++;
    t->merges = malloc(((size_t)1 << t->merge_bits) * sizeof *t->merges);
    if (!t->merges) {
        free(text);
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "%s: out of memory", MERGES_FILE);
        return -1;
    }
    for (size_t i = 0; i < (size_t)1 << t->merge_bits; i++) t->merges[i].pair = EMPTY_PAIR;

    int32_t rank = 0;
    size_t line_no = 0;
    for (char *p = text, *end = text + len; p < end;) {
        char *eol = memchr(p, '\n', (size_t)(end - p));
        char *next = eol ? eol + 1 : end;
        if (!eol) eol = end;
        if (eol > p && eol[-1] == '\r') eol--;
        line_no++;
        if (prefix_len(p, (size_t)(eol - p), "#version")) {
            p = next;
            continue;
        }
        char *space = memchr(p, ' ', (size_t)(eol - p));
        if (!space || memchr(space + 1, ' ', (size_t)(eol - space - 1))) {
            sdx4_set_error(SDX4_ERR_MODEL, "%s: line %zu is not \"left right\"", MERGES_FILE, line_no);
            free(text);
            return -1;
        }
        size_t left_len = (size_t)(space - p), right_len = (size_t)(eol - space - 1);
        int32_t left = vocab_id(vocab, p, left_len);
        int32_t right = vocab_id(vocab, space + 1, right_len);
        memmove(space, space + 1, right_len); /* the line now starts with left+right */
        int32_t merged = vocab_id(vocab, p, left_len + right_len);
        if (left < 0 || right < 0 || merged < 0) {
            const char *missing = right < 0 && left >= 0 ? space : p;
            size_t n = left < 0 ? left_len : right < 0 ? right_len : left_len + right_len;
            sdx4_set_error(SDX4_ERR_MODEL, "%s: line %zu: \"%.*s\" is not in vocab.json", MERGES_FILE,
                      line_no, (int)n, missing);
            free(text);
            return -1;
        }
        merge_insert(t, left, right, rank++, merged);
        p = next;
    }
    free(text);
    return 0;
}

/* Registers `match` (len bytes) as a special token unless it already is
 * one; a token normalized to nothing can never match and is left out. */
static int append_special(tokenizer *t, const char *match, size_t len, int32_t id,
                          int normalized) {
    for (int k = 0; k < t->n_specials; k++)
        if (t->specials[k].len == len && memcmp(t->specials[k].content, match, len) == 0) return 0;
    if (len == 0) return 0;
    special_token *grown = realloc(t->specials, (size_t)(t->n_specials + 1) * sizeof *grown);
    char *copy = malloc(len + 1);
    if (grown) t->specials = grown;
    if (!grown || !copy) {
        free(copy);
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "tokenizer: out of memory");
        return -1;
    }
    memcpy(copy, match, len);
    copy[len] = 0;
    t->specials[t->n_specials++] = (special_token){copy, len, id, normalized};
    return 0;
}

/* Adds one special token: a string, or an AddedToken object
 * {"content": ..., "normalized": ..., "lstrip": false, ...}. *id receives
 * its id. */
static int add_special(tokenizer *t, const json_t *vocab, const char *file, const char *name,
                       const json_t *v, int32_t *id) {
    const char *content = json_string_value(v);
    int normalized = 0;
    if (json_is_object(v)) {
        static const char *const unsupported[] = {"lstrip", "rstrip", "single_word"};
        content = json_string_value(json_object_get(v, "content"));
        normalized = json_is_true(json_object_get(v, "normalized"));
        for (int k = 0; k < 3; k++)
            if (json_is_true(json_object_get(v, unsupported[k]))) {
                sdx4_set_error(SDX4_ERR_MODEL, "%s: %s: %s=true is not supported", file, name,
                          unsupported[k]);
                return -1;
            }
    }
    if (!content || !*content) {
        sdx4_set_error(SDX4_ERR_MODEL, "%s: %s must be a non-empty string or an AddedToken", file, name);
        return -1;
    }
    *id = vocab_id(vocab, content, strlen(content));
    if (*id < 0) {
        sdx4_set_error(SDX4_ERR_MODEL, "%s: %s \"%.40s\" is not in vocab.json", file, name, content);
        return -1;
    }
    bytes norm = {0};
    const char *match = content;
    size_t len = strlen(content);
    if (normalized) { /* jansson has checked that content is valid UTF-8 */
        if (normalize(content, len, &norm)) return -1;
        match = norm.p;
        len = norm.len;
    }
    int rc = append_special(t, match, len, *id, normalized);
    free(norm.p);
    return rc;
}

/* The special tokens, as transformers 5 gathers them: added_tokens_decoder
 * first, then the named tokens. A named token comes from
 * special_tokens_map.json when present (unless the config has
 * added_tokens_decoder), else from the config, else CLIPTokenizer's
 * default. */
static int load_specials(tokenizer *t, const json_t *vocab, const config *cfg,
                         const config *map) {
    int32_t unused;
    const struct {
        const char *name, *clip_default;
        int32_t *id;
        int required;
    } named[] = {
        {"bos_token", "<|startoftext|>", &t->bos_id, 1},
        {"eos_token", "<|endoftext|>", &t->eos_id, 1},
        {"unk_token", "<|endoftext|>", &t->unk_id, 0},
        {"sep_token", NULL, &unused, 0},
        {"pad_token", "<|endoftext|>", &t->pad_id, 1},
        {"cls_token", NULL, &unused, 0},
        {"mask_token", NULL, &unused, 0},
    };
    json_t *decoder = json_object_get(cfg->root, "added_tokens_decoder");
    if (decoder) {
        if (!json_is_object(decoder)) {
            sdx4_set_error(SDX4_ERR_MODEL, "%s: added_tokens_decoder must be an object", CONFIG_FILE);
            return -1;
        }
        /* registered before the named tokens, so for a content listed in
         * both its flags win, as in transformers */
        const char *key;
        json_t *v;
        json_object_foreach(decoder, key, v) {
            int32_t id;
            if (add_special(t, vocab, CONFIG_FILE, "added_tokens_decoder", v, &id)) return -1;
        }
    }
    for (size_t k = 0; k < sizeof named / sizeof *named; k++) {
        const char *file = CONFIG_FILE;
        json_t *v = json_object_get(cfg->root, named[k].name);
        json_t *from_map = map->root && !decoder ? json_object_get(map->root, named[k].name) : NULL;
        if (from_map) {
            v = from_map;
            file = SPECIAL_MAP_FILE;
        }
        json_t *fallback = NULL;
        if (!v && named[k].clip_default) v = fallback = json_string(named[k].clip_default);
        int rc = 0;
        if (v && !json_is_null(v)) {
            rc = add_special(t, vocab, file, named[k].name, v, named[k].id);
        } else if (named[k].required) {
            sdx4_set_error(SDX4_ERR_MODEL, "%s: %s is null; CLIP needs it", file, named[k].name);
            rc = -1;
        }
        json_decref(fallback);
        if (rc) return -1;
    }
    return 0;
}

static int optional_config(config *c, const char *dir, const char *file) {
    char path[4096];
    struct stat st;
    snprintf(path, sizeof path, "%s/%s", dir, file);
    c->root = NULL;
    return stat(path, &st) == 0 ? sdx4_cfg_load(c, dir, file) : 0;
}

tokenizer *sdx4_tokenizer_load(const char *model_dir) {
    config cfg = {0}, map = {0}, vocab = {0};
    tokenizer *t = calloc(1, sizeof *t);
    if (!t) {
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "tokenizer: out of memory");
        return NULL;
    }
    t->unk_id = -1;
    int ok = sdx4_cfg_load(&cfg, model_dir, CONFIG_FILE) == 0 &&
             sdx4_cfg_int(&cfg, "model_max_length", 0, &t->max_length) == 0 &&
             sdx4_cfg_expect_str(&cfg, "padding_side", "right") == 0 &&
             sdx4_cfg_expect_str(&cfg, "truncation_side", "right") == 0;
    if (ok && (t->max_length < 2 || t->max_length > 1 << 20)) {
        sdx4_set_error(SDX4_ERR_MODEL, "%s: model_max_length must be an integer in [2, 2^20]",
                  CONFIG_FILE);
        ok = 0;
    }
    ok = ok && optional_config(&map, model_dir, SPECIAL_MAP_FILE) == 0 &&
         sdx4_cfg_load(&vocab, model_dir, VOCAB_FILE) == 0 && check_vocab(vocab.root) == 0 &&
         load_specials(t, vocab.root, &cfg, &map) == 0 &&
         load_merges(t, model_dir, vocab.root) == 0;
    if (ok) byte_tables(t, vocab.root);
    sdx4_cfg_free(&cfg);
    sdx4_cfg_free(&map);
    sdx4_cfg_free(&vocab);
    if (!ok) {
        sdx4_tokenizer_free(t);
        return NULL;
    }
    return t;
}

void sdx4_tokenizer_free(tokenizer *t) {
    if (!t) return;
    for (int k = 0; k < t->n_specials; k++) free(t->specials[k].content);
    free(t->specials);
    free(t->merges);
    free(t);
}

/* ------------------------------------------------------------------------
 * The byte-level demo tokenizer
 * ------------------------------------------------------------------------ */

static int write_json(const char *dir, const char *name, json_t *value) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    int rc = value ? json_dump_file(value, path, JSON_INDENT(2)) : -1;
    json_decref(value);
    if (rc) sdx4_set_error(SDX4_ERR_IO, "%s: cannot write", path);
    return rc ? -1 : 0;
}

static json_t *special_tokens(json_t *object) {
    json_object_set_new(object, "bos_token", json_string("<|startoftext|>"));
    json_object_set_new(object, "eos_token", json_string("<|endoftext|>"));
    json_object_set_new(object, "pad_token", json_string("<|endoftext|>"));
    json_object_set_new(object, "unk_token", json_string("<|endoftext|>"));
    return object;
}

int sdx4_tokenizer_write_byte_level(const char *dir, int *vocab_size) {
    if (mkdir(dir, 0777) != 0 && errno != EEXIST) {
        sdx4_set_error(SDX4_ERR_IO, "%s: cannot create: %s", dir, strerror(errno));
        return -1;
    }
    int32_t map[256];
    byte_chars(map);
    json_t *vocab = json_object();
    int id = 0;
    for (int end = 0; end < 2; end++)
        for (int32_t c = 0; c < 256 + 68; c++) /* each byte's character, in order */
            for (int b = 0; b < 256; b++) {
                if (map[b] != c) continue;
                char key[16];
                size_t n = (size_t)utf8proc_encode_char(c, (utf8proc_uint8_t *)key);
                memcpy(key + n, end ? "</w>" : "", end ? 5 : 1);
                json_object_set_new(vocab, key, json_integer(id++));
            }
    json_object_set_new(vocab, "<|startoftext|>", json_integer(id++));
    json_object_set_new(vocab, "<|endoftext|>", json_integer(id++));

    json_t *settings = special_tokens(json_object());
    json_object_set_new(settings, "add_prefix_space", json_false());
    json_object_set_new(settings, "do_lower_case", json_true());
    json_object_set_new(settings, "errors", json_string("replace"));
    json_object_set_new(settings, "model_max_length", json_integer(77));
    json_object_set_new(settings, "tokenizer_class", json_string("CLIPTokenizer"));

    char path[4096];
    snprintf(path, sizeof path, "%s/merges.txt", dir);
    FILE *f = fopen(path, "wb");
    int merges_ok = f && fputs("#version: 0.2\n", f) >= 0;
    if (f && fclose(f) != 0) merges_ok = 0;
    if (!merges_ok) {
        json_decref(vocab);
        json_decref(settings);
        sdx4_set_error(SDX4_ERR_IO, "%s: cannot write", path);
        return -1;
    }
    int rc = write_json(dir, "vocab.json", vocab);
    rc = rc ? rc : write_json(dir, "tokenizer_config.json", json_incref(settings));
    rc = rc ? rc : write_json(dir, "special_tokens_map.json", special_tokens(json_object()));
    json_decref(settings);
    if (rc) return -1;
    if (vocab_size) *vocab_size = id;
    return 0;
}
