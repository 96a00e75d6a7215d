/*
 * test_server_jwt.c - bearer tokens (jwt.c) without a server: tokens
 * minted here with GnuTLS keys generated here (RSA 2048, P-256, Ed25519),
 * checked against a JWKS file. Valid tokens of each algorithm; exp, nbf and
 * iat around the leeway; issuer and audience; wrong keys and kids;
 * algorithm confusion (alg none, HS256 keyed with the public key, a token
 * of one algorithm naming a key of another type); malformed tokens; scopes;
 * which JWKS keys are used; reloads (periodic, and asked by an unknown kid
 * at most once per interval); and auth.c's side: identities, 401 with the
 * reason, throttling. tests/server/test_jwt.py drives it through HTTP.
 */
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <gnutls/abstract.h>
#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>
#include <jansson.h>

#include "auth.h"
#include "base64.h"
#include "cache.h"
#include "jwt.h"
#include "server.h"
#include "test.h"

#define ISSUER "https://idp.example/realms/sdx4"
#define AUDIENCE "sdx4-api"

/* ---- minting ------------------------------------------------------------------------ */

typedef struct {
    gnutls_privkey_t priv;
    gnutls_pubkey_t pub;
    const char *alg, *kid;
    gnutls_sign_algorithm_t sign;
} test_key;

static test_key make_key(const char *alg, const char *kid, unsigned rsa_bits) {
    test_key k = {.alg = alg, .kid = kid};
    gnutls_pk_algorithm_t pk = GNUTLS_PK_RSA;
    unsigned bits = rsa_bits;
    k.sign = GNUTLS_SIGN_RSA_SHA256;
    if (strcmp(alg, "ES256") == 0) {
        pk = GNUTLS_PK_ECDSA;
        bits = GNUTLS_CURVE_TO_BITS(GNUTLS_ECC_CURVE_SECP256R1);
        k.sign = GNUTLS_SIGN_ECDSA_SHA256;
    } else if (strcmp(alg, "EdDSA") == 0) {
        pk = GNUTLS_PK_EDDSA_ED25519;
        bits = GNUTLS_CURVE_TO_BITS(GNUTLS_ECC_CURVE_ED25519);
        k.sign = GNUTLS_SIGN_EDDSA_ED25519;
    }
    if (gnutls_privkey_init(&k.priv) < 0 || gnutls_privkey_generate(k.priv, pk, bits, 0) < 0 ||
        gnutls_pubkey_init(&k.pub) < 0 || gnutls_pubkey_import_privkey(k.pub, k.priv, 0, 0) < 0) {
        fprintf(stderr, "cannot generate a %s key\n", alg);
        exit(1);
    }
    return k;
}

static void free_key(test_key *k) {
    gnutls_privkey_deinit(k->priv);
    gnutls_pubkey_deinit(k->pub);
}

/* base64url without padding, malloc'd */
static char *b64url(const void *data, size_t len) {
    size_t n;
    char *text = base64_encode(data, len, &n);
    while (n && text[n - 1] == '=') n--;
    text[n] = '\0';
    for (char *c = text; *c; c++) *c = *c == '+' ? '-' : *c == '/' ? '_' : *c;
    return text;
}

/* `bytes` left-padded to `width` bytes */
static char *b64url_fixed(const gnutls_datum_t *d, size_t width) {
    unsigned char buf[64] = {0};
    size_t n = d->size, skip = 0;
    while (n - skip > width && d->data[skip] == 0) skip++;
    memcpy(buf + width - (n - skip), d->data + skip, n - skip);
    return b64url(buf, width);
}

static json_t *jwk_of(const test_key *k) {
    json_t *jwk = json_object();
    if (k->kid) json_object_set_new(jwk, "kid", json_string(k->kid));
    gnutls_datum_t a = {0}, b = {0};
    char *x = NULL, *y = NULL;
    if (strcmp(k->alg, "RS256") == 0) {
        gnutls_pubkey_export_rsa_raw2(k->pub, &a, &b, GNUTLS_EXPORT_FLAG_NO_LZ);
        x = b64url(a.data, a.size);
        y = b64url(b.data, b.size);
        json_object_set_new(jwk, "kty", json_string("RSA"));
        json_object_set_new(jwk, "n", json_string(x));
        json_object_set_new(jwk, "e", json_string(y));
    } else {
        gnutls_ecc_curve_t curve;
        gnutls_pubkey_export_ecc_raw2(k->pub, &curve, &a, strcmp(k->alg, "ES256") == 0 ? &b : NULL,
                                      GNUTLS_EXPORT_FLAG_NO_LZ);
        x = b64url_fixed(&a, 32);
        json_object_set_new(jwk, "x", json_string(x));
        if (strcmp(k->alg, "ES256") == 0) {
            y = b64url_fixed(&b, 32);
            json_object_set_new(jwk, "kty", json_string("EC"));
            json_object_set_new(jwk, "crv", json_string("P-256"));
            json_object_set_new(jwk, "y", json_string(y));
        } else {
            json_object_set_new(jwk, "kty", json_string("OKP"));
            json_object_set_new(jwk, "crv", json_string("Ed25519"));
        }
    }
    json_object_set_new(jwk, "use", json_string("sig"));
    gnutls_free(a.data);
    gnutls_free(b.data);
    free(x);
    free(y);
    return jwk;
}

