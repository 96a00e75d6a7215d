/*
 * redis.h - the server's connections to Redis (cluster mode).
 *
 * One `redis` per process, shared by every thread: short commands borrow a
 * pooled connection for the length of one call; a thread that blocks
 * (XREADGROUP BLOCK, SUBSCRIBE) borrows one for as long as it needs and
 * gives it back. Every call is bounded in time: a connection or an answer
 * that does not come within the timeout is an error, never a hang, and a
 * Redis that is down costs a caller at most one timeout per
 * REDIS_RETRY_SECONDS (in between, calls fail at once).
 *
 * Thread-safe: every function may be called from any thread. The process
 * must ignore SIGPIPE (hiredis writes with write(2); serve.c ignores it).
 */
#ifndef SDX4_SERVER_REDIS_H
#define SDX4_SERVER_REDIS_H

#include <stdbool.h>
#include <stddef.h>

#include <hiredis/hiredis.h>

typedef struct redis redis;

/* Parses `url` and connects once: redis://[[user]:password@]host[:port][/db]
 * or unix:///path/to/socket[?db=N]. A Redis that cannot be reached now is
 * not an error (it is retried at each call); a malformed URL, or one that
 * asks for TLS (rediss://), is. `timeout` bounds each connect and answer. */
redis *redis_open(const char *url, double timeout, char *err, size_t err_size);
void redis_close(redis *r);

/* The URL without its password, for logs and health. */
const char *redis_where(const redis *r);

/* Whether the last call reached Redis (health). */
bool redis_up(const redis *r);

/* One command, printf-style as hiredis's redisCommand (%b for binary
 * strings). Returns the reply (free with freeReplyObject), or NULL with
 * `err` set when Redis could not be reached or answered with an error. */
redisReply *redis_call(redis *r, char *err, size_t err_size, const char *fmt, ...);
/* The same with an argument vector (binary-safe). */
redisReply *redis_call_argv(redis *r, char *err, size_t err_size, int argc, const char **argv,
                            const size_t *lens);

/* A connection of one's own for blocking commands, its read timeout set to
 * `block_seconds` plus the call timeout; NULL with `err` set if Redis is
 * unreachable. Give it back with redis_release (`broken` when a call on it
 * failed: it is then closed, not reused). */
redisContext *redis_borrow(redis *r, double block_seconds, char *err, size_t err_size);
void redis_release(redis *r, redisContext *c, bool broken);

#endif
