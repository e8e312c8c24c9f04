package org.nnpatch;

/**
 * Apply nnpatch patches on the device: the native applier (libnnpatch) through JNI.
 *
 * <p>Every method is static, thread-safe (each call has its own native context) and
 * blocking: call it from a worker thread, never the UI thread. A failure throws an
 * {@link NNPatchException} whose {@link NNPatchException#getStatus() status} is the
 * exit code of {@code nnpatch-apply} (1 mismatch, 2 usage, 3 format, 4 integrity,
 * 5 I/O) and whose message is the library's one-line message with the evidence.
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
     * @param keyPem  a public key (PEM, as {@code nnpatch keygen} writes) every patch must be
     *                signed with; null accepts unsigned patches
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
}
