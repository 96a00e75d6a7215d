/*
 * test_redis_server.h - a real redis-server for a ctest program: started
 * in a temporary folder on a unix socket (no TCP port to collide with),
 * stopped with SIGTERM. Returns -1 (the caller skips with 77) when
 * redis-server is not installed. Started means answering PING: the
 * socket appears before the server serves, and a first call that fails
 * sends redis.c into its retry pause (a CI failure on a loaded machine).
 */
#ifndef SDX4_TEST_REDIS_SERVER_H
#define SDX4_TEST_REDIS_SERVER_H

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <hiredis/hiredis.h>

typedef struct {
    pid_t pid;
    char dir[64], socket[128], url[160];
} test_redis;

static inline int test_redis_answers(const char *socket) {
    redisContext *c = redisConnectUnixWithTimeout(socket, (struct timeval){0, 200000});
    redisReply *reply = c && !c->err ? redisCommand(c, "PING") : NULL;
    int ok = reply && reply->type == REDIS_REPLY_STATUS && strcmp(reply->str, "PONG") == 0;
    freeReplyObject(reply);
    redisFree(c);
    return ok;
}

static inline int test_redis_start(test_redis *r) {
    if (!r->dir[0]) {
        snprintf(r->dir, sizeof r->dir, "/tmp/sdx4-redis-XXXXXX");
        if (!mkdtemp(r->dir)) return -1;
    }
    snprintf(r->socket, sizeof r->socket, "%s/redis.sock", r->dir);
    snprintf(r->url, sizeof r->url, "unix://%s", r->socket);
    unlink(r->socket);
    r->pid = fork();
    if (r->pid < 0) return -1;
    if (r->pid == 0) {
        int null = open("/dev/null", 1);
        if (null >= 0) dup2(null, 1);
        execlp("redis-server", "redis-server", "--port", "0", "--unixsocket", r->socket, "--dir", r->dir,
               "--save", "", "--appendonly", "yes", (char *)NULL);
        _exit(127);
    }
    for (int i = 0; i < 1000; i++) { /* up to 10 s */
        struct stat st;
        if (stat(r->socket, &st) == 0 && test_redis_answers(r->socket)) return 0;
        int status;
        if (waitpid(r->pid, &status, WNOHANG) == r->pid) return -1;
        nanosleep(&(struct timespec){0, 10000000}, NULL);
    }
    return -1;
}

static inline void test_redis_stop(test_redis *r) {
    if (r->pid <= 0) return;
    kill(r->pid, SIGTERM);
    waitpid(r->pid, NULL, 0);
    r->pid = 0;
}

/* Stops the server and removes its folder. */
static inline void test_redis_remove(test_redis *r) {
    test_redis_stop(r);
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", r->dir);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", r->dir);
}

#endif
