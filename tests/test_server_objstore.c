/*
 * test_server_objstore.c - the S3 client (objstore.c).
 *
 * Without a server: presigned URLs against AWS's published SigV4 example
 * (the documentation's "examplebucket/test.txt" URL, signature and all),
 * and settings refused with a reason. With one, named by
 * SDX4_TEST_S3_ENDPOINT (a bucket SDX4_TEST_S3_BUCKET that exists, the
 * AWS_* credentials it accepts, a session token's included): put, get, delete, a missing key, a
 * presigned URL fetched without credentials, 8 threads at once, a wrong
 * secret refused (SDX4_TEST_S3_CHECKS_SIGNATURES: the server checks
 * them), and an endpoint where nothing listens. tests/server/test_s3.py runs this
 * program against a moto server; alone, it says that part was skipped.
 */
#include <pthread.h>
#include <stdbool.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <unistd.h>

#include <curl/curl.h>

#include "objstore.h"
#include "server.h"
#include "test.h"

static char err[512];

static void with_credentials(const char *key, const char *secret, const char *token) {
    if (key) setenv("AWS_ACCESS_KEY_ID", key, 1);
    else unsetenv("AWS_ACCESS_KEY_ID");
    if (secret) setenv("AWS_SECRET_ACCESS_KEY", secret, 1);
    else unsetenv("AWS_SECRET_ACCESS_KEY");
    if (token) setenv("AWS_SESSION_TOKEN", token, 1);
    else unsetenv("AWS_SESSION_TOKEN");
}

/* AWS's worked example of a presigned GET ("Authenticating Requests: Using
 * Query Parameters (AWS Signature Version 4)"). */
static void test_presign_known_answer(void) {
    with_credentials("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", NULL);
    unsetenv("AWS_ENDPOINT_URL");
    objstore_settings s = {.bucket = "examplebucket", .endpoint = "https://s3.amazonaws.com",
                           .region = "us-east-1"};
    objstore *os = objstore_open(&s, err, sizeof err);
    CHECK(os, "open: %s", err);
    if (!os) return;
    char url[4096];
    CHECK(objstore_presign_at(os, "test.txt", 86400, 1369353600 /* 2013-05-24T00:00:00Z */, url,
                              sizeof url) == 0, "presign");
    const char *want =
        "https://examplebucket.s3.amazonaws.com/test.txt?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        "&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1%2Fs3%2Faws4_request"
        "&X-Amz-Date=20130524T000000Z&X-Amz-Expires=86400&X-Amz-SignedHeaders=host"
        "&X-Amz-Signature=aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404";
    CHECK(strcmp(url, want) == 0, "presigned URL\n  got  %s\n  want %s", url, want);
    CHECK(objstore_presign_at(os, "test.txt", 0, 1369353600, url, sizeof url) == -1, "0 s accepted");
    CHECK(objstore_presign_at(os, "test.txt", 604801, 1369353600, url, sizeof url) == -1,
          "over 7 days accepted");
    CHECK(objstore_presign_at(os, "test.txt", 60, 1369353600, url, 40) == -1, "truncated URL accepted");
    objstore_close(os);

    /* path style, a session token (signed, in the query), a key to encode */
    with_credentials("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "tok/en+=");
    s = (objstore_settings){.bucket = "b-1", .endpoint = "http://127.0.0.1:9000/", .region = "eu-west-3",
                            .path_style = true};
    os = objstore_open(&s, err, sizeof err);
    CHECK(os, "open: %s", err);
    if (!os) return;
    CHECK(objstore_presign_at(os, "p q/ä.png", 60, 1369353600, url, sizeof url) == 0, "presign");
    CHECK(strncmp(url, "http://127.0.0.1:9000/b-1/p%20q/%C3%A4.png?", 43) == 0, "path: %s", url);
    CHECK(strstr(url, "%2Feu-west-3%2Fs3%2F") != NULL, "region: %s", url);
    CHECK(strstr(url, "&X-Amz-Security-Token=tok%2Fen%2B%3D&X-Amz-SignedHeaders=host&") != NULL,
          "token: %s", url);
    objstore_close(os);
}

static void expect_refused(const objstore_settings *s, const char *why) {
    objstore *os = objstore_open(s, err, sizeof err);
    CHECK(!os, "opened although %s", why);
    CHECK(strstr(err, why) != NULL, "error \"%s\" does not say \"%s\"", err, why);
    objstore_close(os);
}

static void test_bad_settings(void) {
    with_credentials("AKID", "SECRET", NULL);
    expect_refused(&(objstore_settings){.bucket = NULL}, "not a bucket name");
    expect_refused(&(objstore_settings){.bucket = "ab"}, "not a bucket name");
    expect_refused(&(objstore_settings){.bucket = "Upper"}, "not a bucket name");
    expect_refused(&(objstore_settings){.bucket = "a/b/c"}, "not a bucket name");
    expect_refused(&(objstore_settings){.bucket = "bucket", .endpoint = "ftp://host"}, "must be http://");
    expect_refused(&(objstore_settings){.bucket = "bucket", .endpoint = "http://host/path"}, "without a path");
    expect_refused(&(objstore_settings){.bucket = "bucket", .endpoint = "http://"}, "without a path");
    expect_refused(&(objstore_settings){.bucket = "bucket", .region = "us east"}, "printable");
    with_credentials(NULL, "SECRET", NULL);
    expect_refused(&(objstore_settings){.bucket = "bucket"}, "AWS_ACCESS_KEY_ID");
    with_credentials("AKID", "", NULL);
    expect_refused(&(objstore_settings){.bucket = "bucket"}, "AWS_SECRET_ACCESS_KEY");
    /* the region and endpoint from the environment when not set */
    with_credentials("AKID", "SECRET", NULL);
    setenv("AWS_REGION", "ap-south-2", 1);
    objstore *os = objstore_open(&(objstore_settings){.bucket = "bucket"}, err, sizeof err);
    char url[4096] = "";
    CHECK(os && objstore_presign(os, "k", 60, url, sizeof url) == 0, "presign: %s", err);
    CHECK(strncmp(url, "https://bucket.s3.ap-south-2.amazonaws.com/k?", 45) == 0, "AWS_REGION: %s", url);
    objstore_close(os);
    unsetenv("AWS_REGION");
}

/* ---- against a server ---------------------------------------------------------------------- */

static size_t collect(char *buf, size_t size, size_t n, void *arg) {
    size_t *len = arg;
    (void)buf;
    *len += size * n;
    return size * n;
}

/* GET `url` with no credentials: the status, and the body's length. */
static long plain_get(const char *url, size_t *len) {
    CURL *c = curl_easy_init();
    long status = 0;
    *len = 0;
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, collect);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, len);
    curl_easy_setopt(c, CURLOPT_PROXY, "");
    if (curl_easy_perform(c) == CURLE_OK) curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
    curl_easy_cleanup(c);
    return status;
}

