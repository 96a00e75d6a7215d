/*
 * test_plan_cache.c - the file of cuDNN's and cuBLASLt's choices
 * (core/plan_cache): what the CUDA backend relies on to start warm, tested
 * without a GPU.
 *
 * A cache must give back what was put, across processes (here: caches
 * opened one after the other on one file), keep other devices' records
 * without showing them, merge what two writers saved, stay within its caps
 * dropping the right records, and treat every bad file or unwritable path
 * as a warning and an empty cache, never a failure to open.
 */
#include <dirent.h>
#include <errno.h>
#include <stdint.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/plan_cache.h"
#include "sdx4.h"
#include "test.h"

#define GPU_A "NVIDIA H100|GPU-aaaa|sm90|driver 12080|cudnn 91900|format 1"
#define GPU_B "NVIDIA A100|GPU-bbbb|sm80|driver 12040|cudnn 90100|format 1"

static char dir[256];

/* A path inside the test's temporary folder. */
static const char *in_dir(const char *name) {
    static char buf[4][512];
    static int next;
    char *b = buf[next++ & 3];
    snprintf(b, sizeof buf[0], "%s/%s", dir, name);
    return b;
}

static void write_bytes(const char *path, const void *data, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f) return;
    fwrite(data, 1, n, f);
    fclose(f);
}

/* The file's bytes (malloc'd) and size, or NULL. */
static uint8_t *read_bytes(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    uint8_t *b = malloc(PLAN_CACHE_MAX_BYTES + 64);
    *n = b ? fread(b, 1, PLAN_CACHE_MAX_BYTES + 64, f) : 0;
    fclose(f);
    return b;
}

/* Whether the cache holds `value` (a string) under `op`. */
static int holds(plan_cache *c, const char *op, const char *value) {
    size_t len = 0;
    const void *v = sdx4_plan_cache_get(c, op, &len);
    return v && len == strlen(value) && !memcmp(v, value, len);
}

/* The checksum plan_cache.c puts last (FNV-1a 64), to forge files. */
static uint64_t fnv1a(const uint8_t *p, size_t n) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001b3ull;
    return h;
}

static void reseal(uint8_t *b, size_t n) {
    uint64_t h = fnv1a(b, n - 8);
    for (int i = 0; i < 8; i++) b[n - 8 + i] = (uint8_t)(h >> (8 * i));
}

static void test_round_trip(void) {
    const char *path = in_dir("round/trip/plans"); /* folders made by save */
    plan_cache *c = sdx4_plan_cache_open(path, GPU_A);
    CHECK(c && sdx4_plan_cache_records(c) == 0 && sdx4_plan_cache_warnings(c) == 0,
          "a missing file is an empty cache, quietly");
    CHECK(sdx4_plan_cache_put(c, "conv 1", "algo 1", 6) == 0, "put");
    CHECK(sdx4_plan_cache_put(c, "conv 2", "algo 2", 6) == 0, "put");
    CHECK(sdx4_plan_cache_put(c, "conv 1", "algo 7", 6) == 0, "replace");
    uint8_t binary[64];
    for (int i = 0; i < 64; i++) binary[i] = (uint8_t)(i * 37); /* cuBLASLt's algo: bytes */
    CHECK(sdx4_plan_cache_put(c, "gemm", binary, sizeof binary) == 0, "put bytes");
    CHECK(sdx4_plan_cache_put(c, "empty", "", 0) == 0, "an empty value");
    CHECK(sdx4_plan_cache_records(c) == 4, "%d records", sdx4_plan_cache_records(c));
    CHECK(sdx4_plan_cache_save(c) == 0, "save");
    sdx4_plan_cache_close(c);

    c = sdx4_plan_cache_open(path, GPU_A);
    size_t len = 1;
    const void *v = sdx4_plan_cache_get(c, "gemm", &len);
    CHECK(holds(c, "conv 1", "algo 7") && holds(c, "conv 2", "algo 2"), "values come back");
    CHECK(v && len == 64 && !memcmp(v, binary, 64), "bytes come back");
    CHECK(sdx4_plan_cache_get(c, "empty", &len) && len == 0, "the empty value comes back");
    CHECK(!sdx4_plan_cache_get(c, "conv 3", &len), "no value never put");
    CHECK(sdx4_plan_cache_warnings(c) == 0, "no warnings");
    sdx4_plan_cache_close(c);

    /* another device sees none of them, and its records join the file */
    c = sdx4_plan_cache_open(path, GPU_B);
    CHECK(c && !sdx4_plan_cache_get(c, "conv 1", &len), "another device's records are hidden");
    CHECK(sdx4_plan_cache_records(c) == 4, "but kept");
    CHECK(sdx4_plan_cache_put(c, "conv 1", "algo 3", 6) == 0, "put");
    CHECK(sdx4_plan_cache_save(c) == 0, "save");
    sdx4_plan_cache_close(c);
    c = sdx4_plan_cache_open(path, GPU_A);
    CHECK(holds(c, "conv 1", "algo 7") && sdx4_plan_cache_records(c) == 5,
          "each device keeps its own value of one key");
    sdx4_plan_cache_close(c);

    /* save writes beside the file and renames: nothing else is left */
    DIR *d = opendir(in_dir("round/trip"));
    int entries = 0;
    for (struct dirent *e; d && (e = readdir(d));) entries += e->d_name[0] != '.';
    if (d) closedir(d);
    CHECK(entries == 1, "%d files in the folder, expected the cache alone", entries);
}

