/* fork_limit: the least a prefork supervisor can do to replace a worker,
 * in C, as the yardstick of respawn's crash path (make bench, "respawn gap").
 *
 *     cc -O2 -o fork_limit bench/fork_limit.c
 *     ./fork_limit --listen 127.0.0.1:PORT
 *
 * The master blocks SIGCHLD and reads it from a signalfd in an epoll loop,
 * beside one pipe per worker; on SIGCHLD it reaps with waitpid(-1, WNOHANG)
 * and forks the replacement: pipe2, fork. The child closes the master's fds
 * (one close_range above the listener, as respawn does), puts back the
 * signal mask, arms PR_SET_PDEATHSIG, writes Ready (one byte) on its pipe
 * and blocks in accept(2); each connection gets one read and a 200 answer.
 * The listener has respawn's options (SO_REUSEADDR, TCP_DEFER_ACCEPT 5 s,
 * backlog 1024). It logs the lines bench/run.py reads: `listening on ADDR`,
 * `worker PID spawned`, `worker PID ready`, the last two after a UTC
 * timestamp as respawn's log has them (`[2026-12-06T06:39:40.275123Z] `,
 * to the microsecond). Nothing else: no dispositions,
 * no title, no log formatting, no scoreboard. It is not a supervisor (no
 * backoff, no stop protocol): TERM or INT kills its workers and exits.
 *
 * --shared-table forks another way, to show what the kernel allows: a raw
 * clone(CLONE_FILES) shares the master's fd table with the child instead of
 * copying it, and the child's first call, close_range(floor, ~0,
 * CLOSE_RANGE_UNSHARE), gives it a table of its own holding only the fds
 * below the floor: no per-worker pipe is copied into it or closed in it.
 * The worker's end of its pipe is put below the floor first (dup2 to a
 * reserved number), and the master waits on an eventfd until the child has
 * unshared before it touches that number again. respawn cannot fork this
 * way (see docs/benchmarks.md: a raw clone skips glibc's fork, the
 * pthread_atfork handlers of an embedding program among it).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <sched.h>
#include <stdint.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX 4096

static int listener, sfd, ep;
/* --shared-table: the worker's end of its pipe, and the child's "unshared". */
static int shared, reserved, unshared;
static pid_t pids[MAX];
static int pipes[MAX];
static int nworkers;

/* `[2026-12-06T06:39:40.275123Z] `: when a line is written. */
static void stamp(void) {
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    struct tm tm;
    gmtime_r(&now.tv_sec, &tm);
    char day[32];
    strftime(day, sizeof day, "%Y-%m-%dT%H:%M:%S", &tm);
    fprintf(stderr, "[%s.%06ldZ] ", day, now.tv_nsec / 1000);
}

static void die(const char *what) {
    fprintf(stderr, "fork_limit: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void serve(void) {
    static const char answer[] =
        "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n";
    char buf[4096];
    for (;;) {
        int conn = accept(listener, NULL, NULL);
        if (conn < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            _exit(2);
        }
        if (read(conn, buf, sizeof buf) > 0 && write(conn, answer, sizeof answer - 1) < 0) {
            /* the client went away */
        }
        close(conn);
    }
}

static void spawn(int slot) {
    int p[2];
    if (pipe2(p, O_CLOEXEC) < 0)
        die("pipe2");
    pid_t master = getpid();
    if (shared && dup2(p[1], reserved) < 0)
        die("dup2");
    pid_t pid = shared ? (pid_t)syscall(SYS_clone, CLONE_FILES | SIGCHLD, 0, 0, 0, 0) : fork();
    if (pid < 0)
        die("fork");
    if (pid == 0) {
        int w;
        if (shared) {
            w = reserved;
            syscall(SYS_close_range, unshared + 1, ~0U, 2 /* CLOSE_RANGE_UNSHARE */);
            uint64_t one = 1;
            if (write(unshared, &one, sizeof one) != sizeof one)
                _exit(1);
            close(unshared);
        } else {
            w = dup2(p[1], listener + 1); /* just above the listener */
            syscall(SYS_close_range, listener + 2, ~0U, 0);
        }
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != master)
            _exit(1);
        if (write(w, "R", 1) != 1)
            _exit(1);
        serve();
    }
    close(p[1]);
    if (shared) {
        /* The child has its own table once it says so: only then may the
         * reserved number change. */
        uint64_t n;
        if (read(unshared, &n, sizeof n) != sizeof n)
            die("waiting for the child to unshare");
    }
    pids[slot] = pid;
    pipes[slot] = p[0];
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = slot + 1};
    epoll_ctl(ep, EPOLL_CTL_ADD, p[0], &ev);
    stamp();
    fprintf(stderr, "worker %d spawned\n", pid);
}

