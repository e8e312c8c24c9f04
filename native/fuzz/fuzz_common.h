/*
 * Helpers shared by the libFuzzer harnesses of libnnpatch (native/fuzz/fuzz_*.c).
 *
 * Random mutations never pass a trailer hash, so a harness repairs the input the way a
 * hostile author would before handing it to the library: the patch trailer (BLAKE3 of
 * every byte before it) and, for a signed patch, the Ed25519 signature (with a fixed
 * test key, which the harness then trusts); the journal trailer likewise. The library
 * itself is built unchanged (no fuzzing-only branches), so what the fuzzer reaches is
 * what a device runs.
 *
 * Scratch files live in /dev/shm/nnp-fuzz-PID/ (removed at exit); fixed inputs are
 * found relative to the repository: $NNP_FUZZ_ROOT, else two folders above the
 * harness binary (build/native-fuzz/fuzz_x -> the checkout).
 */
#ifndef NNP_FUZZ_COMMON_H
#define NNP_FUZZ_COMMON_H

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <sodium.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "blake3.h"
#include "nnpatch.h"

#define FZ_FN static __attribute__((unused))
#define FZ_PREAMBLE 24
#define FZ_TRAILER 32
#define FZ_SIGBLOCK 96

static char fz_dir[64];

FZ_FN void fz_rm_dir_contents(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return;
    struct dirent *e;
    char p[PATH_MAX];
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
        unlink(p);
    }
    closedir(d);
}

FZ_FN void fz_cleanup(void) {
    if (!fz_dir[0]) return;
    fz_rm_dir_contents(fz_dir);
    rmdir(fz_dir);
}

/* This process's scratch folder. */
FZ_FN const char *fz_scratch(void) {
    if (!fz_dir[0]) {
        snprintf(fz_dir, sizeof fz_dir, "/dev/shm/nnp-fuzz-%ld", (long)getpid());
        if (mkdir(fz_dir, 0700) != 0 && errno != EEXIST) {
            perror(fz_dir);
            abort();
        }
        atexit(fz_cleanup);
    }
    return fz_dir;
}

/* How many entries the scratch folder holds, less those named in keep. */
FZ_FN int fz_count_others(const char *const *keep, size_t nkeep) {
    DIR *d = opendir(fz_scratch());
    int n = 0;
    struct dirent *e;
    while (d && (e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        int kept = 0;
        for (size_t i = 0; i < nkeep; i++)
            if (!strcmp(e->d_name, keep[i])) kept = 1;
        if (!kept) {
            fprintf(stderr, "fuzz: left behind in the scratch folder: %s\n", e->d_name);
            n++;
        }
    }
    if (d) closedir(d);
    return n;
}

/* A file of the repository (see above) into out. */
FZ_FN void fz_repo_path(char *out, size_t n, const char *rel) {
    const char *root = getenv("NNP_FUZZ_ROOT");
    if (root) {
        snprintf(out, n, "%s/%s", root, rel);
        return;
    }
    char exe[PATH_MAX];
    ssize_t k = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (k <= 0) abort();
    exe[k] = 0;
    for (int up = 0; up < 3; up++) { /* strip the binary's name, then two folders */
        char *slash = strrchr(exe, '/');
        if (!slash) abort();
        *slash = 0;
    }
    snprintf(out, n, "%s/%s", exe, rel);
}

FZ_FN uint8_t *fz_read(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        perror(path);
        abort();
    }
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *buf = malloc(n > 0 ? (size_t)n : 1);
    if (!buf || (n > 0 && fread(buf, 1, (size_t)n, f) != (size_t)n)) abort();
    fclose(f);
    *len = (size_t)n;
    return buf;
}

FZ_FN void fz_write(const char *path, const void *data, size_t len) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (fd < 0) {
        perror(path);
        abort();
    }
    const uint8_t *p = data;
    while (len) {
        ssize_t w = write(fd, p, len);
        if (w <= 0) abort();
        p += w;
        len -= (size_t)w;
    }
    close(fd);
}

FZ_FN uint32_t fz_le32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* The fixed signing key of the harnesses (seed 0x01..0x20) and its public half. */
FZ_FN void fz_keypair(uint8_t pk[32], uint8_t sk[64]) {
    uint8_t seed[32];
    for (int i = 0; i < 32; i++) seed[i] = (uint8_t)(i + 1);
    if (sodium_init() < 0 || crypto_sign_seed_keypair(pk, sk, seed) != 0) abort();
}

/* A copy of a patch with its trailer recomputed and, when flag bit 0 (signed) is set,
 * its signature block rewritten with the fixed key. *signed_out: whether it is signed. */
FZ_FN uint8_t *fz_fix_patch(const uint8_t *data, size_t size, int *signed_out) {
    uint8_t *buf = malloc(size ? size : 1);
    if (!buf) abort();
    memcpy(buf, data, size);
    *signed_out = 0;
    if (size < FZ_PREAMBLE + FZ_TRAILER) return buf;
    int sig = (fz_le32(buf + 12) & 1u) && size >= FZ_PREAMBLE + FZ_TRAILER + FZ_SIGBLOCK;
    size_t end = size - (sig ? FZ_SIGBLOCK : 0);
    np_blake3_hash(buf, end - FZ_TRAILER, buf + end - FZ_TRAILER);
    if (sig) {
        static const char domain[] = "nnpatch-signature-v1"; /* + its NUL: 21 bytes */
        uint8_t msg[21 + 32], pk[32], sk[64];
        memcpy(msg, domain, 21);
        memcpy(msg + 21, buf + end - FZ_TRAILER, 32);
        fz_keypair(pk, sk);
        memcpy(buf + end, pk, 32);
        crypto_sign_detached(buf + end + 32, NULL, msg, sizeof msg, sk);
        *signed_out = 1;
    }
    return buf;
}

/* A copy of a journal with its trailer recomputed. */
FZ_FN uint8_t *fz_fix_journal(const uint8_t *data, size_t size) {
    uint8_t *buf = malloc(size ? size : 1);
    if (!buf) abort();
    memcpy(buf, data, size);
    if (size >= 56) np_blake3_hash(buf, size - FZ_TRAILER, buf + size - FZ_TRAILER);
    return buf;
}

/* The library's rules hold for every input: a status from the table, and a message
 * exactly when it failed. */
FZ_FN void fz_check_status(nnp_ctx *ctx, nnp_status st) {
    const char *msg = nnp_message(ctx);
    switch (st) {
    case NNP_OK:
        if (msg[0]) {
            fprintf(stderr, "fuzz: success with a message: %s\n", msg);
            abort();
        }
        return;
    case NNP_EMISMATCH: case NNP_EUSAGE: case NNP_EFORMAT: case NNP_EINTEGRITY: case NNP_EIO:
        if (!msg[0] || strchr(msg, '\n') || nnp_error(ctx) == NNP_KIND_NONE) {
            fprintf(stderr, "fuzz: status %d with message \"%s\" and kind %d\n", (int)st, msg, (int)nnp_error(ctx));
            abort();
        }
        return;
    default:
        fprintf(stderr, "fuzz: status %d is not in the table\n", (int)st);
        abort();
    }
}

#endif