/* header.payload.signature: `header` NULL is {"alg":..,"kid":..} of the key */
static char *mint(const test_key *k, const char *header, const char *payload) {
    char default_header[256];
    if (!header) {
        snprintf(default_header, sizeof default_header, k->kid ? "{\"alg\":\"%s\",\"kid\":\"%s\",\"typ\":\"JWT\"}"
                                                              : "{\"alg\":\"%s\",\"typ\":\"JWT\"}",
                 k->alg, k->kid);
        header = default_header;
    }
    char *h = b64url(header, strlen(header)), *p = b64url(payload, strlen(payload));
    size_t signed_len = strlen(h) + 1 + strlen(p);
    char *token = malloc(signed_len + 1024);
    sprintf(token, "%s.%s", h, p);
    gnutls_datum_t sig = {0};
    if (gnutls_privkey_sign_data2(k->priv, k->sign, 0, &(gnutls_datum_t){(unsigned char *)token, (unsigned)signed_len},
                                  &sig) < 0) {
        fprintf(stderr, "cannot sign\n");
        exit(1);
    }
    char *s;
    if (strcmp(k->alg, "ES256") == 0) { /* DER -> r || s */
        gnutls_datum_t r, ss;
        gnutls_decode_rs_value(&sig, &r, &ss);
        unsigned char raw[64] = {0};
        size_t rskip = r.size > 32 ? r.size - 32 : 0, sskip = ss.size > 32 ? ss.size - 32 : 0;
        memcpy(raw + 32 - (r.size - rskip), r.data + rskip, r.size - rskip);
        memcpy(raw + 64 - (ss.size - sskip), ss.data + sskip, ss.size - sskip);
        s = b64url(raw, 64);
        gnutls_free(r.data);
        gnutls_free(ss.data);
    } else {
        s = b64url(sig.data, sig.size);
    }
    gnutls_free(sig.data);
    sprintf(token + signed_len, ".%s", s);
    free(h);
    free(p);
    free(s);
    return token;
}

/* An HS256 token whose HMAC key is `secret` (algorithm confusion). */
static char *mint_hs256(const void *secret, size_t secret_len, const char *kid, const char *payload) {
    char header[128];
    snprintf(header, sizeof header, "{\"alg\":\"HS256\",\"kid\":\"%s\"}", kid);
    char *h = b64url(header, strlen(header)), *p = b64url(payload, strlen(payload));
    char *token = malloc(strlen(h) + strlen(p) + 64);
    sprintf(token, "%s.%s", h, p);
    uint8_t mac[32];
    hmac_sha256(mac, secret, secret_len, token, strlen(token));
    char *s = b64url(mac, 32);
    strcat(strcat(token, "."), s);
    free(h);
    free(p);
    free(s);
    return token;
}

static double now_s(void) { return (double)time(NULL); }

/* Claims valid now, with `extra` members appended (",\"scope\":..."). */
static const char *claims(const char *extra) {
    static char buf[4][1024];
    static int next;
    char *b = buf[next++ & 3];
    double t = now_s();
    snprintf(b, sizeof buf[0], "{\"iss\":\"" ISSUER "\",\"aud\":\"" AUDIENCE "\",\"sub\":\"alice\",\"exp\":%.0f,"
                               "\"iat\":%.0f%s}", t + 300, t - 10, extra ? extra : "");
    return b;
}

static void write_jwks(const char *path, test_key **keys, int n) {
    json_t *list = json_array();
    for (int i = 0; i < n; i++) json_array_append_new(list, jwk_of(keys[i]));
    json_t *doc = json_pack("{s:o}", "keys", list);
    char tmp[256];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    json_dump_file(doc, tmp, 0);
    rename(tmp, path); /* the reader sees the old file or the new one */
    json_decref(doc);
}

static jwt_verifier *verifier(const char *path, double refresh, double kid_interval) {
    jwt_settings s = {.jwks = path, .issuer = ISSUER, .audience = AUDIENCE, .leeway = 60, .refresh = refresh,
                      .unknown_kid_interval = kid_interval, .fetch_timeout = 5};
    return jwt_verifier_create(&s, stderr);
}

static test_key rsa, ec, ed, other_rsa;
static char jwks_path[] = "/tmp/sdx4-jwks-XXXXXX";

static jwt_status verify(jwt_verifier *v, const char *token, jwt_claims *c) {
    return jwt_verify(v, token, now_s(), c);
}

/* ---- tests ---------------------------------------------------------------------------- */

