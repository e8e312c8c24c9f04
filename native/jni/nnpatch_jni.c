/*
 * JNI glue for org.nnpatch: each call makes its own nnp_ctx, so calls from several Java threads
 * run in parallel. Python twin: nnpatch/delivery/updater.py (update), nnpatch/applier/api.py (apply).
 * Strings cross as real UTF-8 (String.getBytes), not JNI's modified UTF-8, so a path with
 * characters outside the BMP names the right file; a path with a NUL character is refused. A
 * failure becomes an NNPatchException carrying the status, the error class and the library's
 * message.
 *
 * Every class, method and field of org.nnpatch named here goes through java_class, method and
 * field below with the names written out, so tests/native/test_jni_update.py can check that each
 * is kept by native/jni/proguard-rules.pro (R8 would otherwise rename or drop it in an app).
 * A JNIEnv is used only on the thread it came with: the update's callbacks check they run on
 * the thread that called update before they touch Java.
 */
#include <jni.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nnpatch.h"

#define EXC_CLASS "org/nnpatch/NNPatchException"

static jclass java_class(JNIEnv *env, const char *name) { return (*env)->FindClass(env, name); }

/* A method or field of the named class; NULL with an exception pending when it is missing. */
static jmethodID method(JNIEnv *env, const char *cls_name, const char *name, const char *sig)
{
    jclass cls = java_class(env, cls_name);
    if (!cls)
        return NULL;
    jmethodID id = (*env)->GetMethodID(env, cls, name, sig);
    (*env)->DeleteLocalRef(env, cls);
    return id;
}

static jfieldID field(JNIEnv *env, const char *cls_name, const char *name, const char *sig)
{
    jclass cls = java_class(env, cls_name);
    if (!cls)
        return NULL;
    jfieldID id = (*env)->GetFieldID(env, cls, name, sig);
    (*env)->DeleteLocalRef(env, cls);
    return id;
}

/* new cls_name(...) with the constructor of signature sig; NULL with an exception pending. */
static jobject new_object(JNIEnv *env, const char *cls_name, const char *sig, ...)
{
    jclass cls = java_class(env, cls_name);
    if (!cls)
        return NULL;
    jmethodID init = (*env)->GetMethodID(env, cls, "<init>", sig);
    jobject obj = NULL;
    if (init) {
        va_list ap;
        va_start(ap, sig);
        obj = (*env)->NewObjectV(env, cls, init, ap);
        va_end(ap);
    }
    (*env)->DeleteLocalRef(env, cls);
    return obj;
}

/* new String(bytes, "UTF-8"): invalid sequences in a message become U+FFFD instead
 * of crashing the VM, as NewStringUTF would. NULL with a pending exception on failure;
 * the temporaries' local references are freed (it runs in loops and callbacks). */
static jstring utf8_string(JNIEnv *env, const char *s)
{
    size_t n = strlen(s);
    jbyteArray bytes = (*env)->NewByteArray(env, (jsize)n);
    if (!bytes)
        return NULL;
    (*env)->SetByteArrayRegion(env, bytes, 0, (jsize)n, (const jbyte *)s);
    jstring cs = (*env)->NewStringUTF(env, "UTF-8");
    jstring out = cs ? (jstring)new_object(env, "java/lang/String", "([BLjava/lang/String;)V", bytes, cs) : NULL;
    (*env)->DeleteLocalRef(env, bytes);
    if (cs)
        (*env)->DeleteLocalRef(env, cs);
    return out;
}

static void throw_nnpatch(JNIEnv *env, int status, const char *kind, const char *message)
{
    if ((*env)->ExceptionCheck(env))
        return;
    jstring jkind = utf8_string(env, kind);
    jstring jmsg = jkind ? utf8_string(env, message) : NULL;
    jobject exc = jmsg ? new_object(env, EXC_CLASS, "(ILjava/lang/String;Ljava/lang/String;)V", (jint)status, jkind,
                                    jmsg)
                       : NULL;
    if (exc)
        (*env)->Throw(env, (jthrowable)exc);
}

static void throw_class(JNIEnv *env, const char *cls_name, const char *message)
{
    if ((*env)->ExceptionCheck(env))
        return;
    jclass cls = java_class(env, cls_name);
    if (cls)
        (*env)->ThrowNew(env, cls, message);
}

