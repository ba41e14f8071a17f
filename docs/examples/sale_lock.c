/*
 * The vending application's side of the fleetcast sale/install protocol (docs/device.md).
 *
 * Hold a SHARED flock on the agent's sale lock for the whole of a sale, from the moment the
 * customer is committed until the product is out. The agent installs only while it holds the
 * EXCLUSIVE lock, so an install never starts during a sale and a sale never starts during an
 * install. sale_begin(path, 1) waits for a running install to end; sale_begin(path, 0) refuses
 * at once (errno EWOULDBLOCK) so the application can tell the customer. Any number of sales
 * may hold the lock at once. Closing the descriptor (or the process dying) releases it.
 *
 *     int fd = sale_begin("/var/lib/fleetcast/device/sale.lock", 0);
 *     if (fd < 0) {  // any other error (no access to the file, say): no sale either
 *         show(errno == EWOULDBLOCK ? "Updating, back in a minute" : "Out of service");
 *         return;
 *     }
 *     take_payment(); dispense();
 *     sale_end(fd);
 *
 * Build and serve one pretend customer:
 *     cc -O2 -o sale_lock sale_lock.c
 *     ./sale_lock [--no-wait] LOCKFILE [MILLISECONDS]
 * It prints "sale START_NS END_NS" (CLOCK_MONOTONIC, while the lock was held), or exits with
 * status 75 if --no-wait and an install is running.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <time.h>
#include <unistd.h>

/* Returns a descriptor holding the shared lock, or -1 with errno set (EWOULDBLOCK: an install
 * runs and wait was 0). Never delete or replace the lock file: both sides must lock the same
 * file. The agent creates it when it starts; O_CREAT covers an application that starts first. */
int sale_begin(const char *lock_path, int wait)
{
    int fd = open(lock_path, O_RDONLY | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0)
        return -1;
    int rc;
    do
        rc = flock(fd, wait ? LOCK_SH : LOCK_SH | LOCK_NB);
    while (rc < 0 && errno == EINTR);
    if (rc < 0) {
        int saved = errno;
        close(fd);
        errno = saved;
        return -1;
    }
    return fd;
}

void sale_end(int fd)
{
    close(fd); /* releases the lock */
}

static long long monotonic_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int main(int argc, char **argv)
{
    int wait = 1, i = 1;
    if (i < argc && strcmp(argv[i], "--no-wait") == 0) {
        wait = 0;
        i++;
    }
    if (i >= argc || argc - i > 2) {
        fprintf(stderr, "usage: %s [--no-wait] LOCKFILE [MILLISECONDS]\n", argv[0]);
        return 2;
    }
    long ms = argc - i == 2 ? atol(argv[i + 1]) : 1000;
    int fd = sale_begin(argv[i], wait);
    if (fd < 0 && errno == EWOULDBLOCK) {
        fprintf(stderr, "refused: the machine is installing an update\n");
        return 75;
    }
    if (fd < 0) {
        fprintf(stderr, "%s: %s\n", argv[i], strerror(errno));
        return 1;
    }
    long long start = monotonic_ns();
    struct timespec pause = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&pause, NULL);
    long long end = monotonic_ns();
    sale_end(fd);
    printf("sale %lld %lld\n", start, end);
    return 0;
}