static void test_valid(jwt_verifier *v) {
    test_key *keys[] = {&rsa, &ec, &ed};
    for (int i = 0; i < 3; i++) {
        char *t = mint(keys[i], NULL, claims(",\"scope\":\"openid upscale\""));
        jwt_claims c;
        jwt_status s = verify(v, t, &c);
        CHECK(s == JWT_OK && strcmp(c.subject, "alice") == 0 && c.scopes == AUTH_SCOPE_UPSCALE,
              "%s: %s, scopes %u", keys[i]->alg, jwt_status_text(s), c.scopes);
        free(t);
    }
    /* r or s with leading zero bytes (1 in 128 each) */
    int bad = 0;
    for (int i = 0; i < 200; i++) {
        char *t = mint(&ec, NULL, claims(NULL));
        jwt_claims c;
        bad += verify(v, t, &c) != JWT_OK;
        free(t);
    }
    CHECK(bad == 0, "%d of 200 ES256 tokens refused", bad);
    /* no kid: the keys of the alg's type are tried */
    test_key unnamed = ed;
    unnamed.kid = NULL;
    char *t = mint(&unnamed, NULL, claims(NULL));
    jwt_claims c;
    CHECK(verify(v, t, &c) == JWT_OK, "EdDSA without kid");
    free(t);
    /* aud as an array containing the audience; exp as a real number */
    double n = now_s();
    char p[512];
    snprintf(p, sizeof p, "{\"iss\":\"%s\",\"aud\":[\"other\",\"%s\"],\"sub\":\"bob\",\"exp\":%.3f}", ISSUER,
             AUDIENCE, n + 100.5);
    t = mint(&rsa, NULL, p);
    CHECK(verify(v, t, &c) == JWT_OK && strcmp(c.subject, "bob") == 0, "aud array");
    free(t);
}

static jwt_status with_times(jwt_verifier *v, const char *times) {
    char p[512];
    snprintf(p, sizeof p, "{\"iss\":\"%s\",\"aud\":\"%s\",\"sub\":\"alice\",%s}", ISSUER, AUDIENCE, times);
    char *t = mint(&ec, NULL, p);
    jwt_claims c;
    /* a fixed now, so the edges are exact */
    jwt_status s = jwt_verify(v, t, 1e9, &c);
    free(t);
    return s;
}

static void test_times(jwt_verifier *v) { /* leeway 60, now 1e9 */
    CHECK(with_times(v, "\"exp\":999999941") == JWT_OK, "exp 59 s ago is within the leeway");
    CHECK(with_times(v, "\"exp\":999999940") == JWT_EXPIRED, "exp 60 s ago");
    CHECK(with_times(v, "\"exp\":999990000") == JWT_EXPIRED, "expired");
    CHECK(with_times(v, "\"exp\":1000000100,\"nbf\":1000000060") == JWT_OK, "nbf 60 s ahead is within the leeway");
    CHECK(with_times(v, "\"exp\":1000000100,\"nbf\":1000000061") == JWT_NOT_YET_VALID, "nbf 61 s ahead");
    CHECK(with_times(v, "\"exp\":1000000100,\"iat\":1000000061") == JWT_NOT_YET_VALID, "iat in the future");
    CHECK(with_times(v, "\"nbf\":999999000") == JWT_BAD_CLAIMS, "no exp");
    CHECK(with_times(v, "\"exp\":\"1000000100\"") == JWT_BAD_CLAIMS, "exp as a string");
    CHECK(with_times(v, "\"exp\":1000000100,\"nbf\":null") == JWT_BAD_CLAIMS, "nbf null");
    CHECK(with_times(v, "\"exp\":1e308") == JWT_OK, "a far exp");
}

static jwt_status payload_status(jwt_verifier *v, const char *payload) {
    char *t = mint(&rsa, NULL, payload);
    jwt_claims c;
    jwt_status s = verify(v, t, &c);
    free(t);
    return s;
}

static void test_claims(jwt_verifier *v) {
    char p[512];
    double exp = now_s() + 300;
    snprintf(p, sizeof p, "{\"iss\":\"https://evil.example\",\"aud\":\"%s\",\"sub\":\"a\",\"exp\":%.0f}", AUDIENCE, exp);
    CHECK(payload_status(v, p) == JWT_WRONG_ISSUER, "wrong issuer");
    snprintf(p, sizeof p, "{\"iss\":\"%s/\",\"aud\":\"%s\",\"sub\":\"a\",\"exp\":%.0f}", ISSUER, AUDIENCE, exp);
    CHECK(payload_status(v, p) == JWT_WRONG_ISSUER, "issuer with a trailing slash");
    snprintf(p, sizeof p, "{\"aud\":\"%s\",\"sub\":\"a\",\"exp\":%.0f}", AUDIENCE, exp);
    CHECK(payload_status(v, p) == JWT_WRONG_ISSUER, "no issuer");
    snprintf(p, sizeof p, "{\"iss\":\"%s\",\"aud\":\"other\",\"sub\":\"a\",\"exp\":%.0f}", ISSUER, exp);
    CHECK(payload_status(v, p) == JWT_WRONG_AUDIENCE, "wrong audience");
    snprintf(p, sizeof p, "{\"iss\":\"%s\",\"aud\":[\"other\",\"sdx4\"],\"sub\":\"a\",\"exp\":%.0f}", ISSUER, exp);
    CHECK(payload_status(v, p) == JWT_WRONG_AUDIENCE, "audience array without ours");
    snprintf(p, sizeof p, "{\"iss\":\"%s\",\"sub\":\"a\",\"exp\":%.0f}", ISSUER, exp);
    CHECK(payload_status(v, p) == JWT_WRONG_AUDIENCE, "no audience");
    snprintf(p, sizeof p, "{\"iss\":\"%s\",\"aud\":\"%s\",\"exp\":%.0f}", ISSUER, AUDIENCE, exp);
    CHECK(payload_status(v, p) == JWT_NO_SUBJECT, "sub missing");
    snprintf(p, sizeof p, "{\"iss\":\"%s\",\"aud\":\"%s\",\"sub\":\"\",\"exp\":%.0f}", ISSUER, AUDIENCE, exp);
    CHECK(payload_status(v, p) == JWT_NO_SUBJECT, "sub empty");
    snprintf(p, sizeof p, "{\"iss\":\"%s\",\"aud\":\"%s\",\"sub\":42,\"exp\":%.0f}", ISSUER, AUDIENCE, exp);
    CHECK(payload_status(v, p) == JWT_NO_SUBJECT, "sub a number");
    snprintf(p, sizeof p, "{\"iss\":\"%s\",\"aud\":\"%s\",\"sub\":\"%0256d\",\"exp\":%.0f}", ISSUER, AUDIENCE, 0, exp);
    CHECK(payload_status(v, p) == JWT_NO_SUBJECT, "sub of 256 bytes");
    CHECK(payload_status(v, "[1,2]") == JWT_BAD_CLAIMS, "payload an array");
    CHECK(payload_status(v, "\"x\"") == JWT_BAD_CLAIMS, "payload a string");
    CHECK(payload_status(v, "{\"iss\":1") == JWT_BAD_CLAIMS, "payload not JSON");
    snprintf(p, sizeof p, "{\"iss\":\"%s\",\"aud\":\"%s\",\"sub\":\"a\",\"sub\":\"b\",\"exp\":%.0f}", ISSUER, AUDIENCE,
             exp);
    CHECK(payload_status(v, p) == JWT_BAD_CLAIMS, "a duplicated claim");
}

