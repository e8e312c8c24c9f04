/*
 * nnpatch-apply: the command-line front end of libnnpatch.
 *
 *   nnpatch-apply OLD PATCH [PATCH...] -o NEW [--verify default|full|touched] [--key PUB.pem] [--quiet]
 *   nnpatch-apply --in-place MODEL PATCH [PATCH...] [--key PUB.pem]
 *   nnpatch-apply --recover MODEL
 *   nnpatch-apply --check PATCH [--base OLD] [--key PUB.pem]
 *   nnpatch-apply --version
 *
 * `-` as PATCH reads standard input. Errors: one line "Error: <message>" on stderr; the
 * exit status is the library's status (0, 1, 2, 3, 4, 5, 130).
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "command.h"
#include "fileio.h"
#include "nnpatch.h"

static nnp_ctx *g_ctx; /* for the signal handler only */
static volatile sig_atomic_t g_signalled;

static void on_signal(int sig)
{
    g_signalled = sig;
    if (g_ctx)
        nnp_cancel(g_ctx);
}

static const char USAGE[] =
    "usage: nnpatch-apply OLD PATCH [PATCH...] -o NEW [--verify default|full|touched] [--key PUB.pem] [--quiet]\n"
    "       nnpatch-apply --in-place MODEL PATCH [PATCH...] [--key PUB.pem]\n"
    "       nnpatch-apply --recover MODEL\n"
    "       nnpatch-apply --check PATCH [--base OLD] [--key PUB.pem]\n"
    "       nnpatch-apply --version\n"
    "PATCH '-' reads standard input. Exit codes: 0 ok, 1 mismatch (--check), 2 usage, 3 invalid input,\n"
    "4 wrong base or integrity, 5 I/O error, 130 interrupted (143: SIGTERM).\n";

static int fail(int code, const char *fmt, const char *arg)
{
    fputs("Error: ", stderr);
    fprintf(stderr, fmt, arg);
    fputc('\n', stderr);
    return code;
}

static int report(nnp_ctx *ctx, nnp_status st)
{
    if (st == NNP_OK)
        return 0;
    if (st == NNP_ECANCELLED && g_signalled == SIGTERM) /* as `nnpatch`: 128 + SIGTERM, its own words */
        return fail(143, "%s", "terminated (SIGTERM)");
    const char *m = nnp_message(ctx);
    fprintf(stderr, "Error: %s\n", *m ? m : "failed");
    return (int)st;
}

static long long read_fd(void *user, uint8_t *buf, size_t len)
{
    int fd = *(int *)user;
    for (;;) {
        ssize_t r = read(fd, buf, len);
        if (r < 0 && errno == EINTR) {
            if (g_signalled)
                return -1; /* the library sees the cancel flag and stops (130) */
            continue;
        }
        return r;
    }
}

typedef struct prog {
    int last;
} prog;

static int on_progress(void *user, uint64_t done, uint64_t total)
{
    prog *p = user;
    int pct = total ? (int)(done * 100 / total) : 100;
    if (pct != p->last) {
        p->last = pct;
        fprintf(stderr, "\rnnpatch-apply: %3d%%  %llu / %llu MB", pct, (unsigned long long)(done >> 20),
                (unsigned long long)(total >> 20));
    }
    return 0;
}

/* Spool standard input to a file in dir (for --check and --in-place, which take paths). */
static int spool_stdin(const char *dir, char *out, size_t outlen)
{
    snprintf(out, outlen, "%s/.nnpatch-stdin.XXXXXX", dir);
    int fd = mkstemp(out);
    if (fd < 0)
        return -1;
    char buf[1 << 16];
    for (;;) {
        ssize_t r = read(0, buf, sizeof buf);
        if (r < 0 && errno == EINTR && !g_signalled)
            continue;
        if (r < 0 || g_signalled) { /* an error, or interrupted (SIGINT/SIGTERM): stop, remove the spool */
            close(fd);
            unlink(out);
            return -1;
        }
        if (r == 0)
            break;
        if (np_write_all(fd, buf, (size_t)r)) {
            close(fd);
            unlink(out);
            return -1;
        }
    }
    close(fd);
    return 0;
}