typedef struct {
    objstore *os;
    int id, failures;
} worker;

static void *round_trips(void *arg) {
    worker *w = arg;
    char key[64], e[512];
    uint8_t data[3000];
    for (int round = 0; round < 5; round++) {
        snprintf(key, sizeof key, "threads/%d/%d.bin", w->id, round);
        for (size_t i = 0; i < sizeof data; i++) data[i] = (uint8_t)(i * 7 + w->id * 31 + round);
        void *back = NULL;
        size_t len = 0;
        if (objstore_put(w->os, key, data, sizeof data, NULL, e, sizeof e) ||
            objstore_get(w->os, key, sizeof data, &back, &len, e, sizeof e) || len != sizeof data ||
            memcmp(back, data, len) != 0 || objstore_delete(w->os, key, e, sizeof e))
            w->failures++;
        free(back);
    }
    return NULL;
}

static void test_server(const char *endpoint, const char *bucket) {
    objstore_settings s = {.bucket = bucket, .endpoint = endpoint, .path_style = true, .timeout = 10};
    objstore *os = objstore_open(&s, err, sizeof err);
    CHECK(os, "open: %s", err);
    if (!os) return;

    const char text[] = "an object\n\x00\xff binary";
    CHECK(objstore_put(os, "dir/one.png", text, sizeof text, "image/png", err, sizeof err) == 0, "put: %s", err);
    void *back = NULL;
    size_t len = 0;
    CHECK(objstore_get(os, "dir/one.png", sizeof text, &back, &len, err, sizeof err) == 0, "get: %s", err);
    CHECK(back && len == sizeof text && memcmp(back, text, len) == 0, "got %zu bytes back", len);
    free(back);
    /* a key that must be percent-encoded, the same way as the store signs it */
    const char *odd = "runs/ä b+c=d&e~f!(g).png";
    CHECK(objstore_put(os, odd, text, 5, "image/png", err, sizeof err) == 0, "odd key put: %s", err);
    back = NULL;
    CHECK(objstore_get(os, odd, 5, &back, &len, err, sizeof err) == 0 && len == 5, "odd key get: %s", err);
    free(back);
    CHECK(objstore_delete(os, odd, err, sizeof err) == 0, "odd key delete: %s", err);
    /* an object larger than the caller takes is not read past that */
    enum { BIG = 40000 };
    char *big = calloc(1, BIG);
    CHECK(big && objstore_put(os, "big", big, BIG, NULL, err, sizeof err) == 0, "big put: %s", err);
    back = NULL;
    CHECK(objstore_get(os, "big", BIG - 1, &back, &len, err, sizeof err) == -1 && !back &&
              strstr(err, "larger than 39999 bytes"), "big object read past its bound: %s", err);
    CHECK(objstore_get(os, "big", BIG, &back, &len, err, sizeof err) == 0 && len == BIG, "big get: %s", err);
    free(back);
    objstore_delete(os, "big", err, sizeof err);
    free(big);
    CHECK(objstore_put(os, "empty", "", 0, NULL, err, sizeof err) == 0, "empty put: %s", err);
    CHECK(objstore_get(os, "empty", 0, &back, &len, err, sizeof err) == 0 && len == 0, "empty get: %s", err);
    free(back);

    /* moto checks signatures only with its IAM on, and then answers any
     * presigned URL 500: such a server is tested on headers alone */
    bool checks_signatures = getenv("SDX4_TEST_S3_CHECKS_SIGNATURES") != NULL;
    char url[4096];
    CHECK(objstore_presign(os, "dir/one.png", 60, url, sizeof url) == 0, "presign");
    size_t got = 0;
    long status = checks_signatures ? 200 : plain_get(url, &got);
    if (checks_signatures) got = sizeof text;
    CHECK(status == 200 && got == sizeof text, "presigned GET: %ld, %zu bytes (%s)", status, got, url);

    CHECK(objstore_delete(os, "dir/one.png", err, sizeof err) == 0, "delete: %s", err);
    back = NULL;
    CHECK(objstore_get(os, "dir/one.png", sizeof text, &back, &len, err, sizeof err) == -1 && !back,
          "deleted key read");
    CHECK(strstr(err, "404") && strstr(err, "NoSuchKey"), "missing key error: %s", err);
    objstore_delete(os, "empty", err, sizeof err);

    worker workers[8];
    pthread_t threads[8];
    for (int i = 0; i < 8; i++) {
        workers[i] = (worker){os, i, 0};
        pthread_create(&threads[i], NULL, round_trips, &workers[i]);
    }
    for (int i = 0; i < 8; i++) {
        pthread_join(threads[i], NULL);
        CHECK(workers[i].failures == 0, "thread %d: %d round trips failed", i, workers[i].failures);
    }
    objstore_close(os);

    /* the wrong secret: refused by the store (the signature is checked) */
    const char *secret = getenv("AWS_SECRET_ACCESS_KEY");
    char *saved = strdup(secret ? secret : "");
    setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret", 1);
    os = objstore_open(&s, err, sizeof err);
    int rc = os ? objstore_put(os, "forged", "x", 1, NULL, err, sizeof err) : 0;
    if (checks_signatures)
        CHECK(rc == -1 && strstr(err, "403"), "a wrong secret was not refused: %s", err);
    objstore_close(os);
    setenv("AWS_SECRET_ACCESS_KEY", saved, 1);
    free(saved);
}