static unsigned scopes_of(jwt_verifier *v, const char *extra, jwt_status *s) {
    char *t = mint(&ed, NULL, claims(extra));
    jwt_claims c;
    *s = verify(v, t, &c);
    free(t);
    return c.scopes;
}

static void test_scopes(jwt_verifier *v) {
    jwt_status s;
    const unsigned both = AUTH_SCOPE_UPSCALE | AUTH_SCOPE_ADMIN;
    CHECK(scopes_of(v, NULL, &s) == 0 && s == JWT_OK, "no scope claim: no scope");
    CHECK(scopes_of(v, ",\"scope\":\"upscale\"", &s) == AUTH_SCOPE_UPSCALE && s == JWT_OK, "scope upscale");
    CHECK(scopes_of(v, ",\"scope\":\"  admin  openid \"", &s) == AUTH_SCOPE_ADMIN && s == JWT_OK,
          "admin alone is only admin");
    CHECK(scopes_of(v, ",\"scope\":\"upscales admi upscale-x\"", &s) == 0 && s == JWT_OK, "near misses");
    CHECK(scopes_of(v, ",\"scp\":[\"admin\",\"upscale\"]", &s) == both && s == JWT_OK, "scp array");
    CHECK(scopes_of(v, ",\"scp\":\"upscale admin\"", &s) == both && s == JWT_OK, "scp string");
    CHECK(scopes_of(v, ",\"scope\":\"admin\",\"scp\":[\"upscale\"]", &s) == both && s == JWT_OK, "both claims");
    scopes_of(v, ",\"scope\":[\"upscale\"]", &s);
    CHECK(s == JWT_BAD_CLAIMS, "scope an array");
    scopes_of(v, ",\"scp\":[\"upscale\",1]", &s);
    CHECK(s == JWT_BAD_CLAIMS, "scp with a number");
    scopes_of(v, ",\"scp\":{}", &s);
    CHECK(s == JWT_BAD_CLAIMS, "scp an object");
    /* Entra's app roles: the client-credentials flow's tokens carry them */
    CHECK(scopes_of(v, ",\"roles\":[\"upscale\"]", &s) == AUTH_SCOPE_UPSCALE && s == JWT_OK, "roles");
    CHECK(scopes_of(v, ",\"scp\":\"upscale\",\"roles\":[\"Reader\",\"admin\"]", &s) == both && s == JWT_OK,
          "scp and roles");
    scopes_of(v, ",\"roles\":[\"admin\",null]", &s);
    CHECK(s == JWT_BAD_CLAIMS, "roles with a null");
}

static void test_wrong_keys(jwt_verifier *v) {
    jwt_claims c;
    test_key impostor = other_rsa; /* another key claiming the kid of ours */
    impostor.kid = rsa.kid;
    char *t = mint(&impostor, NULL, claims(NULL));
    CHECK(verify(v, t, &c) == JWT_BAD_SIGNATURE, "signed by another key under our kid");
    free(t);
    impostor.kid = NULL;
    t = mint(&impostor, NULL, claims(NULL));
    CHECK(verify(v, t, &c) == JWT_BAD_SIGNATURE, "signed by another key, no kid");
    free(t);
    t = mint(&other_rsa, NULL, claims(NULL));
    CHECK(verify(v, t, &c) == JWT_UNKNOWN_KEY, "unknown kid");
    free(t);
    /* a signature moved from one token to another */
    char *a = mint(&rsa, NULL, claims(",\"scope\":\"upscale\"")), *b = mint(&rsa, NULL, claims(",\"scope\":\"admin\""));
    char *forged = malloc(strlen(a) + strlen(b));
    strcpy(forged, b);
    strcpy(strrchr(forged, '.'), strrchr(a, '.'));
    CHECK(verify(v, forged, &c) == JWT_BAD_SIGNATURE, "a signature from another token");
    /* a flipped signature bit */
    strcpy(forged, a);
    char *last = forged + strlen(forged) - 2;
    *last = *last == 'A' ? 'B' : 'A';
    CHECK(verify(v, forged, &c) == JWT_BAD_SIGNATURE, "a changed signature");
    free(a);
    free(b);
    free(forged);
}

