package org.nnpatch;

import java.util.ArrayList;
import java.util.List;

/**
 * Stops {@link NNPatch#update} calls from any thread (a UI button, a job scheduler): each stops
 * at its next safe point with {@link NNPatchException#CANCELLED} and leaves the model as it was
 * (an in-place apply is rolled back by its journal; a partial download stays for the next try).
 * Once cancelled it stays cancelled: an update started with it stops at once. One Cancellation
 * may serve several updates at the same time. {@code Thread.interrupt()} of the updating thread
 * stops it too, without one: it is seen at the next progress report (every 50 ms during a pause
 * between tries) or fetch call; a blocked read of HttpURLConnection is not interruptible, and its
 * timeout bounds it.
 */
public final class Cancellation {
    private boolean cancelled;
    private final List<Long> running = new ArrayList<>(); // native contexts of the updates now running

    public synchronized void cancel() {
        cancelled = true;
        for (long ctx : running) {
            NNPatch.cancel0(ctx);
        }
    }

    public synchronized boolean isCancelled() {
        return cancelled;
    }

    // The lock makes attach/detach and cancel exclusive: cancel never reaches a freed context.
    synchronized void attach(long ctx) {
        running.add(ctx);
        if (cancelled) {
            NNPatch.cancel0(ctx);
        }
    }

    synchronized void detach(long ctx) {
        running.remove(Long.valueOf(ctx));
    }
}