static void throw_oom(JNIEnv *env) { throw_class(env, "java/lang/OutOfMemoryError", "nnpatch: out of native memory"); }

static void throw_usage(JNIEnv *env, const char *what, const char *problem)
{
    char msg[160];
    snprintf(msg, sizeof msg, "%s %s", what, problem);
    throw_nnpatch(env, NNP_EUSAGE, "UsageError", msg);
}

/* A Java string as a malloc'd NUL-terminated UTF-8 string; NULL with an exception
 * thrown (null where one is required, a NUL inside, out of memory). */
static char *utf8_of(JNIEnv *env, jstring s, const char *what)
{
    if (!s) {
        throw_usage(env, what, "must not be null");
        return NULL;
    }
    jmethodID get = method(env, "java/lang/String", "getBytes", "(Ljava/lang/String;)[B");
    jstring cs = get ? (*env)->NewStringUTF(env, "UTF-8") : NULL;
    if (!cs)
        return NULL;
    jbyteArray bytes = (jbyteArray)(*env)->CallObjectMethod(env, s, get, cs);
    (*env)->DeleteLocalRef(env, cs);
    if (!bytes || (*env)->ExceptionCheck(env))
        return NULL;
    jsize n = (*env)->GetArrayLength(env, bytes);
    char *out = malloc((size_t)n + 1);
    if (out)
        (*env)->GetByteArrayRegion(env, bytes, 0, n, (jbyte *)out);
    (*env)->DeleteLocalRef(env, bytes);
    if (!out) {
        throw_oom(env);
        return NULL;
    }
    out[n] = 0;
    if (memchr(out, 0, (size_t)n)) {
        free(out);
        throw_usage(env, what, "contains a NUL character");
        return NULL;
    }
    return out;
}

static void free_list(char **list, jsize n)
{
    if (!list)
        return;
    for (jsize i = 0; i < n; i++)
        free(list[i]);
    free(list);
}

/* String[] as n malloc'd UTF-8 strings; NULL with an exception thrown. */
static char **utf8_list(JNIEnv *env, jobjectArray arr, jsize *n)
{
    *n = 0;
    if (!arr) {
        throw_usage(env, "patches", "must not be null");
        return NULL;
    }
    jsize len = (*env)->GetArrayLength(env, arr);
    if (len == 0) {
        throw_usage(env, "at least one patch", "is needed");
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
        if (s)
            (*env)->DeleteLocalRef(env, s);
        if (!list[i]) {
            free_list(list, i);
            return NULL;
        }
    }
    *n = len;
    return list;
}

static void throw_ctx(JNIEnv *env, nnp_ctx *ctx, nnp_status st)
{
    throw_nnpatch(env, (int)st, nnp_error_name(nnp_error(ctx)), nnp_message(ctx));
}

/* The trusted key: raw (32 bytes) or PEM text (key_bytes), or a PEM file (key_path); none of
 * them: unsigned patches and feeds are accepted. NNP_OK, or a status with ctx's message. */
static nnp_status set_key(JNIEnv *env, nnp_ctx *ctx, jbyteArray key_bytes, const char *key_path)
{
    if (key_bytes) {
        jsize n = (*env)->GetArrayLength(env, key_bytes);
        jbyte *b = malloc(n ? (size_t)n : 1);
        if (!b) {
            throw_oom(env); /* pending: the caller's NNPatchException then stays unthrown */
            return NNP_EIO;
        }
        (*env)->GetByteArrayRegion(env, key_bytes, 0, n, b);
        nnp_status st = n == 32 ? nnp_set_trusted_key(ctx, (const uint8_t *)b)
                                : nnp_set_trusted_key_pem(ctx, (const char *)b, (size_t)n);
        free(b);
        return st;
    }
    return key_path ? nnp_set_trusted_key_file(ctx, key_path) : NNP_OK;
}

/* PEM text (it holds a BEGIN line) or the path of a PEM file: what apply's and check's keyPem is. */
static nnp_status set_key_text_or_path(nnp_ctx *ctx, const char *key)
{
    if (!key)
        return NNP_OK;
    if (strstr(key, "-----BEGIN"))
        return nnp_set_trusted_key_pem(ctx, key, strlen(key));
    return nnp_set_trusted_key_file(ctx, key);
}

