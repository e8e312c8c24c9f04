/*
 * JNI glue for org.nnpatch.NNPatch: each call makes its own nnp_ctx, so calls from
 * several Java threads run in parallel. Strings cross as real UTF-8 (String.getBytes),
 * not JNI's modified UTF-8, so a path with characters outside the BMP names the right
 * file; a path with a NUL character is refused. A failure becomes an NNPatchException
 * carrying the status, the error class and the library's message.
 */
#include <jni.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nnpatch.h"

#define EXC_CLASS "org/nnpatch/NNPatchException"

/* new String(bytes, "UTF-8"): invalid sequences in a message become U+FFFD instead
 * of crashing the VM, as NewStringUTF would. NULL with a pending exception on failure. */
static jstring utf8_string(JNIEnv *env, const char *s) {
    size_t n = strlen(s);
    jbyteArray bytes = (*env)->NewByteArray(env, (jsize)n);
    if (!bytes) return NULL;
    (*env)->SetByteArrayRegion(env, bytes, 0, (jsize)n, (const jbyte *)s);
    jclass cls = (*env)->FindClass(env, "java/lang/String");
    if (!cls) return NULL;
    jmethodID init = (*env)->GetMethodID(env, cls, "<init>", "([BLjava/lang/String;)V");
    jstring cs = (*env)->NewStringUTF(env, "UTF-8");
    if (!init || !cs) return NULL;
    return (jstring)(*env)->NewObject(env, cls, init, bytes, cs);
}

static void throw_nnpatch(JNIEnv *env, int status, const char *kind, const char *message) {
    if ((*env)->ExceptionCheck(env)) return;
    jclass cls = (*env)->FindClass(env, EXC_CLASS);
    if (!cls) return;
    jmethodID init = (*env)->GetMethodID(env, cls, "<init>", "(ILjava/lang/String;Ljava/lang/String;)V");
    if (!init) return;
    jstring jkind = utf8_string(env, kind);
    jstring jmsg = jkind ? utf8_string(env, message) : NULL;
    if (!jmsg) return;
    jobject exc = (*env)->NewObject(env, cls, init, (jint)status, jkind, jmsg);
    if (exc) (*env)->Throw(env, (jthrowable)exc);
}

static void throw_oom(JNIEnv *env) {
    if ((*env)->ExceptionCheck(env)) return;
    jclass cls = (*env)->FindClass(env, "java/lang/OutOfMemoryError");
    if (cls) (*env)->ThrowNew(env, cls, "nnpatch: out of native memory");
}

/* A Java string as a malloc'd NUL-terminated UTF-8 string; NULL with an exception
 * thrown (null where one is required, a NUL inside, out of memory). */
static char *utf8_of(JNIEnv *env, jstring s, const char *what) {
    if (!s) {
        char msg[96];
        snprintf(msg, sizeof msg, "%s must not be null", what);
        throw_nnpatch(env, NNP_EUSAGE, "UsageError", msg);
        return NULL;
    }
    jclass cls = (*env)->GetObjectClass(env, s);
    jmethodID get = cls ? (*env)->GetMethodID(env, cls, "getBytes", "(Ljava/lang/String;)[B") : NULL;
    jstring cs = get ? (*env)->NewStringUTF(env, "UTF-8") : NULL;
    if (!cs) return NULL;
    jbyteArray bytes = (jbyteArray)(*env)->CallObjectMethod(env, s, get, cs);
    if (!bytes || (*env)->ExceptionCheck(env)) return NULL;
    jsize n = (*env)->GetArrayLength(env, bytes);
    char *out = malloc((size_t)n + 1);
    if (!out) {
        throw_oom(env);
        return NULL;
    }
    (*env)->GetByteArrayRegion(env, bytes, 0, n, (jbyte *)out);
    out[n] = 0;
    (*env)->DeleteLocalRef(env, bytes);
    if (memchr(out, 0, (size_t)n)) {
        char msg[96];
        snprintf(msg, sizeof msg, "%s contains a NUL character", what);
        free(out);
        throw_nnpatch(env, NNP_EUSAGE, "UsageError", msg);
        return NULL;
    }
    return out;
}

static void free_list(char **list, jsize n) {
    if (!list) return;
    for (jsize i = 0; i < n; i++) free(list[i]);
    free(list);
}

