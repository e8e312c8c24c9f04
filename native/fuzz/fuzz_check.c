/*
 * libFuzzer: parse and check a patch (nnp_check: preamble, trailer, signature, header,
 * section placement, every section decoded), the input's trailer and signature repaired
 * first (fuzz_common.h) so the fuzzer works on what lies behind them.
 */
#include <sys/mman.h>

#include "fuzz_common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    int sig;
    uint8_t *buf = fz_fix_patch(data, size, &sig);
    /* the patch as a file without touching the disk: a memfd, opened by its /proc name */
    int fd = memfd_create("nnp-fuzz-patch", 0);
    if (fd < 0) abort();
    size_t off = 0;
    while (off < size) {
        ssize_t w = write(fd, buf + off, size - off);
        if (w <= 0) abort();
        off += (size_t)w;
    }
    char path[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);

    nnp_ctx *ctx = nnp_ctx_new();
    if (!ctx) abort();
    if (sig) {
        uint8_t pk[32], sk[64];
        fz_keypair(pk, sk);
        if (nnp_set_trusted_key(ctx, pk) != NNP_OK) abort();
    }
    fz_check_status(ctx, nnp_check(ctx, path, NULL));
    nnp_ctx_free(ctx);
    close(fd);
    free(buf);
    return 0;
}
