/*
 * multipart.c - a streaming reader of multipart/form-data (see multipart.h).
 *
 * Why not libmicrohttpd's post processor: Debian's 0.9.75 carries the fix
 * of CVE-2023-27371, which refuses boundaries shorter than two characters
 * (RFC 2046 allows 1 to 70), and the processor fails a body that has
 * anything after its closing delimiter, where RFC 2046 puts an epilogue to
 * be ignored. Both are valid bodies that clients may send.
 *
 * The grammar (RFC 2046 5.1.1): a delimiter is CRLF "--" boundary; the
 * first one may open the body without its CRLF, anything before it is a
 * preamble and is ignored. A delimiter followed by "--" closes the body
 * and anything after it is the epilogue, also ignored; otherwise optional
 * spaces and CRLF follow, then the part's header lines, an empty line and
 * the part's content, which runs to the next delimiter. A part must have a
 * Content-Disposition of form-data with a name (RFC 7578 4.2); its other
 * headers are not needed (the image decoder judges files by their bytes).
 *
 * Pieces may split anything anywhere. Content is searched for the next
 * delimiter byte by byte (memchr to its first byte, CR, which cannot
 * occur again inside a delimiter, so a failed match only ever restarts at
 * the current byte); the bytes that may begin a delimiter at the end of a
 * piece are held back, and since they are a prefix of the delimiter they
 * need no copy. Part headers are the only bytes kept, up to
 * MULTIPART_MAX_HEADERS.
 */
#include "multipart.h"

#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

typedef enum {
    PREAMBLE,        /* before the first delimiter: ignored */
    AFTER_DELIMITER, /* the byte after a delimiter: "-" closes, else padding and CRLF */
    PADDING,         /* spaces before the CRLF that ends a delimiter line */
    CLOSE_DASH,      /* the second "-" of a closing delimiter */
    DELIMITER_LF,    /* the LF that ends a delimiter line */
    HEADERS,         /* a part's header lines, up to an empty line */
    CONTENT,         /* a part's content, up to the next delimiter */
    EPILOGUE,        /* after the closing delimiter: ignored */
    FAILED
} read_state;

struct multipart {
    read_state state;
    multipart_part_fn part;
    multipart_data_fn data;
    void *cls;
    char delimiter[4 + MULTIPART_MAX_BOUNDARY]; /* CRLF "--" boundary */
    size_t delimiter_len;
    size_t matched; /* bytes of the delimiter matched and held back */
    char headers[MULTIPART_MAX_HEADERS + 1];
    size_t headers_len;
    char name[MULTIPART_MAX_HEADERS + 1]; /* of the part whose headers were read */
    char error[128];
};