enum mode { APPLY, INPLACE, RECOVER, CHECK, VERSION };

/* The command line, parsed. pos points into argv; the array itself is main's to free. */
typedef struct args {
    enum mode mode;
    int quiet;
    const char *out, *verify, *key, *base;
    const char **pos;
    int npos;
} args;

/* -1 to go on, else the exit status (0 after --help, 2 for a bad command line). */
static int parse_args(int argc, char **argv, args *A)
{
    int mode_set = 0, dashdash = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *val = NULL;
#define TAKE(opt)                                                                                  \
    do {                                                                                           \
        size_t L = strlen(opt);                                                                    \
        if (a[L] == '=')                                                                           \
            val = a + L + 1;                                                                       \
        else if (i + 1 < argc)                                                                     \
            val = argv[++i];                                                                       \
        else                                                                                       \
            return fail(2, "option %s needs a value", opt);                                       \
    } while (0)
#define IS(opt) (!strcmp(a, opt) || (!strncmp(a, opt "=", strlen(opt) + 1)))
        if (dashdash || a[0] != '-' || !strcmp(a, "-")) {
            A->pos[A->npos++] = a;
        } else if (!strcmp(a, "--")) {
            dashdash = 1;
        } else if (!strcmp(a, "-o") || IS("--output")) {
            if (!strcmp(a, "-o")) {
                if (i + 1 >= argc)
                    return fail(2, "option %s needs a value", "-o");
                val = argv[++i];
            } else
                TAKE("--output");
            if (A->out)
                return fail(2, "%s", "-o given twice");
            A->out = val;
        } else if (IS("--verify")) {
            TAKE("--verify");
            A->verify = val;
        } else if (IS("--key")) {
            TAKE("--key");
            A->key = val;
        } else if (IS("--base")) {
            TAKE("--base");
            A->base = val;
        } else if (!strcmp(a, "--quiet") || !strcmp(a, "-q")) {
            A->quiet = 1;
        } else if (!strcmp(a, "--in-place") || !strcmp(a, "--recover") || !strcmp(a, "--check") ||
                   !strcmp(a, "--version")) {
            enum mode m = a[2] == 'i' ? INPLACE : a[2] == 'r' ? RECOVER : a[2] == 'c' ? CHECK : VERSION;
            if (mode_set && A->mode != m)
                return fail(2, "%s", "--in-place, --recover, --check and --version exclude each other");
            A->mode = m;
            mode_set = 1;
        } else if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            fputs(USAGE, stdout);
            return 0;
        } else {
            return fail(2, "unknown option %s (see nnpatch-apply --help)", a);
        }
#undef TAKE
#undef IS
    }
    return -1;
}

/* The options that do not go together, and the verify mode's name: -1 to go on, else 2. */
/* The first bytes of `path` (a regular file): 1 = the patch magic, 2 = a safetensors header (an
 * 8-byte length, then '{'), 0 = neither or unreadable (the library then says what is wrong). */
static int sniff(const char *path)
{
    static const unsigned char magic[8] = {0x89, 'N', 'N', 'P', '\r', '\n', 0x1a, '\n'};
    unsigned char b[9];
    if (!strcmp(path, "-"))
        return 0;
    FILE *f = fopen(path, "rb");
    if (!f)
        return 0;
    size_t n = fread(b, 1, sizeof b, f);
    fclose(f);
    if (n >= 8 && !memcmp(b, magic, 8))
        return 1;
    return n == 9 && b[8] == '{' ? 2 : 0;
}

/* A patch where a model goes, or a model where a patch goes: a usage error (exit 2), as `nnpatch`
 * says it (cli/_inputs.check_order), before anything is opened for real. */