/* Set up a context (verify mode, trusted key); NULL with an exception thrown. */
static nnp_ctx *make_ctx(JNIEnv *env, const char *verify, const char *key)
{
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
    if (st == NNP_OK)
        st = set_key_text_or_path(ctx, key);
    if (st != NNP_OK) {
        throw_ctx(env, ctx, st);
        nnp_ctx_free(ctx);
        return NULL;
    }
    return ctx;
}

static void finish(JNIEnv *env, nnp_ctx *ctx, nnp_status st)
{
    if (st != NNP_OK)
        throw_ctx(env, ctx, st);
    nnp_ctx_free(ctx);
}

JNIEXPORT void JNICALL Java_org_nnpatch_NNPatch_apply(JNIEnv *env, jclass cls, jstring jold, jobjectArray jpatches,
                                                      jstring jout, jstring jverify, jstring jkey)
{
    (void)cls;
    jsize n = 0;
    char *old = NULL, *out = NULL, *verify = NULL, *key = NULL, **patches = NULL;
    nnp_ctx *ctx;
    if (!(old = utf8_of(env, jold, "oldPath")))
        goto done;
    if (!(patches = utf8_list(env, jpatches, &n)))
        goto done;
    if (!(out = utf8_of(env, jout, "outPath")))
        goto done;
    if (jverify && !(verify = utf8_of(env, jverify, "verify")))
        goto done;
    if (jkey && !(key = utf8_of(env, jkey, "keyPem")))
        goto done;
    ctx = make_ctx(env, verify, key);
    if (ctx)
        finish(env, ctx, nnp_apply(ctx, old, (const char *const *)patches, (size_t)n, out));
done:
    free(old);
    free(out);
    free(verify);
    free(key);
    free_list(patches, n);
}

JNIEXPORT void JNICALL Java_org_nnpatch_NNPatch_applyInPlace(JNIEnv *env, jclass cls, jstring jmodel,
                                                             jobjectArray jpatches, jstring jkey)
{
    (void)cls;
    jsize n = 0;
    char *model = NULL, *key = NULL, **patches = NULL;
    nnp_ctx *ctx;
    if (!(model = utf8_of(env, jmodel, "modelPath")))
        goto done;
    if (!(patches = utf8_list(env, jpatches, &n)))
        goto done;
    if (jkey && !(key = utf8_of(env, jkey, "keyPem")))
        goto done;
    ctx = make_ctx(env, NULL, key);
    if (ctx)
        finish(env, ctx, nnp_apply_in_place(ctx, model, (const char *const *)patches, (size_t)n));
done:
    free(model);
    free(key);
    free_list(patches, n);
}

JNIEXPORT jboolean JNICALL Java_org_nnpatch_NNPatch_recover(JNIEnv *env, jclass cls, jstring jmodel)
{
    (void)cls;
    int recovered = 0;
    char *model = utf8_of(env, jmodel, "modelPath");
    if (!model)
        return JNI_FALSE;
    nnp_ctx *ctx = make_ctx(env, NULL, NULL);
    if (ctx)
        finish(env, ctx, nnp_recover(ctx, model, &recovered));
    free(model);
    return recovered ? JNI_TRUE : JNI_FALSE;
}

/* check0(patch, model or null, raw or PEM key bytes or null, key file or null) */
JNIEXPORT void JNICALL Java_org_nnpatch_NNPatch_check0(JNIEnv *env, jclass cls, jstring jpatch, jstring jmodel,
                                                       jbyteArray jkey, jstring jkey_path)
{
    (void)cls;
    char *patch = NULL, *model = NULL, *key_path = NULL;
    nnp_ctx *ctx = NULL;
    if (!(patch = utf8_of(env, jpatch, "patchPath")))
        goto done;
    if (jmodel && !(model = utf8_of(env, jmodel, "modelPath")))
        goto done;
    if (jkey_path && !(key_path = utf8_of(env, jkey_path, "publicKey")))
        goto done;
    if (!(ctx = make_ctx(env, NULL, NULL)))
        goto done;
    nnp_status st = set_key(env, ctx, jkey, key_path);
    finish(env, ctx, st ? st : nnp_check(ctx, patch, model));
done:
    free(patch);
    free(model);
    free(key_path);
}