static int fail(multipart *m, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int fail(multipart *m, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(m->error, sizeof m->error, fmt, ap);
    va_end(ap);
    m->state = FAILED;
    return -1;
}

/* ---- header syntax (RFC 9110 5.6) ------------------------------------------------ */

static bool is_tchar(char c) {
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
           (c && strchr("!#$%&'*+-.^_`|~", c));
}

static const char *skip_ows(const char *s) {
    while (*s == ' ' || *s == '\t') s++;
    return s;
}

/* The key of a parameter `; key=value` at s; returns where its value
 * begins, or NULL when it is malformed. */
static const char *parameter_key(const char *s, const char **key, size_t *key_len) {
    s = skip_ows(s);
    if (*s++ != ';') return NULL;
    s = skip_ows(s);
    *key = s;
    while (is_tchar(*s)) s++;
    *key_len = (size_t)(s - *key);
    s = skip_ows(s);
    if (!*key_len || *s++ != '=') return NULL;
    return skip_ows(s);
}

/* A parameter's value at s (a token or a quoted string), unquoted into out
 * (at most size - 1 bytes and a NUL; out NULL: skipped). Returns the bytes
 * after it, or NULL when it is malformed or does not fit. */
static const char *parameter_value(const char *s, char *out, size_t size) {
    size_t n = 0;
    if (*s == '"') {
        for (s++; *s && *s != '"'; s++, n++) {
            if (*s == '\\' && s[1]) s++;
            if (out && n + 1 >= size) return NULL;
            if (out) out[n] = *s;
        }
        if (*s++ != '"') return NULL;
    } else {
        /* lenient: RFC 2046 lets boundaries hold "()/:=?," unquoted */
        for (; *s && *s != ';' && *s != ' ' && *s != '\t'; s++, n++) {
            if (out && n + 1 >= size) return NULL;
            if (out) out[n] = *s;
        }
        if (!n) return NULL;
    }
    if (out) out[n] = '\0';
    return skip_ows(s);
}

static bool key_is(const char *key, size_t len, const char *name) {
    return len == strlen(name) && strncasecmp(key, name, len) == 0;
}

/* The boundary of a multipart/form-data Content-Type, into out. */
static int boundary_of(const char *type, char *out, size_t size) {
    static const char media[] = "multipart/form-data";
    if (strncasecmp(type, media, sizeof media - 1) != 0) return -1;
    const char *s = skip_ows(type + sizeof media - 1);
    bool found = false;
    while (*s) {
        const char *key;
        size_t key_len;
        if (!(s = parameter_key(s, &key, &key_len))) return -1;
        bool wanted = key_is(key, key_len, "boundary");
        if (wanted && found) return -1;
        if (!(s = parameter_value(s, wanted ? out : NULL, size))) return -1;
        found |= wanted;
    }
    return found && out[0] ? 0 : -1;
}

/* The name in a form-data Content-Disposition value, into out, and
 * whether it names a file. */
static int disposition_name(const char *v, char *out, size_t size, bool *file) {
    v = skip_ows(v);
    if (strncasecmp(v, "form-data", 9) != 0) return -1;
    v = skip_ows(v + 9);
    bool named = false;
    while (*v) {
        const char *key;
        size_t key_len;
        if (!(v = parameter_key(v, &key, &key_len))) return -1;
        bool wanted = key_is(key, key_len, "name");
        if (wanted && named) return -1; /* two names: which field is it? */
        if (key_is(key, key_len, "filename") || key_is(key, key_len, "filename*")) *file = true;
        if (!(v = parameter_value(v, wanted ? out : NULL, size))) return -1;
        named |= wanted;
    }
    return named ? 0 : -1;
}

/* ---- reading ------------------------------------------------------------------------ */

multipart *multipart_new(const char *content_type, multipart_part_fn part, multipart_data_fn data,
                         void *cls, const char **why) {
    char boundary[MULTIPART_MAX_BOUNDARY + 1];
    if (!content_type || boundary_of(content_type, boundary, sizeof boundary)) {
        *why = "multipart/form-data without a usable boundary (1 to 256 characters)";
        return NULL;
    }
    multipart *m = calloc(1, sizeof *m);
    if (!m) {
        *why = NULL;
        return NULL;
    }
    m->part = part;
    m->data = data;
    m->cls = cls;
    m->delimiter_len = (size_t)snprintf(m->delimiter, sizeof m->delimiter, "\r\n--%s", boundary);
    m->state = PREAMBLE;
    m->matched = 2; /* the first delimiter may open the body without its CRLF */
    return m;
}

void multipart_free(multipart *m) { free(m); }

const char *multipart_error(const multipart *m) { return m->error; }

/* Content before a delimiter: handed on in a part, dropped in the preamble. */
static int emit(multipart *m, const char *p, size_t n) {
    if (m->state != CONTENT || !n) return 0;
    if (m->data(m->cls, p, n)) return fail(m, "the reader stopped");
    return 0;
}

/* Reads p[0..n) up to the end of the next delimiter: 1 when one ended
 * (*used bytes were read), 0 when the piece ran out first, -1 on error. */
static int scan(multipart *m, const char *p, size_t n, size_t *used) {
    size_t held = m->matched; /* bytes matched in earlier pieces, not handed on */
    size_t begin = 0;         /* where the delimiter being matched begins in p */
    size_t i = 0;
    while (i < n) {
        if (!m->matched) {
            const char *cr = memchr(p + i, '\r', n - i);
            if (!cr) {
                i = n;
                break;
            }
            i = begin = (size_t)(cr - p);
        }
        if (p[i] == m->delimiter[m->matched]) {
            i++;
            if (++m->matched < m->delimiter_len) continue;
            m->matched = 0;
            *used = i;
            return emit(m, p, held ? 0 : begin) ? -1 : 1;
        }
        /* not a delimiter: what was held back for it is content, and this
         * byte is looked at again, as the possible start of another */
        if (held && emit(m, m->delimiter, held)) return -1;
        held = 0;
        m->matched = 0;
    }
    *used = n;
    return emit(m, p, m->matched ? (held ? 0 : begin) : n);
}

/* A part's header block is complete: find its name and announce it. */
static int begin_part(multipart *m) {
    char *h = m->headers;
    h[m->headers_len] = '\0';
    if (strlen(h) != m->headers_len) return fail(m, "a part's headers contain a NUL byte");
    bool named = false, file = false;
    for (char *line = h, *end; *line; line = end + 2) {
        end = strstr(line, "\r\n"); /* the block ends with CRLF */
        *end = '\0';
        if (!*line) continue;
        char *colon = strchr(line, ':');
        if (!colon) return fail(m, "a part's header line has no colon");
        if (!key_is(line, (size_t)(colon - line), "Content-Disposition")) continue;
        if (named || disposition_name(colon + 1, m->name, sizeof m->name, &file))
            return fail(m, "a part's Content-Disposition is not form-data with one name");
        named = true;
    }
    if (!named) return fail(m, "a part has no Content-Disposition");
    m->state = CONTENT;
    m->matched = 0;
    if (m->part(m->cls, m->name, file)) return fail(m, "the reader stopped");
    return 0;
}

/* Part header lines from p[0..n), up to and including the empty line. */
static int read_headers(multipart *m, const char *p, size_t n, size_t *used) {
    const char *lf = memchr(p, '\n', n);
    size_t take = lf ? (size_t)(lf - p) + 1 : n;
    if (m->headers_len + take > MULTIPART_MAX_HEADERS)
        return fail(m, "a part's headers are over %d bytes", MULTIPART_MAX_HEADERS);
    memcpy(m->headers + m->headers_len, p, take);
    m->headers_len += take;
    *used = take;
    const char *h = m->headers;
    size_t len = m->headers_len;
    if (!lf) return 0;
    if ((len == 2 && memcmp(h, "\r\n", 2) == 0) || (len >= 4 && memcmp(h + len - 4, "\r\n\r\n", 4) == 0))
        return begin_part(m);
    return 0;
}

/* The bytes between a delimiter and the next part's headers. */
static int after_delimiter(multipart *m, char c) {
    switch (m->state) {
    case AFTER_DELIMITER:
        if (c == '-') {
            m->state = CLOSE_DASH;
            return 0;
        }
        m->state = PADDING;
        return after_delimiter(m, c);
    case PADDING:
        if (c == ' ' || c == '\t') return 0;
        if (c == '\r') {
            m->state = DELIMITER_LF;
            return 0;
        }
        return fail(m, "a boundary delimiter is followed by neither CRLF nor \"--\"");
    case CLOSE_DASH:
        if (c != '-') return fail(m, "a boundary delimiter is followed by neither CRLF nor \"--\"");
        m->state = EPILOGUE;
        return 0;
    case DELIMITER_LF:
        if (c != '\n') return fail(m, "a boundary delimiter line does not end with CRLF");
        m->state = HEADERS;
        m->headers_len = 0;
        return 0;
    default:
        return fail(m, "internal state error");
    }
}

int multipart_feed(multipart *m, const char *data, size_t len) {
    size_t i = 0;
    while (i < len) {
        size_t used = 0;
        int found;
        switch (m->state) {
        case FAILED:
            return -1;
        case EPILOGUE:
            return 0;
        case PREAMBLE:
        case CONTENT:
            if ((found = scan(m, data + i, len - i, &used)) < 0) return -1;
            if (found) m->state = AFTER_DELIMITER;
            break;
        case HEADERS:
            if (read_headers(m, data + i, len - i, &used)) return -1;
            break;
        default:
            if (after_delimiter(m, data[i])) return -1;
            used = 1;
        }
        i += used;
    }
    return m->state == FAILED ? -1 : 0;
}

int multipart_end(multipart *m) {
    if (m->state == EPILOGUE) return 0;
    if (m->state != FAILED) fail(m, "the body ends before its closing boundary");
    return -1;
}