static int check_order(const args *A, const char *usage)
{
    for (int i = 0; i < A->npos; i++) {
        int model_slot = i == 0 && A->mode != CHECK, kind = sniff(A->pos[i]);
        if ((model_slot && kind == 1) || (!model_slot && kind == 2)) {
            fprintf(stderr, "Error: %s is a %s, given as %s; the order is: %s\n", A->pos[i],
                    kind == 1 ? "patch" : "model", model_slot ? (A->mode == INPLACE ? "MODEL" : "OLD") : "PATCH", usage);
            return 2;
        }
    }
    if (A->base && sniff(A->base) == 1) {
        fprintf(stderr, "Error: %s is a patch, given as --base; the order is: %s\n", A->base, usage);
        return 2;
    }
    return -1;
}

static int check_args(const args *A, nnp_verify *verify)
{
    int dashes = 0;
    for (int i = 0; i < A->npos; i++)
        dashes += !strcmp(A->pos[i], "-");
    if (dashes > 1)
        return fail(2, "%s", "standard input ('-') can be read once: give '-' as one PATCH only");
    if (A->mode != APPLY && A->out)
        return fail(2, "%s", "-o is for applying to a new file");
    if (A->mode != APPLY && A->verify)
        return fail(2, "%s", "--verify is for applying to a new file");
    if (A->mode != CHECK && A->base)
        return fail(2, "%s", "--base is for --check");
    if (A->mode == RECOVER && A->key)
        return fail(2, "%s", "--key is not for --recover");
    if (A->verify && nnp_verify_from_name(A->verify, verify) != NNP_OK)
        return fail(2, "--verify must be one of default, full, touched, got '%s'", A->verify);
    static const char *order[] = {"nnpatch-apply OLD PATCH [PATCH...] -o NEW", "nnpatch-apply --in-place MODEL PATCH [PATCH...]",
                                  NULL, "nnpatch-apply --check PATCH [--base OLD]", NULL};
    if (order[A->mode])
        return check_order(A, order[A->mode]);
    return -1;
}

static int run_apply(nnp_ctx *ctx, const args *A)
{
    if (A->npos < 2 || !A->out)
        return fail(2, "%s", "usage: nnpatch-apply OLD PATCH [PATCH...] -o NEW (see --help)");
    if (!strcmp(A->pos[0], "-"))
        return fail(2, "%s", "OLD cannot be standard input: give the base model's path");
    int rc;
    if (A->key && (rc = report(ctx, nnp_set_trusted_key_file(ctx, A->key))))
        return rc;
    size_t n = (size_t)A->npos - 1;
    const char **paths = calloc(n, sizeof *paths);
    nnp_source *srcs = calloc(n, sizeof *srcs);
    static int zero = 0;
    if (!paths || !srcs) {
        free(paths);
        free(srcs);
        return fail(5, "%s", "out of memory");
    }
    for (size_t k = 0; k < n; k++) {
        if (!strcmp(A->pos[k + 1], "-"))
            srcs[k] = (nnp_source)NNP_SOURCE_INIT(read_fd, &zero, "<stdin>");
        else
            paths[k] = A->pos[k + 1];
    }
    rc = report(ctx, np_apply_mixed(ctx, A->pos[0], paths, srcs, n, A->out));
    free(paths);
    free(srcs);
    return rc;
}

/* Standard input is spooled beside the model first (the in-place update reads its patches as
 * files); the spool's name goes into tmp, for main to remove. */
static int run_in_place(nnp_ctx *ctx, const args *A, char *tmp, size_t tmplen)
{
    if (A->npos < 2)
        return fail(2, "%s", "usage: nnpatch-apply --in-place MODEL PATCH [PATCH...] (see --help)");
    int rc;
    if (A->key && (rc = report(ctx, nnp_set_trusted_key_file(ctx, A->key))))
        return rc;
    for (int i = 1; i < A->npos; i++)
        if (!strcmp(A->pos[i], "-")) {
            char *d = np_dir_of(A->pos[0]);
            int bad = !d || spool_stdin(d, tmp, tmplen);
            free(d);
            if (bad) {
                if (g_signalled)
                    return g_signalled == SIGTERM ? fail(143, "%s", "terminated (SIGTERM)")
                                                  : fail(130, "%s", "interrupted");
                return fail(5, "%s", "cannot spool standard input beside the model");
            }
            A->pos[i] = tmp;
        }
    return report(ctx, nnp_apply_in_place(ctx, A->pos[0], (const char *const *)A->pos + 1, (size_t)A->npos - 1));
}

