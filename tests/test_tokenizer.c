/*
 * test_tokenizer.c - the CLIP tokenizer against transformers' ids.
 *
 * Every prompt of both golden files (tiny: pad <|endoftext|>; small: pad
 * "!", which is then a special token matched inside prompts) must give the
 * recorded 77 ids. Also: the untruncated length of long prompts, invalid
 * UTF-8, several threads sharing one tokenizer, the byte-level writer read
 * back, and the errors of broken tokenizer folders.
 */
#include <jansson.h>
#include <pthread.h>
#include <stdint.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "core/error.h"
#include "test.h"
#include "text/tokenizer.h"

#define MAX_LEN 77

typedef struct {
    char *prompt;
    int32_t ids[MAX_LEN];
} golden;

static int load_golden(const char *path, golden **out) {
    json_error_t e;
    json_t *root = json_load_file(path, 0, &e);
    if (!json_is_array(root)) {
        fprintf(stderr, "%s: %s\n", path, e.text);
        json_decref(root);
        return -1;
    }
    int n = (int)json_array_size(root);
    golden *g = calloc((size_t)n, sizeof *g);
    for (int i = 0; i < n; i++) {
        json_t *item = json_array_get(root, (size_t)i), *ids = json_object_get(item, "input_ids");
        g[i].prompt = strdup(json_string_value(json_object_get(item, "prompt")));
        CHECK(json_array_size(ids) == MAX_LEN, "%s: entry %d has %zu ids", path, i,
              json_array_size(ids));
        for (int k = 0; k < MAX_LEN; k++)
            g[i].ids[k] = (int32_t)json_integer_value(json_array_get(ids, (size_t)k));
    }
    json_decref(root);
    *out = g;
    return n;
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ---- golden prompts */

static void check_model(const char *name) {
    char model[4200], gold[4200];
    snprintf(model, sizeof model, "%s/model", test_ref(name));
    snprintf(gold, sizeof gold, "%s/golden/tokenizer.json", test_ref(name));
    double t0 = now();
    tokenizer *t = sdx4_tokenizer_load(model);
    double ms = 1e3 * (now() - t0);
    CHECK(t != NULL, "%s: %s", name, sdx4_last_error());
    if (!t) return;
    printf("%s: sdx4_tokenizer_load %.1f ms\n", name, ms);
    CHECK(sdx4_tokenizer_max_length(t) == MAX_LEN, "%d", sdx4_tokenizer_max_length(t));

    golden *g = NULL;
    int n = load_golden(gold, &g);
    CHECK(n == 20, "%s: %d prompts", gold, n);
    /* "a white cat": bos a white cat eos pad... */
    int32_t eos = g[0].ids[4], pad = g[0].ids[MAX_LEN - 1];
    for (int i = 0; i < n; i++) {
        int32_t ids[MAX_LEN];
        int count = -1;
        CHECK(sdx4_tokenizer_encode(t, g[i].prompt, ids, MAX_LEN, &count) == 0, "%s", sdx4_last_error());
        int first_diff = -1;
        for (int k = 0; k < MAX_LEN && first_diff < 0; k++)
            if (ids[k] != g[i].ids[k]) first_diff = k;
        CHECK(first_diff < 0, "%s: prompt %d \"%.40s\": id %d is %d, expected %d", name, i,
              g[i].prompt, first_diff, first_diff < 0 ? 0 : ids[first_diff],
              first_diff < 0 ? 0 : g[i].ids[first_diff]);

        if (strncmp(g[i].prompt, "word word", 9) == 0) {
            int words = 0;
            for (const char *p = g[i].prompt; (p = strstr(p, "word")); p += 4) words++;
            CHECK(count == words + 2, "%s: %d words counted %d tokens", name, words, count);
            /* untruncated, the ids begin as the golden ones and end with eos */
            int32_t *big = malloc(4096 * sizeof *big);
            int big_count = -1;
            CHECK(sdx4_tokenizer_encode(t, g[i].prompt, big, 4096, &big_count) == 0, "%s",
                  sdx4_last_error());
            CHECK(big_count == count, "%d vs %d", big_count, count);
            CHECK(memcmp(big, g[i].ids, (MAX_LEN - 1) * sizeof *big) == 0, "prefix differs");
            CHECK(big[count - 1] == eos && big[count] == pad, "%d %d", big[count - 1], big[count]);
            free(big);
        } else if (pad != eos) {
            /* the last eos is the one the tokenizer added */
            int last_eos = 0;
            for (int k = 0; k < MAX_LEN; k++)
                if (g[i].ids[k] == eos) last_eos = k;
            CHECK(count == last_eos + 1, "%s: prompt %d: %d tokens, eos at %d", name, i, count,
                  last_eos);
        }
    }
    for (int i = 0; i < n; i++) free(g[i].prompt);
    free(g);
    sdx4_tokenizer_free(t);
}

/* ---- robustness */

typedef struct {
    const tokenizer *t;
    const char *prompt;
    const int32_t *expected;
    int mismatches;
} thread_job;

static void *encode_many(void *arg) {
    thread_job *job = arg;
    for (int r = 0; r < 200; r++) {
        int32_t ids[MAX_LEN];
        if (sdx4_tokenizer_encode(job->t, job->prompt, ids, MAX_LEN, NULL) != 0 ||
            memcmp(ids, job->expected, sizeof ids) != 0)
            job->mismatches++;
    }
    return NULL;
}

static void check_robustness(void) {
    char model[4200];
    snprintf(model, sizeof model, "%s/model", test_ref("small"));
    tokenizer *t = sdx4_tokenizer_load(model);
    CHECK(t != NULL, "%s", sdx4_last_error());
    if (!t) return;
    int32_t a[MAX_LEN], b[MAX_LEN];
    int n;

    /* an invalid byte reads as U+FFFD, a truncated sequence as one U+FFFD */
    CHECK(sdx4_tokenizer_encode(t, "x\xff y", a, MAX_LEN, &n) == 0, "%s", sdx4_last_error());
    CHECK(sdx4_tokenizer_encode(t, "x\xef\xbf\xbd y", b, MAX_LEN, NULL) == 0, "%s", sdx4_last_error());
    CHECK(memcmp(a, b, sizeof a) == 0, "invalid byte != U+FFFD");
    CHECK(sdx4_tokenizer_encode(t, "x\xe2\x82 y", a, MAX_LEN, NULL) == 0, "%s", sdx4_last_error());
    CHECK(memcmp(a, b, sizeof a) == 0, "truncated sequence != one U+FFFD");
    CHECK(sdx4_tokenizer_encode(t, "\xed\xa0\x80\xc0\xaf\xf4\x90\x80\x80", a, MAX_LEN, &n) == 0, "%s",
          sdx4_last_error());

    /* normalization: İ lowercases to "i̇" (Rust), Σ to σ, NFC composes */
    CHECK(sdx4_tokenizer_encode(t, "e\xcc\x81", a, MAX_LEN, NULL) == 0, "%s", sdx4_last_error());
    CHECK(sdx4_tokenizer_encode(t, "\xc3\xa9", b, MAX_LEN, NULL) == 0, "%s", sdx4_last_error());
    CHECK(memcmp(a, b, sizeof a) == 0, "NFC");
    CHECK(sdx4_tokenizer_encode(t, "\xc4\xb0", a, MAX_LEN, NULL) == 0, "%s", sdx4_last_error());
    CHECK(sdx4_tokenizer_encode(t, "i\xcc\x87", b, MAX_LEN, NULL) == 0, "%s", sdx4_last_error());
    CHECK(memcmp(a, b, sizeof a) == 0, "dotted capital I");

    /* max_len: the smallest is bos eos */
    CHECK(sdx4_tokenizer_encode(t, "a white cat", a, 2, &n) == 0 && n == 5, "n=%d", n);
    CHECK(a[0] == 49406 && a[1] == 49407, "%d %d", a[0], a[1]);
    CHECK(sdx4_tokenizer_encode(t, "a", a, 1, NULL) == -1, "max_len 1 accepted");
    CHECK(sdx4_tokenizer_encode(t, NULL, a, MAX_LEN, NULL) == -1, "NULL text accepted");

    /* a long run of letters stays fast (BPE is n log n) */
    size_t long_len = 1 << 20;
    char *text = malloc(long_len + 1);
    for (size_t i = 0; i < long_len; i++) text[i] = "abcdefgh"[i * 7 % 8];
    text[long_len] = 0;
    double t0 = now();
    CHECK(sdx4_tokenizer_encode(t, text, a, MAX_LEN, &n) == 0 && n > MAX_LEN, "%s", sdx4_last_error());
    double s = now() - t0;
    CHECK(s < 10, "1 MiB word took %.1f s", s);
    free(text);

    /* several threads on one tokenizer */
    const char *prompt = "A painting of a squirrel eating a burger, punctuation!!! caf\xc3\xa9";
    CHECK(sdx4_tokenizer_encode(t, prompt, b, MAX_LEN, NULL) == 0, "%s", sdx4_last_error());
    pthread_t threads[4];
    thread_job jobs[4];
    for (int i = 0; i < 4; i++) {
        jobs[i] = (thread_job){t, prompt, b, 0};
        pthread_create(&threads[i], NULL, encode_many, &jobs[i]);
    }
    for (int i = 0; i < 4; i++) {
        pthread_join(threads[i], NULL);
        CHECK(jobs[i].mismatches == 0, "thread %d: %d mismatches", i, jobs[i].mismatches);
    }
    sdx4_tokenizer_free(t);
}

/* ---- the byte-level writer and broken folders */

static void write_text(const char *dir, const char *file, const char *text) {
    char path[4200];
    snprintf(path, sizeof path, "%s/%s", dir, file);
    FILE *f = fopen(path, "wb");
    fputs(text, f);
    fclose(f);
}

static void check_byte_level(const char *root) {
    char dir[4200];
    snprintf(dir, sizeof dir, "%s/tokenizer", root);
    int vocab_size = 0;
    CHECK(sdx4_tokenizer_write_byte_level(dir, &vocab_size) == 0, "%s", sdx4_last_error());
    CHECK(vocab_size == 514, "vocab size %d", vocab_size);
    tokenizer *t = sdx4_tokenizer_load(root);
    CHECK(t != NULL, "%s", sdx4_last_error());
    if (!t) return;
    int32_t ids[MAX_LEN];
    int n;
    CHECK(sdx4_tokenizer_encode(t, "Hello, world! caf\xc3\xa9", ids, MAX_LEN, &n) == 0, "%s",
          sdx4_last_error());
    /* 5 + 1 + 5 + 1 + 5 bytes, one token each */
    CHECK(n == 19, "%d tokens", n);
    CHECK(ids[0] == 512 && ids[18] == 513 && ids[19] == 513 && ids[MAX_LEN - 1] == 513,
          "specials %d %d %d", ids[0], ids[18], ids[19]);
    CHECK(ids[1] == 'h' - '!' && ids[5] == 256 + 'o' - '!', "bytes %d %d", ids[1], ids[5]);
    for (int i = 0; i < MAX_LEN; i++) CHECK(ids[i] >= 0 && ids[i] < vocab_size, "id %d", ids[i]);
    sdx4_tokenizer_free(t);
}

static void expect_load_error(const char *root, const char *needle) {
    tokenizer *t = sdx4_tokenizer_load(root);
    CHECK(t == NULL, "loaded a broken tokenizer (%s)", needle);
    CHECK(strstr(sdx4_last_error(), needle) != NULL, "error \"%s\" lacks \"%s\"",
          sdx4_last_error(), needle);
    sdx4_tokenizer_free(t);
}

static void check_errors(const char *root) {
    char dir[4200], path[4300];
    snprintf(dir, sizeof dir, "%s/tokenizer", root);
    CHECK(sdx4_tokenizer_write_byte_level(dir, NULL) == 0, "%s", sdx4_last_error());

    write_text(dir, "vocab.json", "{\"a\": 0, ");
    expect_load_error(root, "tokenizer/vocab.json");
    write_text(dir, "vocab.json", "{\"a\": \"zero\"}");
    expect_load_error(root, "tokenizer/vocab.json");
    snprintf(path, sizeof path, "%s/vocab.json", dir);
    remove(path);
    expect_load_error(root, "tokenizer/vocab.json");

    CHECK(sdx4_tokenizer_write_byte_level(dir, NULL) == 0, "%s", sdx4_last_error());
    write_text(dir, "merges.txt", "#version: 0.2\nh e</w>\nh e\n");
    expect_load_error(root, "tokenizer/merges.txt: line 2: \"he</w>\" is not in vocab.json");
    write_text(dir, "merges.txt", "#version: 0.2\nhe\n");
    expect_load_error(root, "tokenizer/merges.txt: line 2 is not \"left right\"");
    snprintf(path, sizeof path, "%s/merges.txt", dir);
    remove(path);
    expect_load_error(root, "tokenizer/merges.txt");

    CHECK(sdx4_tokenizer_write_byte_level(dir, NULL) == 0, "%s", sdx4_last_error());
    write_text(dir, "special_tokens_map.json", "{\"pad_token\": \"<pad>\"}");
    expect_load_error(root, "tokenizer/special_tokens_map.json: pad_token");
    write_text(dir, "special_tokens_map.json", "{\"pad_token\": {\"content\": \"!\", \"lstrip\": true}}");
    expect_load_error(root, "lstrip");
    snprintf(path, sizeof path, "%s/special_tokens_map.json", dir);
    remove(path);
    write_text(dir, "tokenizer_config.json", "{\"model_max_length\": 1e30}");
    expect_load_error(root, "tokenizer/tokenizer_config.json: model_max_length");
    write_text(dir, "tokenizer_config.json", "{\"model_max_length\": 77, \"eos_token\": null}");
    expect_load_error(root, "tokenizer/tokenizer_config.json: eos_token");
    snprintf(path, sizeof path, "%s/tokenizer_config.json", dir);
    remove(path);
    expect_load_error(root, "tokenizer/tokenizer_config.json");
    expect_load_error("/nonexistent-sdx4", "tokenizer/tokenizer_config.json");
}

static void remove_tree(const char *root) {
    static const char *const files[] = {"vocab.json", "merges.txt", "tokenizer_config.json",
                                        "special_tokens_map.json"};
    char path[4300];
    for (int i = 0; i < 4; i++) {
        snprintf(path, sizeof path, "%s/tokenizer/%s", root, files[i]);
        remove(path);
    }
    snprintf(path, sizeof path, "%s/tokenizer", root);
    rmdir(path);
    rmdir(root);
}

int main(void) {
    char ref[4200];
    struct stat st;
    snprintf(ref, sizeof ref, "%s", test_ref("small/golden/tokenizer.json"));
    if (stat(ref, &st) != 0) {
        fprintf(stderr, "test_tokenizer: no reference data at %s, skipping\n", ref);
        return 77;
    }
    check_model("tiny");
    check_model("small");
    check_robustness();

    char root[] = "/tmp/sdx4_tokenizer_XXXXXX";
    CHECK(mkdtemp(root) != NULL, "mkdtemp");
    check_byte_level(root);
    check_errors(root);
    remove_tree(root);
    return test_finish("test_tokenizer");
}