/* The BLAKE3 of a file, as 64 hex digits (what a manifest names). */
JNIEXPORT jstring JNICALL Java_org_nnpatch_NNPatch_blake3(JNIEnv *env, jclass cls, jstring jpath)
{
    (void)cls;
    char *path = utf8_of(env, jpath, "path");
    if (!path)
        return NULL;
    nnp_ctx *ctx = make_ctx(env, NULL, NULL);
    jstring out = NULL;
    if (ctx) {
        uint8_t h[32];
        nnp_status st = nnp_hash_file(ctx, path, h);
        if (st == NNP_OK) {
            char hex[65];
            for (int i = 0; i < 32; i++)
                snprintf(hex + 2 * i, 3, "%02x", h[i]);
            out = (*env)->NewStringUTF(env, hex);
        }
        finish(env, ctx, st);
    }
    free(path);
    return out;
}

JNIEXPORT jstring JNICALL Java_org_nnpatch_NNPatch_version(JNIEnv *env, jclass cls)
{
    (void)cls;
    return (*env)->NewStringUTF(env, nnp_version());
}

/* ---- update: contexts the Java side holds while it runs (Cancellation reaches them) ------------ */

JNIEXPORT jlong JNICALL Java_org_nnpatch_NNPatch_newContext(JNIEnv *env, jclass cls)
{
    (void)cls;
    nnp_ctx *ctx = nnp_ctx_new();
    if (!ctx)
        throw_oom(env);
    return (jlong)(intptr_t)ctx;
}

JNIEXPORT void JNICALL Java_org_nnpatch_NNPatch_freeContext(JNIEnv *env, jclass cls, jlong handle)
{
    (void)env, (void)cls;
    nnp_ctx_free((nnp_ctx *)(intptr_t)handle);
}

/* Any thread: nnp_cancel only sets a flag. The Java side never passes a freed context (Cancellation
 * detaches it before NNPatch frees it, both under the Cancellation's lock). */
JNIEXPORT void JNICALL Java_org_nnpatch_NNPatch_cancel0(JNIEnv *env, jclass cls, jlong handle)
{
    (void)env, (void)cls;
    nnp_cancel((nnp_ctx *)(intptr_t)handle);
}

/* ---- update: the Fetcher and the progress listener behind libnnpatch's callbacks ----------------- */

#define CALL_CLASS "org/nnpatch/UpdateCall"
#define RESULT_CLASS "org/nnpatch/UpdateResult"
#define FETCH_INTERRUPTED (-1) /* UpdateCall.fetch: the thread was interrupted */
#define SINK_PIECE 65536       /* bytes copied out of a Java array at a time */

static jlong as_jlong(uint64_t v) { return v > (uint64_t)INT64_MAX ? (jlong)INT64_MAX : (jlong)v; }

/* One update's way back into Java: used only on the thread that called update (its JNIEnv). */
typedef struct jcall {
    JNIEnv *env;
    pthread_t thread;
    jobject call; /* the org.nnpatch.UpdateCall: a parameter of update0, valid while it runs */
    jmethodID fetch, progress;
    jfieldID reason;
    nnp_ctx *ctx;
} jcall;

/* What a FetchSink's handle points at, for the length of one fetch call (FetchSink.close zeroes
 * the handle before the call returns; FetchSink checks the thread before it comes here). */
typedef struct jsink {
    nnp_sink_fn sink;
    void *sink_ctx;
    pthread_t thread;
    uint8_t piece[SINK_PIECE];
} jsink;

JNIEXPORT jboolean JNICALL Java_org_nnpatch_FetchSink_accept0(JNIEnv *env, jclass cls, jlong handle, jlong at,
                                                              jbyteArray buf, jint off, jint len)
{
    (void)cls;
    jsink *s = (jsink *)(intptr_t)handle;
    if (!s || !pthread_equal(pthread_self(), s->thread)) {
        throw_class(env, "java/lang/IllegalStateException", "a FetchSink is used on the fetching thread only");
        return JNI_FALSE;
    }
    /* copied a piece at a time (no critical section: the sink reports progress, which calls Java) */
    for (jint done = 0; done < len;) {
        jint n = len - done < SINK_PIECE ? len - done : SINK_PIECE;
        (*env)->GetByteArrayRegion(env, buf, off + done, n, (jbyte *)s->piece);
        if ((*env)->ExceptionCheck(env))
            return JNI_FALSE;
        if (s->sink(s->sink_ctx, (uint64_t)at + (uint64_t)done, s->piece, (size_t)n))
            return JNI_FALSE;
        done += n;
    }
    return JNI_TRUE;
}

