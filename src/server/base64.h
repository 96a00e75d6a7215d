/*
 * base64.h - RFC 4648 base64, for images inside JSON bodies and answers.
 */
#ifndef SDX4_SERVER_BASE64_H
#define SDX4_SERVER_BASE64_H

#include <stddef.h>

/* Standard alphabet with padding; malloc'd and NUL-terminated. */
char *base64_encode(const void *data, size_t len, size_t *out_len);

/* Accepts the standard and URL-safe alphabets, with or without padding,
 * and ignores ASCII whitespace (line-wrapped output of base64(1)).
 * Returns a malloc'd buffer, or NULL if the text is not base64. */
void *base64_decode(const char *text, size_t len, size_t *out_len);

#endif