static void test_two_writers(void) {
    const char *path = in_dir("shared");
    plan_cache *a = sdx4_plan_cache_open(path, GPU_A), *b = sdx4_plan_cache_open(path, GPU_A);
    sdx4_plan_cache_put(a, "conv a", "from a", 6);
    sdx4_plan_cache_put(a, "conv both", "a's", 3);
    sdx4_plan_cache_put(b, "conv b", "from b", 6);
    sdx4_plan_cache_put(b, "conv both", "b's", 3);
    CHECK(sdx4_plan_cache_save(a) == 0 && sdx4_plan_cache_save(b) == 0, "both save");
    CHECK(holds(b, "conv a", "from a"), "the second writer took the first's records");
    sdx4_plan_cache_close(a);
    sdx4_plan_cache_close(b);
    plan_cache *c = sdx4_plan_cache_open(path, GPU_A);
    CHECK(holds(c, "conv a", "from a") && holds(c, "conv b", "from b"),
          "the file has both writers' records");
    CHECK(holds(c, "conv both", "b's"), "a key both wrote has the last writer's value");
    CHECK(sdx4_plan_cache_records(c) == 3, "%d records", sdx4_plan_cache_records(c));
    sdx4_plan_cache_close(c);
}

/* Opens `path` after writing `data` there: expects a warning, an empty
 * cache, and a file that the next save makes good again. */
static void expect_refused(const char *what, const void *data, size_t n) {
    const char *path = in_dir("bad");
    write_bytes(path, data, n);
    plan_cache *c = sdx4_plan_cache_open(path, GPU_A);
    CHECK(c != NULL, "%s: the cache opens", what);
    if (!c) return;
    CHECK(sdx4_plan_cache_warnings(c) == 1, "%s: %d warnings", what, sdx4_plan_cache_warnings(c));
    CHECK(sdx4_plan_cache_records(c) == 0, "%s: %d records taken", what,
          sdx4_plan_cache_records(c));
    CHECK(sdx4_plan_cache_put(c, "conv", "ok", 2) == 0 && sdx4_plan_cache_save(c) == 0,
          "%s: saved over", what);
    CHECK(sdx4_plan_cache_warnings(c) == 1, "%s: the save warns no more", what);
    sdx4_plan_cache_close(c);
    c = sdx4_plan_cache_open(path, GPU_A);
    CHECK(c && sdx4_plan_cache_warnings(c) == 0 && holds(c, "conv", "ok"),
          "%s: rebuilt", what);
    sdx4_plan_cache_close(c);
}

