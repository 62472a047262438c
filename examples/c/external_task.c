/*
 * Post one JSON task to an mqexecutor pool and print its JSON reply.
 *
 *   make -C examples/c            (or: gcc -O2 -Wall -o external_task external_task.c)
 *   ./examples/c/external_task 0x2b2b0001 math:hypot '[3, 4]'
 *   {"v":1,"id":4242,"ok":true,"result":5.0,"worker":0,"pid":4250}
 *
 * The pool must allow FN: `mqexecutor serve 0x2b2b0001 --allow 'math:*'`.
 * ARGS_JSON is put into the message as is: it must be a JSON array.
 * Exit status: 0 the task returned, 1 it failed (error reply), 2 usage or
 * queue problem, 3 no reply within TIMEOUT_SECONDS (default 10).
 * See docs/external.md for the message format.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/ipc.h>
#include <sys/msg.h>
#include <sys/types.h>

#define MAX_TEXT 65536 /* larger than kernel.msgmax (8192 by default) */

struct message {
    long mtype;
    char mtext[MAX_TEXT];
};

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void pause_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* "module:qualname": letters, digits, '_', '.', one ':' -- nothing to escape. */
static int valid_fn(const char *fn)
{
    int colons = 0;
    for (const char *p = fn; *p; p++) {
        if (*p == ':')
            colons++;
        else if (!(*p == '_' || *p == '.' || (*p >= '0' && *p <= '9') ||
                   (*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z')))
            return 0;
    }
    return colons == 1 && strlen(fn) < 512;
}

int main(int argc, char **argv)
{
    static struct message msg;
    if (argc < 3) {
        fprintf(stderr, "usage: %s KEY FN [ARGS_JSON] [TIMEOUT_SECONDS]\n", argv[0]);
        return 2;
    }
    /* Keys are decimal or 0x hex, as ipcs prints them. */
    key_t key = (key_t)(unsigned int)strtoul(argv[1], NULL, 0);
    const char *fn = argv[2];
    const char *args = argc > 3 ? argv[3] : "[]";
    double timeout = argc > 4 ? atof(argv[4]) : 10.0;
    if (!valid_fn(fn)) {
        fprintf(stderr, "external_task: FN must be module:qualname\n");
        return 2;
    }

    /* The pool's queue must exist: flags 0, never IPC_CREAT. */
    int tasks = msgget(key, 0);
    if (tasks < 0) {
        fprintf(stderr, "external_task: no queue has key 0x%08x: %s\n",
                (unsigned int)key, strerror(errno));
        return 2;
    }

    /* Our reply queue: a fresh random key (IPC_EXCL), mode 0600. Not
     * IPC_PRIVATE: the worker opens the reply queue by its key. */
    srand((unsigned int)(time(NULL) ^ (getpid() << 16)));
    key_t reply_key = 0;
    int replies = -1;
    for (int i = 0; i < 64 && replies < 0; i++) {
        reply_key = (key_t)(0x10000 + rand() % 0x7FFEFFFF);
        replies = msgget(reply_key, IPC_CREAT | IPC_EXCL | 0600);
        if (replies < 0 && errno != EEXIST) {
            perror("external_task: msgget");
            return 2;
        }
    }
    if (replies < 0) {
        fprintf(stderr, "external_task: no free key for a reply queue\n");
        return 2;
    }

    int status = 0;
    int n = snprintf(msg.mtext, sizeof msg.mtext,
                     "{\"v\":1,\"id\":%d,\"fn\":\"%s\",\"args\":%s,"
                     "\"reply\":{\"key\":%d,\"mtype\":1}}",
                     (int)getpid(), fn, args, (int)reply_key);
    if (n < 0 || (size_t)n >= sizeof msg.mtext) {
        fprintf(stderr, "external_task: task too long\n");
        status = 2;
        goto out;
    }
    msg.mtype = 1; /* any type > 0 for a preemptive pool; worker id + 1 when targeted */
    double deadline = now() + timeout;
    /* Send the text without its NUL. IPC_NOWAIT + retry: never block for good
     * on a full queue. */
    while (msgsnd(tasks, &msg, (size_t)n, IPC_NOWAIT) < 0) {
        if (errno != EAGAIN && errno != EINTR) {
            perror("external_task: msgsnd");
            status = 2;
            goto out;
        }
        if (now() > deadline) {
            fprintf(stderr, "external_task: the pool's queue stayed full\n");
            status = 3;
            goto out;
        }
        pause_ms(10);
    }

    /* Wait for the reply, at most `timeout` seconds. */
    ssize_t got;
    while ((got = msgrcv(replies, &msg, sizeof msg.mtext - 1, 0, IPC_NOWAIT)) < 0) {
        if (errno != ENOMSG && errno != EINTR) {
            perror("external_task: msgrcv");
            status = 2;
            goto out;
        }
        if (now() > deadline) {
            fprintf(stderr, "external_task: no reply within %.1f s\n", timeout);
            status = 3;
            goto out;
        }
        pause_ms(10);
    }
    msg.mtext[got] = '\0';
    printf("%s\n", msg.mtext);
    /* A real program would use a JSON parser (cJSON, jansson); the reply is
     * compact JSON written by Python, so "ok":true appears exactly so. */
    status = strstr(msg.mtext, "\"ok\":true") ? 0 : 1;

out:
    msgctl(replies, IPC_RMID, NULL);
    return status;
}