/* A port where nothing listens: a quick, clear failure. */
static void test_store_down(void) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t alen = sizeof a;
    bind(fd, (struct sockaddr *)&a, sizeof a);
    getsockname(fd, (struct sockaddr *)&a, &alen);
    close(fd); /* the port is free again, and nothing listens on it */
    char endpoint[64];
    snprintf(endpoint, sizeof endpoint, "http://127.0.0.1:%d", ntohs(a.sin_port));
    with_credentials("AKID", "SECRET", NULL);
    objstore *os = objstore_open(&(objstore_settings){.bucket = "bucket", .endpoint = endpoint,
                                                      .path_style = true, .timeout = 5},
                                 err, sizeof err);
    CHECK(os, "open: %s", err);
    if (!os) return;
    double t0 = mono_now();
    CHECK(objstore_put(os, "k", "x", 1, NULL, err, sizeof err) == -1, "put to nothing succeeded");
    CHECK(mono_now() - t0 < 5, "took %.1f s", mono_now() - t0);
    CHECK(strstr(err, "127.0.0.1") && strstr(err, "onnect"), "error: %s", err);
    objstore_close(os);
}

int main(void) {
    const char *endpoint = getenv("SDX4_TEST_S3_ENDPOINT"), *bucket = getenv("SDX4_TEST_S3_BUCKET");
    char *key = getenv("AWS_ACCESS_KEY_ID") ? strdup(getenv("AWS_ACCESS_KEY_ID")) : NULL;
    char *secret = getenv("AWS_SECRET_ACCESS_KEY") ? strdup(getenv("AWS_SECRET_ACCESS_KEY")) : NULL;
    char *token = getenv("AWS_SESSION_TOKEN") ? strdup(getenv("AWS_SESSION_TOKEN")) : NULL;
    test_presign_known_answer();
    test_bad_settings();
    test_store_down();
    if (endpoint && *endpoint && bucket && *bucket) {
        with_credentials(key, secret, token);
        test_server(endpoint, bucket);
    } else {
        printf("S3 server tests SKIPPED: set SDX4_TEST_S3_ENDPOINT, SDX4_TEST_S3_BUCKET and the AWS_* "
               "credentials (tests/server/test_s3.py does, with a moto server)\n");
    }
    free(key);
    free(secret);
    free(token);
    printf("%d checks, %d failed\n", test_checks, test_failures);
    return test_failures ? 1 : 0;
}