/* String[] as n malloc'd UTF-8 strings; NULL with an exception thrown. */
static char **utf8_list(JNIEnv *env, jobjectArray arr, jsize *n) {
    *n = 0;
    if (!arr) {
        throw_nnpatch(env, NNP_EUSAGE, "UsageError", "patches must not be null");
        return NULL;
    }
    jsize len = (*env)->GetArrayLength(env, arr);
    if (len == 0) {
        throw_nnpatch(env, NNP_EUSAGE, "UsageError", "at least one patch is needed");
        return NULL;
    }
    char **list = calloc((size_t)len, sizeof *list);
    if (!list) {
        throw_oom(env);
        return NULL;
    }
    for (jsize i = 0; i < len; i++) {
        jstring s = (jstring)(*env)->GetObjectArrayElement(env, arr, i);
        list[i] = utf8_of(env, s, "a patch path");
        if (s) (*env)->DeleteLocalRef(env, s);
        if (!list[i]) {
            free_list(list, i);
            return NULL;
        }
    }
    *n = len;
    return list;
}

/* Set up a context (verify mode, trusted key); NULL with an exception thrown. */
static nnp_ctx *make_ctx(JNIEnv *env, const char *verify, const char *key) {
    nnp_ctx *ctx = nnp_ctx_new();
    if (!ctx) {
        throw_oom(env);
        return NULL;
    }
    nnp_verify mode = NNP_VERIFY_DEFAULT;
    if (verify && nnp_verify_from_name(verify, &mode) != NNP_OK) {
        nnp_ctx_free(ctx);
        throw_nnpatch(env, NNP_EUSAGE, "UsageError", "verify must be \"default\", \"full\" or \"touched\"");
        return NULL;
    }
    nnp_status st = nnp_set_verify(ctx, mode);
    if (st == NNP_OK && key) st = nnp_set_trusted_key_file(ctx, key);
    if (st != NNP_OK) {
        throw_nnpatch(env, (int)st, nnp_error_name(nnp_error(ctx)), nnp_message(ctx));
        nnp_ctx_free(ctx);
        return NULL;
    }
    return ctx;
}

static void finish(JNIEnv *env, nnp_ctx *ctx, nnp_status st) {
    if (st != NNP_OK) throw_nnpatch(env, (int)st, nnp_error_name(nnp_error(ctx)), nnp_message(ctx));
    nnp_ctx_free(ctx);
}

JNIEXPORT void JNICALL Java_org_nnpatch_NNPatch_apply(JNIEnv *env, jclass cls, jstring jold, jobjectArray jpatches,
                                                      jstring jout, jstring jverify, jstring jkey) {
    (void)cls;
    jsize n = 0;
    char *old = NULL, *out = NULL, *verify = NULL, *key = NULL, **patches = NULL;
    nnp_ctx *ctx;
    if (!(old = utf8_of(env, jold, "oldPath"))) goto done;
    if (!(patches = utf8_list(env, jpatches, &n))) goto done;
    if (!(out = utf8_of(env, jout, "outPath"))) goto done;
    if (jverify && !(verify = utf8_of(env, jverify, "verify"))) goto done;
    if (jkey && !(key = utf8_of(env, jkey, "keyPem"))) goto done;
    ctx = make_ctx(env, verify, key);
    if (ctx) finish(env, ctx, nnp_apply(ctx, old, (const char *const *)patches, (size_t)n, out));
done:
    free(old);
    free(out);
    free(verify);
    free(key);
    free_list(patches, n);
}

JNIEXPORT void JNICALL Java_org_nnpatch_NNPatch_applyInPlace(JNIEnv *env, jclass cls, jstring jmodel,
                                                             jobjectArray jpatches, jstring jkey) {
    (void)cls;
    jsize n = 0;
    char *model = NULL, *key = NULL, **patches = NULL;
    nnp_ctx *ctx;
    if (!(model = utf8_of(env, jmodel, "modelPath"))) goto done;
    if (!(patches = utf8_list(env, jpatches, &n))) goto done;
    if (jkey && !(key = utf8_of(env, jkey, "keyPem"))) goto done;
    ctx = make_ctx(env, NULL, key);
    if (ctx) finish(env, ctx, nnp_apply_in_place(ctx, model, (const char *const *)patches, (size_t)n));
done:
    free(model);
    free(key);
    free_list(patches, n);
}

JNIEXPORT jboolean JNICALL Java_org_nnpatch_NNPatch_recover(JNIEnv *env, jclass cls, jstring jmodel) {
    (void)cls;
    int recovered = 0;
    char *model = utf8_of(env, jmodel, "modelPath");
    if (!model) return JNI_FALSE;
    nnp_ctx *ctx = make_ctx(env, NULL, NULL);
    if (ctx) finish(env, ctx, nnp_recover(ctx, model, &recovered));
    free(model);
    return recovered ? JNI_TRUE : JNI_FALSE;
}

JNIEXPORT jstring JNICALL Java_org_nnpatch_NNPatch_version(JNIEnv *env, jclass cls) {
    (void)cls;
    return (*env)->NewStringUTF(env, nnp_version());
}
