package org.nnpatch;

import java.nio.charset.StandardCharsets;

/**
 * Follow a signed release feed and apply nnpatch patches on the device: the native
 * updater and applier (libnnpatch) through JNI.
 *
 * <p>Every method is static, thread-safe (each call has its own native context) and
 * blocking: call it from a worker thread, never the UI thread. A failure throws an
 * {@link NNPatchException} whose {@link NNPatchException#getStatus() status} is the
 * exit code of {@code nnpatch-update} and {@code nnpatch-apply} (1 mismatch, 2 usage,
 * 3 format, 4 integrity or refused, 5 I/O or network, 7 no patch from this version,
 * 130 cancelled) and whose message is the library's one-line message with the evidence.
 *
 * <p>A public key is PEM text (as {@code nnpatch keygen} writes it), the raw 32 bytes of the
 * Ed25519 key, or (a String without a PEM BEGIN line) the path of a PEM file.
 *
 * <p>The native library is {@code libnnpatch_jni.so} (with libnnpatch inside); it is
 * loaded by {@code System.loadLibrary("nnpatch_jni")}, so it must lie on
 * {@code java.library.path} (an Android app's jniLibs/ABI folder, or
 * {@code -Djava.library.path=build/native} on a desktop JVM).
 */
public final class NNPatch {
    static {
        System.loadLibrary("nnpatch_jni");
    }

    private NNPatch() {}

    /**
     * Apply a chain of patches to the model at {@code oldPath}, writing the result to
     * {@code outPath} (a temporary file beside it, fsync, rename: {@code outPath} never
     * holds a partial model; the old model is never modified).
     *
     * @param oldPath the base model (safetensors)
     * @param patches one or more patch files, applied in order
     * @param outPath where the new model goes
     * @param verify  "default", "full" or "touched" (spec/FORMAT.md section 9); null is "default"
     * @param keyPem  a public key every patch must be signed with: PEM text, or the path of a PEM
     *                file (as {@code nnpatch keygen} writes); null accepts unsigned patches
     */
    public static native void apply(String oldPath, String[] patches, String outPath, String verify, String keyPem)
            throws NNPatchException;

    /**
     * Update {@code modelPath} in place behind the undo journal (spec/JOURNAL.md): after a
     * crash, {@link #recover} (or the next applyInPlace) restores the old model exactly.
     * Needs free disk for the journal: the old bytes of what the patches change.
     */
    public static native void applyInPlace(String modelPath, String[] patches, String keyPem)
            throws NNPatchException;

    /**
     * Roll {@code modelPath} back from a journal left by an interrupted {@link #applyInPlace}.
     *
     * @return true when a journal was rolled back, false when there was none
     */
    public static native boolean recover(String modelPath) throws NNPatchException;

    /** The native library's version (for example "0.5.0"). */
    public static native String version();

    /** The BLAKE3 of a file as 64 hex digits: what a manifest's digests name. */
    public static native String blake3(String path) throws NNPatchException;

    /**
     * Check a patch without writing anything: trailer, signature (with a key), header, every section
     * decoded, and with {@code modelPath} that it applies to that model ({@code nnpatch check}).
     * Throws {@link NNPatchException#MISMATCH} when the model is not the patch's base.
     *
     * @param publicKey the raw 32 key bytes or PEM text as bytes; null accepts an unsigned patch
     */
    public static void check(String patchPath, String modelPath, byte[] publicKey) throws NNPatchException {
        check0(patchPath, modelPath, publicKey == null ? null : publicKey.clone(), null);
    }

    /** {@link #check(String, String, byte[])} with the key as PEM text or a PEM file's path (null: none). */
    public static void check(String patchPath, String modelPath, String publicKey) throws NNPatchException {
        check0(patchPath, modelPath, pemText(publicKey), pemText(publicKey) == null ? publicKey : null);
    }

    /**
     * Bring {@code model} to the release a signed feed names, by the rules of {@code nnpatch update}
     * (spec/MANIFEST.md, "What an updater checks"): the manifest must be a DSSE envelope signed by
     * {@code publicKey}, unexpired and no older than the release recorded beside the model
     * ({@code MODEL.nnpatch-state}, then updated); each patch is downloaded through {@code fetcher}
     * (resumed across calls from {@code MODEL.*.nnpatch-part}), checked by size and BLAKE3, and only
     * then applied. An interrupted in-place update is rolled back first. Without a key an unsigned
     * feed is accepted, and a model that follows a signed one is refused.
     *
     * @param model       the model file
     * @param manifestUrl an http(s) URL of the manifest, or a local path
     * @param publicKey   the raw 32 bytes of the Ed25519 public key, or PEM text as bytes; null: none
     * @param options     null for the defaults
     * @param fetcher     the app's HTTP stack; null: a new {@link HttpFetcher}
     * @throws NNPatchException with the status of {@code nnpatch update}: 2, 3, 4 (refused: signature,
     *         expiry, replay), 5 (I/O, network; the Fetcher's exception is the cause), 7, 130 (cancelled,
     *         interrupted; a listener's exception is the cause). The model is then as it was.
     */
    public static UpdateResult update(String model, String manifestUrl, byte[] publicKey, UpdateOptions options,
                                      Fetcher fetcher) throws NNPatchException {
        return run(model, manifestUrl, publicKey == null ? null : publicKey.clone(), null, options, fetcher);
    }

    /** {@link #update(String, String, byte[], UpdateOptions, Fetcher)} with the key as PEM text or a PEM file's path. */
    public static UpdateResult update(String model, String manifestUrl, String publicKey, UpdateOptions options,
                                      Fetcher fetcher) throws NNPatchException {
        byte[] text = pemText(publicKey);
        return run(model, manifestUrl, text, text == null ? publicKey : null, options, fetcher);
    }

    private static byte[] pemText(String key) {
        return key != null && key.contains("-----BEGIN") ? key.getBytes(StandardCharsets.UTF_8) : null;
    }

    private static UpdateResult run(String model, String manifestUrl, byte[] key, String keyPath,
                                    UpdateOptions options, Fetcher fetcher) throws NNPatchException {
        UpdateOptions o = options != null ? options : new UpdateOptions();
        UpdateCall call = new UpdateCall(fetcher != null ? fetcher : new HttpFetcher(), o.progress);
        Cancellation cancellation = o.cancellation;
        long ctx = newContext();
        try {
            if (cancellation != null) {
                cancellation.attach(ctx);
            }
            return update0(ctx, model, manifestUrl, key, keyPath, o.inPlace.code, o.dryRun, o.prefer.ordinal(),
                           o.retries, o.backoffMillis, o.now, o.fallbackFull, call);
        } catch (NNPatchException e) {
            Throwable cause = e.getStatus() == NNPatchException.IO ? call.fetchFailure
                    : e.getStatus() == NNPatchException.CANCELLED ? call.listenerFailure : null;
            if (cause != null && e.getCause() == null) {
                e.initCause(cause);
            }
            throw e;
        } finally {
            if (cancellation != null) {
                cancellation.detach(ctx);
            }
            freeContext(ctx);
        }
    }

    private static native void check0(String patchPath, String modelPath, byte[] key, String keyPath)
            throws NNPatchException;

    private static native long newContext();

    private static native void freeContext(long ctx);

    static native void cancel0(long ctx);

    private static native UpdateResult update0(long ctx, String model, String manifest, byte[] key, String keyPath,
                                               int inPlace, boolean dryRun, int prefer, int retries, int backoffMillis,
                                               long now, boolean fallbackFull, UpdateCall call)
            throws NNPatchException;
}