/* UpdateCall.reason (the Fetcher's one-line reason) into err; left empty when there is none. */
static void copy_reason(JNIEnv *env, const jcall *c, char *err, size_t errlen)
{
    jstring why = (jstring)(*env)->GetObjectField(env, c->call, c->reason);
    if (!why)
        return;
    const char *text = (*env)->GetStringUTFChars(env, why, NULL);
    if (text) {
        snprintf(err, errlen, "%s", text);
        (*env)->ReleaseStringUTFChars(env, why, text);
    } else {
        (*env)->ExceptionClear(env);
    }
    (*env)->DeleteLocalRef(env, why);
}

/* nnp_fetch_fn: UpdateCall.fetch, which calls the app's Fetcher and catches what it throws. */
static int jni_fetch(void *user, const char *url, uint64_t offset, uint64_t limit, nnp_sink_fn sink, void *sink_ctx,
                     char *err, size_t errlen)
{
    jcall *c = user;
    if (!pthread_equal(pthread_self(), c->thread)) {
        snprintf(err, errlen, "%s: fetch called on another thread than update's", url);
        return NNP_FETCH_FAIL;
    }
    JNIEnv *env = c->env;
    jsink *s = malloc(sizeof *s);
    jstring jurl = s ? utf8_string(env, url) : NULL;
    if (!jurl) {
        (*env)->ExceptionClear(env);
        free(s);
        snprintf(err, errlen, "%s: out of memory", url);
        return NNP_FETCH_FAIL;
    }
    s->sink = sink;
    s->sink_ctx = sink_ctx;
    s->thread = pthread_self();
    jint r = (*env)->CallIntMethod(env, c->call, c->fetch, jurl, as_jlong(offset), as_jlong(limit),
                                   (jlong)(intptr_t)s);
    (*env)->DeleteLocalRef(env, jurl);
    free(s);
    if ((*env)->ExceptionCheck(env)) { /* UpdateCall.fetch catches the Fetcher's: this is the VM's own */
        (*env)->ExceptionClear(env);
        snprintf(err, errlen, "%s: the Fetcher failed with a Java error", url);
        return NNP_FETCH_FAIL;
    }
    copy_reason(env, c, err, errlen);
    if (r == FETCH_INTERRUPTED) {
        nnp_cancel(c->ctx);
        return NNP_FETCH_FAIL;
    }
    return r >= NNP_FETCH_OK && r <= NNP_FETCH_RESTART ? r : NNP_FETCH_FAIL;
}

/* nnp_progress_fn: UpdateCall.progress (the listener, then Thread.isInterrupted); non-zero cancels. */
static int jni_progress(void *user, uint64_t done, uint64_t total)
{
    jcall *c = user;
    if (!pthread_equal(pthread_self(), c->thread))
        return 0; /* the library reports from the calling thread; never touch Java from another */
    JNIEnv *env = c->env;
    jboolean stop = (*env)->CallBooleanMethod(env, c->call, c->progress, as_jlong(done), as_jlong(total));
    if ((*env)->ExceptionCheck(env)) {
        (*env)->ExceptionClear(env);
        return 1;
    }
    return stop == JNI_TRUE;
}

/* A new UpdateResult from r; NULL with an exception pending. Its own local frame: no reference
 * it makes outlives it but the result. */