static void test_algorithm_confusion(jwt_verifier *v) {
    jwt_claims c;
    char header[128];
    const char *nones[] = {"none", "None", "NONE", "nOnE"};
    for (int i = 0; i < 4; i++) {
        snprintf(header, sizeof header, "{\"alg\":\"%s\",\"kid\":\"%s\"}", nones[i], rsa.kid);
        char *h = b64url(header, strlen(header)), *p = b64url(claims(NULL), strlen(claims(NULL)));
        char token[2048];
        snprintf(token, sizeof token, "%s.%s.", h, p);
        CHECK(verify(v, token, &c) == JWT_ALG_NOT_ALLOWED, "alg %s, no signature", nones[i]);
        snprintf(token, sizeof token, "%s.%s.c2ln", h, p);
        CHECK(verify(v, token, &c) == JWT_ALG_NOT_ALLOWED, "alg %s with a signature", nones[i]);
        free(h);
        free(p);
    }
    /* HS256 keyed with the public key, as PEM and as the JWK's bytes */
    gnutls_datum_t pem = {0};
    gnutls_pubkey_export2(rsa.pub, GNUTLS_X509_FMT_PEM, &pem);
    char *t = mint_hs256(pem.data, pem.size, rsa.kid, claims(NULL));
    CHECK(verify(v, t, &c) == JWT_ALG_NOT_ALLOWED, "HS256 keyed with the RSA key's PEM");
    free(t);
    gnutls_free(pem.data);
    json_t *jwk = jwk_of(&rsa);
    char *jwk_text = json_dumps(jwk, JSON_COMPACT);
    t = mint_hs256(jwk_text, strlen(jwk_text), rsa.kid, claims(NULL));
    CHECK(verify(v, t, &c) == JWT_ALG_NOT_ALLOWED, "HS256 keyed with the JWK");
    free(t);
    free(jwk_text);
    json_decref(jwk);
    const char *others[] = {"HS384", "HS512", "RS384", "ES384", "PS256", "ES256K", "Ed25519", ""};
    for (int i = 0; i < 8; i++) {
        snprintf(header, sizeof header, "{\"alg\":\"%s\",\"kid\":\"%s\"}", others[i], rsa.kid);
        t = mint(&rsa, header, claims(NULL));
        CHECK(verify(v, t, &c) == JWT_ALG_NOT_ALLOWED, "alg \"%s\"", others[i]);
        free(t);
    }
    /* one algorithm naming a key of another type: refused before any verification */
    struct {
        test_key *signer;
        const char *alg, *kid;
    } mismatch[] = {{&ec, "ES256", "rsa-1"}, {&rsa, "RS256", "ec-1"}, {&ed, "EdDSA", "rsa-1"}, {&ec, "ES256", "ed-1"}};
    for (int i = 0; i < 4; i++) {
        snprintf(header, sizeof header, "{\"alg\":\"%s\",\"kid\":\"%s\"}", mismatch[i].alg, mismatch[i].kid);
        t = mint(mismatch[i].signer, header, claims(NULL));
        CHECK(verify(v, t, &c) == JWT_KEY_MISMATCH, "%s naming %s", mismatch[i].alg, mismatch[i].kid);
        free(t);
    }
    /* ES256 with an RSA signature's length, RS256 header on an EC signature, no kid */
    snprintf(header, sizeof header, "{\"alg\":\"RS256\"}");
    t = mint(&ec, header, claims(NULL));
    CHECK(verify(v, t, &c) == JWT_BAD_SIGNATURE, "an EC signature under RS256");
    free(t);
}