static void test_bad_files(void) {
    /* a good file of two records, to damage */
    const char *path = in_dir("good");
    plan_cache *c = sdx4_plan_cache_open(path, GPU_A);
    sdx4_plan_cache_put(c, "conv 1", "algo 1", 6);
    sdx4_plan_cache_put(c, "conv 2", "algo 2", 6);
    sdx4_plan_cache_save(c);
    sdx4_plan_cache_close(c);
    size_t n = 0;
    uint8_t *good = read_bytes(path, &n), *b = malloc(n + 16);
    CHECK(good && b && n > 40, "the good file (%zu bytes)", n);
    if (!good || !b || n <= 40) {
        free(good), free(b);
        return;
    }

    expect_refused("an empty file", "", 0);
    expect_refused("text", "conv 1 = algo 1\n", 16);
    expect_refused("truncated by a byte", good, n - 1);
    expect_refused("truncated by half", good, n / 2);
    expect_refused("the header alone", good, 16);
    memcpy(b, good, n);
    b[n / 2] ^= 0x20;
    expect_refused("a flipped bit", b, n);
    memcpy(b, good, n);
    memcpy(b + n, "\0\0\0\0", 4);
    reseal(b, n + 4);
    expect_refused("bytes after the last record, resealed", b, n + 4);
    memcpy(b, good, n);
    b[8] = 2; /* format 2, with a right checksum: a newer sdx4's file */
    reseal(b, n);
    expect_refused("another format version", b, n);
    memcpy(b, good, n);
    b[12] = 3; /* three records announced, two there */
    reseal(b, n);
    expect_refused("a record count too high", b, n);
    memcpy(b, good, n);
    b[16 + 8] = 0, b[16 + 9] = 1; /* the first device key 256 bytes long */
    reseal(b, n);
    expect_refused("a key over the limit", b, n);
    memcpy(b, good, n);
    b[16 + 16] = 0; /* a NUL in the first device key */
    reseal(b, n);
    expect_refused("a NUL in a key", b, n);

    uint8_t *huge = calloc(PLAN_CACHE_MAX_BYTES + 1, 1);
    if (huge) {
        memcpy(huge, good, n);
        expect_refused("a file over the byte cap", huge, PLAN_CACHE_MAX_BYTES + 1);
        free(huge);
    }

    /* the merge entry point says why */
    c = sdx4_plan_cache_open(in_dir("unused"), GPU_A);
    char why[160] = "";
    CHECK(sdx4_plan_cache_merge(c, good, n - 1, why, sizeof why) == -1 && *why,
          "a refused merge has a reason");
    CHECK(sdx4_plan_cache_merge(c, good, n, why, sizeof why) == 0 &&
              holds(c, "conv 2", "algo 2"),
          "a good merge takes the records");
    sdx4_plan_cache_close(c);

    /* a folder is not a file either */
    mkdir(in_dir("a-folder"), 0777);
    c = sdx4_plan_cache_open(in_dir("a-folder"), GPU_A);
    CHECK(c && sdx4_plan_cache_warnings(c) == 1, "a folder is a warning");
    sdx4_plan_cache_close(c);
    free(good);
    free(b);
}

static void test_unwritable(void) {
    /* a regular file where the folder should be: fails even for root */
    write_bytes(in_dir("not-a-folder"), "x", 1);
    plan_cache *c = sdx4_plan_cache_open(in_dir("not-a-folder/plans"), GPU_A);
    CHECK(c && sdx4_plan_cache_warnings(c) == 0, "an unreadable path opens quietly");
    if (!c) return;
    sdx4_plan_cache_put(c, "conv 1", "algo 1", 6);
    CHECK(sdx4_plan_cache_save(c) == -1 && sdx4_plan_cache_warnings(c) == 1,
          "the first failed save warns");
    sdx4_plan_cache_put(c, "conv 2", "algo 2", 6);
    CHECK(sdx4_plan_cache_save(c) == -1 && sdx4_plan_cache_warnings(c) == 1,
          "the next one is quiet (%d warnings)", sdx4_plan_cache_warnings(c));
    CHECK(holds(c, "conv 1", "algo 1") && holds(c, "conv 2", "algo 2"),
          "the choices stay in memory");
    CHECK(sdx4_plan_cache_save(c) == 0, "nothing new: nothing to save");
    sdx4_plan_cache_close(c);
}

