package org.nnpatch;

/**
 * Progress of {@link NNPatch#update}, called on the updating thread now and then with the bytes
 * done and expected in the current step (reading the manifest, hashing the model, each download,
 * the apply; each step counts from 0, and a total may grow while a download arrives). Keep it
 * short: post to the UI thread. Throwing from it stops the update
 * ({@link NNPatchException#CANCELLED}, the exception as its cause); to stop on purpose, use a
 * {@link Cancellation}.
 */
public interface ProgressListener {
    void onProgress(long done, long total);
}