static void test_malformed(jwt_verifier *v) {
    jwt_claims c;
    char *good = mint(&rsa, NULL, claims(NULL));
    char *first = strchr(good, '.'), *second = strrchr(good, '.');
    char buf[16384];
    struct {
        const char *what;
        jwt_status expected;
    } cases[] = {
        {"two parts", JWT_MALFORMED},        {"four parts", JWT_MALFORMED},      {"padding", JWT_MALFORMED},
        {"standard alphabet", JWT_MALFORMED}, {"whitespace", JWT_MALFORMED},     {"no signature", JWT_MALFORMED},
        {"huge", JWT_MALFORMED},             {"header not JSON", JWT_MALFORMED}, {"header an array", JWT_MALFORMED},
        {"empty", JWT_MALFORMED},            {"dots only", JWT_MALFORMED},       {"crit", JWT_CRIT},
        {"kid a number", JWT_MALFORMED},     {"alg missing", JWT_MALFORMED},     {"bad payload base64", JWT_MALFORMED},
        {"length 4n+1", JWT_MALFORMED},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const char *w = cases[i].what;
        if (strcmp(w, "two parts") == 0) snprintf(buf, sizeof buf, "%.*s", (int)(second - good), good);
        else if (strcmp(w, "four parts") == 0) snprintf(buf, sizeof buf, "%s.%s", good, second + 1);
        else if (strcmp(w, "padding") == 0) snprintf(buf, sizeof buf, "%.*s==%s", (int)(first - good), good, first);
        else if (strcmp(w, "standard alphabet") == 0) snprintf(buf, sizeof buf, "%s+/", good);
        else if (strcmp(w, "whitespace") == 0) snprintf(buf, sizeof buf, "%.*s %s", (int)(first - good), good, first);
        else if (strcmp(w, "no signature") == 0) snprintf(buf, sizeof buf, "%.*s.", (int)(second - good), good);
        else if (strcmp(w, "huge") == 0) {
            memset(buf, 'A', sizeof buf - 1);
            buf[sizeof buf - 1] = '\0';
            memcpy(buf, good, strlen(good)); /* a good token followed by 8 KiB of signature */
        } else if (strcmp(w, "header not JSON") == 0) snprintf(buf, sizeof buf, "eyJhbGci%s", first);
        else if (strcmp(w, "header an array") == 0) {
            char *h = b64url("[\"RS256\"]", 9);
            snprintf(buf, sizeof buf, "%s%s", h, first);
            free(h);
        } else if (strcmp(w, "empty") == 0) buf[0] = '\0';
        else if (strcmp(w, "dots only") == 0) strcpy(buf, "..");
        else if (strcmp(w, "crit") == 0) {
            char *t = mint(&rsa, "{\"alg\":\"RS256\",\"kid\":\"rsa-1\",\"crit\":[\"exp\"],\"exp\":1}", claims(NULL));
            snprintf(buf, sizeof buf, "%s", t);
            free(t);
        } else if (strcmp(w, "kid a number") == 0) {
            char *t = mint(&rsa, "{\"alg\":\"RS256\",\"kid\":7}", claims(NULL));
            snprintf(buf, sizeof buf, "%s", t);
            free(t);
        } else if (strcmp(w, "alg missing") == 0) {
            char *t = mint(&rsa, "{\"kid\":\"rsa-1\"}", claims(NULL));
            snprintf(buf, sizeof buf, "%s", t);
            free(t);
        } else if (strcmp(w, "bad payload base64") == 0) {
            snprintf(buf, sizeof buf, "%.*s.e!J%s", (int)(first - good), good, second);
        } else if (strcmp(w, "length 4n+1") == 0) {
            snprintf(buf, sizeof buf, "%.*s.A", (int)(second - good), good); /* 1 char: no byte */
        }
        jwt_status s = verify(v, buf, &c);
        CHECK(s == cases[i].expected, "%s: %s", w, jwt_status_text(s));
    }
    /* a header object that is valid but padded with spaces stays fine */
    char *spaced = mint(&rsa, "{ \"alg\" : \"RS256\" , \"kid\" : \"rsa-1\" }", claims(NULL));
    CHECK(verify(v, spaced, &c) == JWT_OK, "a header with spaces");
    free(spaced);
    CHECK(jwt_shaped(good) && !jwt_shaped("eyJnodot") && !jwt_shaped("key-alice") && !jwt_shaped("a.b.c"),
          "jwt_shaped");
    free(good);
}

static void test_jwks(void) {
    json_t *good = jwk_of(&ed);
    char *good_text = json_dumps(good, JSON_COMPACT);
    test_key small = make_key("RS256", "small", 1024);
    json_t *small_jwk = jwk_of(&small);
    char *small_text = json_dumps(small_jwk, JSON_COMPACT);
    char doc[8192];
    FILE *devnull = fopen("/dev/null", "w");
    snprintf(doc, sizeof doc,
             "{\"keys\":[%s,%s,{\"kty\":\"oct\",\"k\":\"c2VjcmV0\"},{\"kty\":\"EC\",\"crv\":\"P-384\",\"x\":\"AA\","
             "\"y\":\"AA\"},{\"kty\":\"OKP\",\"crv\":\"X25519\",\"x\":\"AA\"},"
             "{\"kty\":\"EC\",\"crv\":\"P-256\",\"x\":\"AAAA\",\"y\":\"AAAA\"},7,"
             "{\"kty\":\"EC\",\"crv\":\"P-256\",\"x\":\"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\","
             "\"y\":\"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\"}]}",
             good_text, small_text);
    CHECK(jwt_jwks_check(doc, strlen(doc), devnull) == 1, "only the Ed25519 key of many is usable");
    char *with_use = strdup(good_text);
    char *use = strstr(with_use, "\"sig\"");
    memcpy(use, "\"enc\"", 5);
    snprintf(doc, sizeof doc, "{\"keys\":[%s]}", with_use);
    CHECK(jwt_jwks_check(doc, strlen(doc), devnull) == -1, "an encryption key used for signatures");
    json_object_set_new(good, "alg", json_string("ES256"));
    char *wrong_alg = json_dumps(good, JSON_COMPACT);
    snprintf(doc, sizeof doc, "{\"keys\":[%s]}", wrong_alg);
    CHECK(jwt_jwks_check(doc, strlen(doc), devnull) == -1, "an Ed25519 key that says ES256");
    snprintf(doc, sizeof doc, "{\"keys\":[%s]}", small_text);
    CHECK(jwt_jwks_check(doc, strlen(doc), devnull) == -1, "a 1024-bit RSA key");
    const char *junk[] = {"", "[]", "{}", "{\"keys\":{}}", "{\"keys\":[]}", "{\"keys\":[1", "null"};
    for (int i = 0; i < 7; i++) CHECK(jwt_jwks_check(junk[i], strlen(junk[i]), devnull) == -1, "JWKS \"%s\"", junk[i]);

    jwt_settings s = {.jwks = "/nonexistent/jwks.json", .issuer = ISSUER, .audience = AUDIENCE, .refresh = 300};
    CHECK(jwt_verifier_create(&s, devnull) == NULL, "a missing JWKS file");
    s.jwks = "http://idp.example/jwks";
    CHECK(jwt_verifier_create(&s, devnull) == NULL, "http:// to another host");
    s.jwks = "ftp://127.0.0.1/jwks";
    CHECK(jwt_verifier_create(&s, devnull) == NULL, "ftp://");
    s.jwks = "http://127.0.0.1:1/jwks";
    CHECK(jwt_verifier_create(&s, devnull) == NULL, "an unreachable URL refuses to start");
    s.jwks = jwks_path;
    s.audience = "";
    CHECK(jwt_verifier_create(&s, devnull) == NULL, "no audience");
    fclose(devnull);
    free(good_text);
    free(small_text);
    free(with_use);
    free(wrong_alg);
    json_decref(good);
    json_decref(small_jwk);
    free_key(&small);
}