static void test_limits(void) {
    plan_cache *c = sdx4_plan_cache_open(in_dir("limits"), GPU_A);
    char key[PLAN_CACHE_MAX_KEY + 2];
    memset(key, 'k', sizeof key - 1);
    key[sizeof key - 1] = 0;
    static uint8_t big[PLAN_CACHE_MAX_VALUE + 1];
    CHECK(sdx4_plan_cache_put(c, key, "v", 1) == -1, "a key over the limit is refused");
    key[PLAN_CACHE_MAX_KEY] = 0;
    CHECK(sdx4_plan_cache_put(c, key, "v", 1) == 0, "a key at the limit is taken");
    CHECK(sdx4_plan_cache_put(c, "v", big, sizeof big) == -1, "a value over the limit");
    CHECK(sdx4_plan_cache_put(c, "v", big, sizeof big - 1) == 0, "a value at the limit");
    CHECK(sdx4_plan_cache_put(c, "", "v", 1) == -1, "an empty key");
    sdx4_plan_cache_close(c);
    char long_device[PLAN_CACHE_MAX_KEY + 2];
    memset(long_device, 'd', sizeof long_device - 1);
    long_device[sizeof long_device - 1] = 0;
    CHECK(!sdx4_plan_cache_open(in_dir("limits"), long_device), "a device key too long");
    CHECK(!sdx4_plan_cache_open(in_dir("limits"), ""), "an empty device key");
}

static void test_record_cap(void) {
    const char *path = in_dir("cap");
    /* another device's records, older: they go first */
    plan_cache *c = sdx4_plan_cache_open(path, GPU_B);
    for (int i = 0; i < 10; i++) {
        char op[32];
        snprintf(op, sizeof op, "conv %d", i);
        sdx4_plan_cache_put(c, op, "b", 1);
    }
    sdx4_plan_cache_save(c);
    sdx4_plan_cache_close(c);
    c = sdx4_plan_cache_open(path, GPU_A);
    for (int i = 0; i < PLAN_CACHE_MAX_RECORDS + 5; i++) {
        char op[32];
        snprintf(op, sizeof op, "conv %d", i);
        sdx4_plan_cache_put(c, op, "a", 1);
    }
    CHECK(sdx4_plan_cache_records(c) == PLAN_CACHE_MAX_RECORDS, "%d records",
          sdx4_plan_cache_records(c));
    CHECK(sdx4_plan_cache_save(c) == 0, "save");
    sdx4_plan_cache_close(c);
    c = sdx4_plan_cache_open(path, GPU_B);
    size_t len;
    CHECK(sdx4_plan_cache_records(c) == PLAN_CACHE_MAX_RECORDS && sdx4_plan_cache_warnings(c) == 0,
          "the capped file loads");
    CHECK(!sdx4_plan_cache_get(c, "conv 9", &len), "the other device's records went first");
    sdx4_plan_cache_close(c);
    c = sdx4_plan_cache_open(path, GPU_A);
    CHECK(holds(c, "conv 5", "a") && holds(c, "conv 8196", "a"),
          "this device's newest records stay");
    CHECK(sdx4_plan_cache_records(c) == PLAN_CACHE_MAX_RECORDS, "%d",
          sdx4_plan_cache_records(c));
    sdx4_plan_cache_close(c);
}