static jobject result_object(JNIEnv *env, const nnp_update_result *r)
{
    if ((*env)->PushLocalFrame(env, 16) != 0)
        return NULL;
    jclass str = java_class(env, "java/lang/String");
    jobjectArray patches = str ? (*env)->NewObjectArray(env, (jsize)r->npatches, str, NULL) : NULL;
    for (size_t i = 0; patches && i < r->npatches; i++) {
        jstring p = utf8_string(env, r->patches[i]);
        if (p) {
            (*env)->SetObjectArrayElement(env, patches, (jsize)i, p);
            (*env)->DeleteLocalRef(env, p);
        }
        if (!p || (*env)->ExceptionCheck(env))
            patches = NULL;
    }
    const char *text[6] = {r->from_blake3, r->to_blake3, r->from_name, r->to_name, r->expires, r->key_id};
    jstring s[6] = {NULL};
    int ok = patches != NULL;
    for (int i = 0; ok && i < 6; i++)
        ok = (s[i] = utf8_string(env, text[i])) != NULL;
    jobject obj = NULL;
    if (ok)
        obj = new_object(env, RESULT_CLASS,
                         "(ILjava/lang/String;Ljava/lang/String;Ljava/lang/String;Ljava/lang/String;ZJ"
                         "Ljava/lang/String;ZLjava/lang/String;[Ljava/lang/String;JJJZZZZ)V",
                         (jint)r->status, s[0], s[1], s[2], s[3], (jboolean)(r->has_release != 0),
                         as_jlong(r->release), s[4], (jboolean)(r->is_signed != 0), s[5], patches,
                         as_jlong(r->patch_bytes), as_jlong(r->downloaded_bytes), as_jlong(r->resumed_bytes),
                         (jboolean)(r->in_place != 0), (jboolean)(r->recovered != 0),
                         (jboolean)(r->in_place_for_room != 0), (jboolean)(r->full != 0));
    return (*env)->PopLocalFrame(env, obj);
}

/* update0(ctx, model, manifest, key bytes or null, key file or null, inPlace 1|0|-1, dryRun, prefer,
 * retries, backoffMillis, now, fallbackFull, call): nnp_update on the Java side's context (NNPatch.update
 * made it, checked the numbers, and frees it). The UpdateResult, or null with NNPatchException thrown. */
JNIEXPORT jobject JNICALL Java_org_nnpatch_NNPatch_update0(JNIEnv *env, jclass cls, jlong handle, jstring jmodel,
                                                           jstring jmanifest, jbyteArray jkey, jstring jkey_path,
                                                           jint in_place, jboolean dry_run, jint prefer, jint retries,
                                                           jint backoff_ms, jlong now, jboolean fallback_full,
                                                           jobject call)
{
    (void)cls;
    nnp_ctx *ctx = (nnp_ctx *)(intptr_t)handle;
    char *model = NULL, *manifest = NULL, *key_path = NULL;
    jobject out = NULL;
    if (!(model = utf8_of(env, jmodel, "model")) || !(manifest = utf8_of(env, jmanifest, "manifestUrl")))
        goto done;
    if (jkey_path && !(key_path = utf8_of(env, jkey_path, "publicKey")))
        goto done;
    jcall c = {env, pthread_self(), call, NULL, NULL, NULL, ctx};
    if (!(c.fetch = method(env, CALL_CLASS, "fetch", "(Ljava/lang/String;JJJ)I")) ||
        !(c.progress = method(env, CALL_CLASS, "progress", "(JJ)Z")) ||
        !(c.reason = field(env, CALL_CLASS, "reason", "Ljava/lang/String;")))
        goto done;
    nnp_status st = set_key(env, ctx, jkey, key_path);
    if (st) {
        throw_ctx(env, ctx, st);
        goto done;
    }
    nnp_update_options o = NNP_UPDATE_OPTIONS_INIT(manifest, jni_fetch, &c);
    o.in_place = in_place;
    o.dry_run = dry_run == JNI_TRUE;
    o.prefer = (nnp_prefer)prefer;
    o.retries = (unsigned)retries;
    o.backoff_ms = (unsigned)backoff_ms;
    o.now = now;
    o.fallback_full = fallback_full == JNI_TRUE;
    nnp_update_result r = NNP_UPDATE_RESULT_INIT;
    nnp_set_progress(ctx, jni_progress, &c);
    st = nnp_update(ctx, model, &o, &r);
    nnp_set_progress(ctx, NULL, NULL);
    if (st)
        throw_ctx(env, ctx, st);
    else
        out = result_object(env, &r);
done:
    free(model);
    free(manifest);
    free(key_path);
    return out;
}
