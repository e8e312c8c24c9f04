package org.nnpatch;

import java.io.IOException;

/**
 * One {@link NNPatch#update} call's Java side, which libnnpatch_jni calls back on the updating
 * thread: every exception of the app's Fetcher and listener is caught here, so none is ever
 * pending when control returns to native code. proguard-rules.pro keeps the names it uses.
 */
final class UpdateCall {
    static final int INTERRUPTED = -1; // FETCH_INTERRUPTED in nnpatch_jni.c

    private final Fetcher fetcher;
    private final ProgressListener listener;
    String reason;             // the last fetch's one-line reason, read by the native side
    Throwable fetchFailure;    // what the last fetch threw
    Throwable listenerFailure; // what the listener threw (it stopped the update)

    UpdateCall(Fetcher fetcher, ProgressListener listener) {
        this.fetcher = fetcher;
        this.listener = listener;
    }

    int fetch(String url, long offset, long limit, long sinkHandle) {
        reason = null;
        fetchFailure = null;
        if (Thread.currentThread().isInterrupted()) {
            reason = "interrupted";
            return INTERRUPTED;
        }
        FetchSink sink = new FetchSink(sinkHandle);
        int code;
        try {
            Fetcher.Result r = fetcher.fetch(url, offset, limit, sink);
            if (r == null) {
                r = Fetcher.Result.fail(url + ": the Fetcher returned null");
            }
            code = r.code;
            reason = r.reason;
        } catch (IOException e) {
            fetchFailure = e;
            code = Fetcher.Result.RETRY;
            reason = oneLine(url + ": " + e);
        } catch (Throwable t) { // a bug in the Fetcher fails the update; it must not reach native code
            fetchFailure = t;
            code = Fetcher.Result.FAIL;
            reason = oneLine(url + ": the Fetcher threw " + t);
        } finally {
            sink.close(); // the native sink is gone once this returns
        }
        if (Thread.currentThread().isInterrupted()) {
            reason = "interrupted";
            return INTERRUPTED;
        }
        return code;
    }

    boolean progress(long done, long total) {
        if (listener != null) {
            try {
                listener.onProgress(done, total);
            } catch (Throwable t) {
                listenerFailure = t;
                return true;
            }
        }
        return Thread.currentThread().isInterrupted();
    }

    static String oneLine(String s) {
        StringBuilder b = new StringBuilder(s.length());
        for (int i = 0; i < s.length(); i++) {
            char c = s.charAt(i);
            b.append(c < 0x20 || c == 0x7f ? '?' : c);
        }
        return b.toString();
    }
}