static void stop(void) {
    for (int i = 0; i < nworkers; i++)
        if (pids[i] > 0)
            kill(pids[i], SIGKILL);
    while (wait(NULL) > 0) {
    }
    exit(0);
}

int main(int argc, char **argv) {
    const char *addr = "127.0.0.1:0";
    nworkers = 1;
    /* Whatever a launcher left open (perf's own fds): the listener is 3. */
    syscall(SYS_close_range, 3, ~0U, 0);
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--shared-table"))
            shared = 1;
        else if (i + 1 < argc && !strcmp(argv[i], "--listen"))
            addr = argv[++i];
        else if (i + 1 < argc && !strcmp(argv[i], "--workers"))
            nworkers = atoi(argv[++i]);
    }
    if (nworkers < 1 || nworkers > MAX) {
        fprintf(stderr, "fork_limit: 1 to %d workers\n", MAX);
        return 2;
    }
    setvbuf(stderr, NULL, _IOLBF, 0);
    char host[64];
    const char *colon = strrchr(addr, ':');
    if (!colon || (size_t)(colon - addr) >= sizeof host)
        return 2;
    memcpy(host, addr, colon - addr);
    host[colon - addr] = 0;
    struct sockaddr_in sin = {.sin_family = AF_INET, .sin_port = htons(atoi(colon + 1))};
    inet_pton(AF_INET, host, &sin.sin_addr);
    listener = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1, defer = 5;
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(listener, IPPROTO_TCP, TCP_DEFER_ACCEPT, &defer, sizeof defer);
    if (bind(listener, (struct sockaddr *)&sin, sizeof sin) < 0 || listen(listener, 1024) < 0)
        die("listening");
    socklen_t len = sizeof sin;
    getsockname(listener, (struct sockaddr *)&sin, &len);
    char shown[INET_ADDRSTRLEN];
    inet_ntop(AF_INET, &sin.sin_addr, shown, sizeof shown);
    fprintf(stderr, "listening on %s:%d\n", shown, ntohs(sin.sin_port));
    if (shared) {
        /* Below the floor: the reserved number, then the eventfd. */
        reserved = dup(listener);
        unshared = eventfd(0, EFD_CLOEXEC);
        if (reserved != listener + 1 || unshared != listener + 2)
            die("reserving the fds below the floor");
    }

    sigset_t taken;
    sigemptyset(&taken);
    sigaddset(&taken, SIGCHLD);
    sigaddset(&taken, SIGTERM);
    sigaddset(&taken, SIGINT);
    sigprocmask(SIG_BLOCK, &taken, NULL);
    sfd = signalfd(-1, &taken, SFD_NONBLOCK | SFD_CLOEXEC);
    ep = epoll_create1(EPOLL_CLOEXEC);
    if (sfd < 0 || ep < 0)
        die("signalfd/epoll");
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = 0};
    epoll_ctl(ep, EPOLL_CTL_ADD, sfd, &ev);
    for (int i = 0; i < nworkers; i++)
        spawn(i);

    struct epoll_event events[64];
    for (;;) {
        int n = epoll_wait(ep, events, 64, -1);
        for (int e = 0; e < n; e++) {
            unsigned token = events[e].data.u32;
            if (token == 0) {
                struct signalfd_siginfo si;
                while (read(sfd, &si, sizeof si) == sizeof si) {
                    if (si.ssi_signo != SIGCHLD)
                        stop();
                    pid_t dead;
                    while ((dead = waitpid(-1, NULL, WNOHANG)) > 0) {
                        for (int i = 0; i < nworkers; i++) {
                            if (pids[i] == dead) {
                                epoll_ctl(ep, EPOLL_CTL_DEL, pipes[i], NULL);
                                close(pipes[i]);
                                spawn(i);
                            }
                        }
                    }
                }
            } else {
                int slot = token - 1;
                char c;
                if (read(pipes[slot], &c, 1) == 1) {
                    stamp();
                    fprintf(stderr, "worker %d ready\n", pids[slot]);
                } else {
                    epoll_ctl(ep, EPOLL_CTL_DEL, pipes[slot], NULL);
                }
            }
        }
    }
}