static int run_check(nnp_ctx *ctx, const args *A)
{
    if (A->npos != 1)
        return fail(2, "%s", "usage: nnpatch-apply --check PATCH [--base OLD] [--key PUB.pem]");
    int rc;
    if (A->key && (rc = report(ctx, nnp_set_trusted_key_file(ctx, A->key))))
        return rc;
    const char *patch = A->pos[0];
    if (!strcmp(patch, "-")) {
        const char *td = getenv("TMPDIR");
        if (!td || !*td)
            td = access("/tmp", W_OK) == 0 ? "/tmp" : "."; /* Android has no /tmp */
        static int zero = 0;
        nnp_source src = NNP_SOURCE_INIT(read_fd, &zero, "<stdin>");
        rc = report(ctx, np_check_stream(ctx, &src, td, A->base));
    } else {
        rc = report(ctx, nnp_check(ctx, patch, A->base));
    }
    if (!rc && !A->quiet)
        printf("%s: OK%s\n", A->pos[0], A->base ? " (applies to the base given)" : "");
    return rc;
}

/* Everything but what main owns (the argument array, the context, the spool): every return,
 * usage errors included, leaves those to main, so none of them leaks. */
static int run(int argc, char **argv, const char **pos, char *tmp, size_t tmplen)
{
    args A = {APPLY, 0, NULL, NULL, NULL, NULL, pos, 0};
    int rc = parse_args(argc, argv, &A);
    if (rc >= 0)
        return rc;
    if (A.mode == VERSION) {
        printf("nnpatch-apply %s (format %d.%d)\n", nnp_version(), NNP_FORMAT_MAJOR, NNP_FORMAT_MINOR);
        return 0;
    }
    nnp_verify verify = NNP_VERIFY_DEFAULT;
    if ((rc = check_args(&A, &verify)) >= 0)
        return rc;
    nnp_ctx *ctx = nnp_ctx_new();
    if (!ctx)
        return fail(5, "%s", "out of memory");
    g_ctx = ctx;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    if (A.verify)
        nnp_set_verify(ctx, verify);
    prog pr = {-1};
    int show = !A.quiet && isatty(2);
    if (show)
        nnp_set_progress(ctx, on_progress, &pr);
    switch (A.mode) {
    case APPLY: rc = run_apply(ctx, &A); break;
    case INPLACE: rc = run_in_place(ctx, &A, tmp, tmplen); break;
    case RECOVER: {
        if (A.npos != 1)
            return fail(2, "%s", "usage: nnpatch-apply --recover MODEL");
        int recovered = 0;
        rc = report(ctx, nnp_recover(ctx, A.pos[0], &recovered));
        if (!rc && !A.quiet)
            printf("%s: %s\n", A.pos[0], recovered ? "rolled back to its old version" : "nothing to recover");
        break;
    }
    case CHECK: rc = run_check(ctx, &A); break;
    case VERSION: break;
    }
    if (show && pr.last >= 0)
        fputc('\n', stderr);
    return rc;
}

int main(int argc, char **argv)
{
    const char **pos = calloc((size_t)argc + 1, sizeof *pos);
    if (!pos)
        return fail(5, "%s", "out of memory");
    char tmp[4096];
    tmp[0] = 0;
    int rc = run(argc, argv, pos, tmp, sizeof tmp);
    if (tmp[0])
        unlink(tmp);
    nnp_ctx *ctx = g_ctx;
    g_ctx = NULL; /* before the free: a signal now must not reach a freed context */
    nnp_ctx_free(ctx);
    free(pos);
    return rc;
}
