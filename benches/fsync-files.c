/* What the disk does for many partitions written a little at a time: THREADS threads
 * each append RECORD bytes to one of FILES files (each in its own directory, as
 * partitions are) and fdatasync it, ROUNDS times in all. PREZERO=1 first fills 256 KiB
 * of each file with zeros, so appends overwrite allocated blocks instead of growing the
 * file. Prints fdatasyncs per second; run under `/usr/bin/time -f %S` for system CPU.
 *
 *   gcc -O2 -pthread benches/fsync-files.c -o /tmp/fsync-files
 *   /tmp/fsync-files <dir on the disk> THREADS ROUNDS PREZERO   # 10,000 files, 1,034 B
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define FILES 10000
#define RECORD 1034
#define PREZERO_BYTES (256 * 1024)

static int fds[FILES];
static long positions[FILES];
static int threads, rounds;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static void *append(void *arg) {
    static char record[RECORD];
    memset(record, 'x', sizeof record);
    for (long i = (long)arg; i < rounds; i += threads) {
        int f = i % FILES;
        long at = __atomic_fetch_add(&positions[f], RECORD, __ATOMIC_RELAXED);
        if (pwrite(fds[f], record, RECORD, at) != RECORD || fdatasync(fds[f]) != 0) {
            perror("append");
            exit(1);
        }
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s DIR THREADS ROUNDS PREZERO\n", argv[0]);
        return 2;
    }
    threads = atoi(argv[2]);
    rounds = atoi(argv[3]);
    int prezero = atoi(argv[4]);
    static char zeros[PREZERO_BYTES];
    char path[4096];
    for (int i = 0; i < FILES; i++) {
        snprintf(path, sizeof path, "%s/%d", argv[1], i);
        mkdir(path, 0755);
        snprintf(path, sizeof path, "%s/%d/00000000000000000000.log", argv[1], i);
        fds[i] = open(path, O_CREAT | O_WRONLY, 0644);
        if (fds[i] < 0 || (prezero && pwrite(fds[i], zeros, sizeof zeros, 0) != sizeof zeros)) {
            perror(path);
            return 1;
        }
    }
    if (prezero) sync();
    pthread_t ids[1024];
    double started = now();
    for (long i = 0; i < threads && i < 1024; i++) pthread_create(&ids[i], NULL, append, (void *)i);
    for (int i = 0; i < threads && i < 1024; i++) pthread_join(ids[i], NULL);
    double took = now() - started;
    printf("prezero %d, %d threads: %d fdatasyncs in %.3f s = %.0f/s\n", prezero, threads, rounds,
           took, rounds / took);
    return 0;
}