/* Polls until `token` verifies, at most `seconds`; how long it took, or -1. */
static double accepted_within(jwt_verifier *v, const char *token, double seconds) {
    double start = mono_now();
    jwt_claims c;
    while (mono_now() - start < seconds) {
        if (verify(v, token, &c) == JWT_OK) return mono_now() - start;
        usleep(20000);
    }
    return -1;
}

static void test_reload(void) {
    char path[] = "/tmp/sdx4-jwks-reload-XXXXXX";
    close(mkstemp(path));
    test_key *before[] = {&rsa};
    write_jwks(path, before, 1);
    test_key rotated = make_key("ES256", "rotated", 0);
    test_key *after[] = {&rsa, &rotated};
    char *t = mint(&rotated, NULL, claims(NULL));
    jwt_claims c;

    /* asked by an unknown kid, at most once per interval (0.5 s here) */
    jwt_verifier *v = verifier(path, 300, 0.5);
    double loaded = mono_now();
    write_jwks(path, after, 2);
    CHECK(verify(v, t, &c) == JWT_UNKNOWN_KEY, "the new kid before a reload");
    usleep(250000);
    CHECK(verify(v, t, &c) == JWT_UNKNOWN_KEY, "an unknown kid reloaded sooner than the interval");
    while (mono_now() - loaded < 0.55) usleep(10000);
    CHECK(verify(v, t, &c) == JWT_UNKNOWN_KEY, "refused while the reload runs");
    double took = accepted_within(v, t, 3);
    CHECK(took >= 0, "an unknown kid did not reload the keys");
    jwt_verifier_destroy(v);

    /* periodic */
    write_jwks(path, before, 1);
    v = verifier(path, 0.5, 1000);
    CHECK(verify(v, t, &c) == JWT_UNKNOWN_KEY, "the new kid before a reload");
    write_jwks(path, after, 2);
    took = accepted_within(v, t, 3);
    CHECK(took >= 0, "the periodic reload did not happen");
    /* a broken file keeps the keys loaded before */
    FILE *f = fopen(path, "w");
    fputs("{\"keys\":", f);
    fclose(f);
    usleep(700000);
    CHECK(verify(v, t, &c) == JWT_OK, "a broken JWKS dropped the keys");
    jwt_verifier_destroy(v);
    free(t);
    free_key(&rotated);
    unlink(path);
}

static problem_kind check(auth *a, const char *address, const char *credential, unsigned required, auth_client *c) {
    char header[JWT_TOKEN_MAX + 64];
    snprintf(header, sizeof header, "Bearer %s", credential);
    double retry;
    return auth_check(a, address, header, NULL, required, mono_now(), c, &retry);
}

