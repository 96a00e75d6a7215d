/*
 * base64.c - base64 in both directions (see base64.h).
 *
 * Decoding is one pass over the text with a 256-entry table; every byte is
 * classified (digit, padding, whitespace, invalid) so that junk is refused
 * rather than skipped, and padding may only end the text.
 */
#include "base64.h"

#include <stdint.h>
#include <stdlib.h>

static const char alphabet[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

char *base64_encode(const void *data, size_t len, size_t *out_len) {
    const uint8_t *in = data;
    size_t n = (len + 2) / 3 * 4;
    char *out = malloc(n + 1);
    if (!out) return NULL;
    char *o = out;
    size_t i = 0;
    for (; i + 3 <= len; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8 | in[i + 2];
        *o++ = alphabet[v >> 18];
        *o++ = alphabet[(v >> 12) & 63];
        *o++ = alphabet[(v >> 6) & 63];
        *o++ = alphabet[v & 63];
    }
    if (i < len) {
        uint32_t v = (uint32_t)in[i] << 16 | (i + 1 < len ? (uint32_t)in[i + 1] << 8 : 0);
        *o++ = alphabet[v >> 18];
        *o++ = alphabet[(v >> 12) & 63];
        *o++ = i + 1 < len ? alphabet[(v >> 6) & 63] : '=';
        *o++ = '=';
    }
    *o = '\0';
    if (out_len) *out_len = n;
    return out;
}

enum { INVALID = 255, SPACE = 254, PAD = 253 };

static uint8_t classify(unsigned char c) {
    if (c >= 'A' && c <= 'Z') return (uint8_t)(c - 'A');
    if (c >= 'a' && c <= 'z') return (uint8_t)(c - 'a' + 26);
    if (c >= '0' && c <= '9') return (uint8_t)(c - '0' + 52);
    if (c == '+' || c == '-') return 62;
    if (c == '/' || c == '_') return 63;
    if (c == '=') return PAD;
    if (c == ' ' || c == '\n' || c == '\r' || c == '\t') return SPACE;
    return INVALID;
}

void *base64_decode(const char *text, size_t len, size_t *out_len) {
    uint8_t *out = malloc(len / 4 * 3 + 3);
    if (!out) return NULL;
    size_t n = 0;
    uint32_t acc = 0;
    int bits = 0, digits = 0, pads = 0;
    for (size_t i = 0; i < len; i++) {
        uint8_t v = classify((unsigned char)text[i]);
        if (v == SPACE) continue;
        if (v == INVALID || (v != PAD && pads)) goto fail;
        if (v == PAD) {
            pads++;
            continue;
        }
        acc = acc << 6 | v;
        bits += 6;
        digits++;
        if (bits >= 8) {
            bits -= 8;
            out[n++] = (uint8_t)(acc >> bits);
        }
    }
    /* a lone digit in the last group carries no whole byte; padding, when
     * present, must complete the last group exactly */
    if (digits % 4 == 1 || (pads && (digits + pads) % 4 != 0) || pads > 2) goto fail;
    *out_len = n;
    return out;
fail:
    free(out);
    return NULL;
}