static void test_byte_cap(void) {
    const char *path = in_dir("bytes");
    plan_cache *c = sdx4_plan_cache_open(path, GPU_A);
    static uint8_t value[PLAN_CACHE_MAX_VALUE];
    int puts = (int)(PLAN_CACHE_MAX_BYTES / PLAN_CACHE_MAX_VALUE) + 50;
    for (int i = 0; i < puts; i++) {
        char op[32];
        snprintf(op, sizeof op, "plan %d", i);
        value[0] = (uint8_t)i;
        sdx4_plan_cache_put(c, op, value, sizeof value);
    }
    int kept = sdx4_plan_cache_records(c);
    CHECK(kept < puts && kept > puts - 100, "%d of %d records kept", kept, puts);
    size_t len = 0;
    const uint8_t *v = sdx4_plan_cache_get(c, "plan 0", &len);
    CHECK(!v, "the oldest went");
    char last[32];
    snprintf(last, sizeof last, "plan %d", puts - 1);
    v = sdx4_plan_cache_get(c, last, &len);
    CHECK(v && len == sizeof value && v[0] == (uint8_t)(puts - 1), "the newest stayed");
    CHECK(sdx4_plan_cache_save(c) == 0, "save");
    sdx4_plan_cache_close(c);
    struct stat st;
    CHECK(stat(path, &st) == 0 && (size_t)st.st_size <= PLAN_CACHE_MAX_BYTES,
          "the file is %lld bytes", (long long)st.st_size);
    c = sdx4_plan_cache_open(path, GPU_A);
    CHECK(sdx4_plan_cache_records(c) == kept && sdx4_plan_cache_warnings(c) == 0,
          "and loads whole");
    sdx4_plan_cache_close(c);
}

static void test_paths(void) {
    char buf[512];
    CHECK(sdx4_plan_cache_path("off", buf, sizeof buf) == 0, "off");
    CHECK(sdx4_plan_cache_path("", buf, sizeof buf) == 0, "empty");
    CHECK(sdx4_plan_cache_path(NULL, buf, sizeof buf) == 0, "NULL: the library's default is none");
    CHECK(sdx4_plan_cache_path("/x/plans", buf, sizeof buf) == 1 && !strcmp(buf, "/x/plans"),
          "a path is itself");
    CHECK(sdx4_plan_cache_path("/a/long/path", buf, 5) == 0, "a path that does not fit");
    /* the front ends' default */
    setenv("XDG_CACHE_HOME", "/xdg", 1);
    setenv("HOME", "/home/u", 1);
    CHECK(sdx4_default_plan_cache(buf, sizeof buf) == 1 && !strcmp(buf, "/xdg/sdx4/cuda-plans"),
          "XDG_CACHE_HOME first: %s", buf);
    setenv("XDG_CACHE_HOME", "relative", 1);
    CHECK(sdx4_default_plan_cache(buf, sizeof buf) == 1 && !strcmp(buf, "/home/u/.cache/sdx4/cuda-plans"),
          "a relative XDG_CACHE_HOME is ignored: %s", buf);
    unsetenv("XDG_CACHE_HOME");
    CHECK(sdx4_default_plan_cache(buf, sizeof buf) == 1 && !strcmp(buf, "/home/u/.cache/sdx4/cuda-plans"),
          "else HOME: %s", buf);
    CHECK(sdx4_default_plan_cache(buf, 8) == 0, "a path that does not fit");
    unsetenv("HOME");
    CHECK(sdx4_default_plan_cache(buf, sizeof buf) == 0, "neither: no cache");
}

int main(void) {
    snprintf(dir, sizeof dir, "/tmp/test_plan_cache.XXXXXX");
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 1;
    }
    test_round_trip();
    test_two_writers();
    test_bad_files();
    test_unwritable();
    test_limits();
    test_record_cap();
    test_byte_cap();
    test_paths();
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", dir);
    printf("test_plan_cache: %d checks, %d failures\n", test_checks, test_failures);
    return test_failures ? 1 : 0;
}
