package org.nnpatch;

/** A failed {@link NNPatch} call: the native status (the command's exit code), the
 * error class (the Python implementation's name, e.g. "BaseMismatchError") and the message.
 * libnnpatch_jni makes it (proguard-rules.pro keeps its constructor). */
public class NNPatchException extends Exception {
    private static final long serialVersionUID = 1L;

    public static final int MISMATCH = 1;
    public static final int USAGE = 2;
    public static final int FORMAT = 3;
    public static final int INTEGRITY = 4;
    public static final int IO = 5;
    /** {@link NNPatch#update}: no patch in the manifest leads from the model's version. */
    public static final int NO_UPDATE_PATH = 7;
    /** Cancelled ({@link Cancellation}), the thread interrupted, or a progress listener threw. */
    public static final int CANCELLED = 130;

    private final int status;
    private final String kind;

    public NNPatchException(int status, String kind, String message) {
        super(message);
        this.status = status;
        this.kind = kind;
    }

    /** The status: 1 mismatch, 2 usage, 3 format, 4 integrity (wrong base, bad signature, a refused
     * feed), 5 I/O or network, 7 no update path, 130 cancelled. */
    public int getStatus() {
        return status;
    }

    /** The error class, as nnpatch (Python) names it: "PatchFormatError", "IntegrityError", ... */
    public String getKind() {
        return kind;
    }
}