static void test_auth(void) {
    server_config cfg = {.api_keys = {(char *[]){"key-alice"}, 1}, .auth_failures = 2, .jwt_jwks = jwks_path,
                         .jwt_issuer = ISSUER, .jwt_audience = AUDIENCE, .jwt_leeway = 60, .jwt_jwks_refresh = 300};
    auth *a = auth_create(&cfg, stderr);
    CHECK(a && auth_enabled(a), "auth with tokens");
    if (!a) return;
    auth_client c;
    char *alice = mint(&rsa, NULL, claims(",\"scope\":\"upscale\"")), *alice2 = mint(&ed, NULL, claims(",\"scp\":[\"upscale\"]"));
    CHECK(check(a, "10.1.0.1", alice, AUTH_SCOPE_UPSCALE, &c) == PROBLEM_NONE && strncmp(c.identity, "sub:", 4) == 0 &&
              strlen(c.identity) == 36 && !c.refusal,
          "a token: identity %s", c.identity);
    char first[AUTH_IDENTITY_SIZE];
    memcpy(first, c.identity, sizeof first);
    CHECK(check(a, "10.1.0.1", alice2, AUTH_SCOPE_UPSCALE, &c) == PROBLEM_NONE && strcmp(c.identity, first) == 0,
          "another token of the same subject is the same client");
    char p[512];
    snprintf(p, sizeof p, "{\"iss\":\"%s\",\"aud\":\"%s\",\"sub\":\"bob\",\"exp\":%.0f,\"scope\":\"upscale\"}",
             ISSUER, AUDIENCE, now_s() + 60);
    char *bob = mint(&ec, NULL, p);
    CHECK(check(a, "10.1.0.1", bob, AUTH_SCOPE_UPSCALE, &c) == PROBLEM_NONE && strcmp(c.identity, first) != 0,
          "another subject is another client");
    CHECK(check(a, "10.1.0.1", "key-alice", AUTH_SCOPE_UPSCALE, &c) == PROBLEM_NONE &&
              strncmp(c.identity, "key:", 4) == 0,
          "API keys work beside tokens");
    /* a valid token without the scope: refused, named, not a failure */
    char *admin_only = mint(&rsa, NULL, claims(",\"scope\":\"admin\""));
    for (int i = 0; i < 4; i++)
        CHECK(check(a, "10.1.0.2", admin_only, AUTH_SCOPE_UPSCALE, &c) == PROBLEM_FORBIDDEN &&
                  strcmp(c.identity, first) == 0 && c.scopes == AUTH_SCOPE_ADMIN,
              "an admin-only token upscaling");
    CHECK(check(a, "10.1.0.2", admin_only, AUTH_SCOPE_ADMIN, &c) == PROBLEM_NONE, "an admin-only token, admin");
    CHECK(check(a, "10.1.0.2", alice, AUTH_SCOPE_UPSCALE, &c) == PROBLEM_NONE, "scope refusals throttled");
    /* refused tokens: 401 with the reason, and failures of the address */
    snprintf(p, sizeof p, "{\"iss\":\"%s\",\"aud\":\"%s\",\"sub\":\"a\",\"exp\":%.0f}", ISSUER, AUDIENCE, now_s() - 3600);
    char *expired = mint(&rsa, NULL, p);
    CHECK(check(a, "10.1.0.3", expired, AUTH_SCOPE_UPSCALE, &c) == PROBLEM_UNAUTHORIZED && c.refusal &&
              strcmp(c.refusal, "expired") == 0 && !c.identity[0],
          "an expired token: %s", c.refusal ? c.refusal : "no reason");
    CHECK(check(a, "10.1.0.3", "eyJhbGciOi.x.y", AUTH_SCOPE_UPSCALE, &c) == PROBLEM_UNAUTHORIZED && c.refusal &&
              strcmp(c.refusal, "malformed token") == 0,
          "a malformed token");
    CHECK(check(a, "10.1.0.3", alice, AUTH_SCOPE_UPSCALE, &c) == PROBLEM_RATE_LIMITED,
          "two refused tokens did not throttle the address");
    auth_destroy(a);

    cfg.api_keys.count = 0; /* tokens alone close the upscale scope */
    a = auth_create(&cfg, stderr);
    CHECK(a && auth_enabled(a) && check(a, "10.1.0.4", "anything", AUTH_SCOPE_UPSCALE, &c) == PROBLEM_FORBIDDEN,
          "tokens alone: the upscale scope open");
    /* the identity follows the identity secret (history, cluster) */
    uint8_t secret[32] = {1};
    auth_set_identity_secret(a, secret);
    CHECK(check(a, "10.1.0.4", alice, AUTH_SCOPE_UPSCALE, &c) == PROBLEM_NONE && strcmp(c.identity, first) != 0,
          "the identity secret not used");
    memcpy(first, c.identity, sizeof first);
    auth_destroy(a);
    a = auth_create(&cfg, stderr);
    auth_set_identity_secret(a, secret);
    CHECK(check(a, "10.1.0.4", alice2, AUTH_SCOPE_UPSCALE, &c) == PROBLEM_NONE && strcmp(c.identity, first) == 0,
          "the same secret gave another identity");
    auth_destroy(a);
    free(alice);
    free(alice2);
    free(bob);
    free(admin_only);
    free(expired);
}

int main(void) {
    rsa = make_key("RS256", "rsa-1", 2048);
    ec = make_key("ES256", "ec-1", 0);
    ed = make_key("EdDSA", "ed-1", 0);
    other_rsa = make_key("RS256", "rsa-other", 2048);
    close(mkstemp(jwks_path));
    test_key *keys[] = {&rsa, &ec, &ed};
    write_jwks(jwks_path, keys, 3);
    jwt_verifier *v = verifier(jwks_path, 300, 30);
    CHECK(v != NULL, "verifier");
    if (v) {
        test_valid(v);
        test_times(v);
        test_claims(v);
        test_scopes(v);
        test_wrong_keys(v);
        test_algorithm_confusion(v);
        test_malformed(v);
        jwt_verifier_destroy(v);
    }
    test_jwks();
    test_reload();
    test_auth();
    unlink(jwks_path);
    free_key(&rsa);
    free_key(&ec);
    free_key(&ed);
    free_key(&other_rsa);
    return test_finish("test_server_jwt");
}
