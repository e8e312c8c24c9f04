package org.nnpatch;

/**
 * Where a {@link Fetcher} puts the bytes it receives: libnnpatch's sink ({@code nnp_sink_fn}),
 * which places each piece by its position, keeps nothing past what the manifest says the file
 * holds, and reports progress. Valid only during the {@code fetch} call it was given to and only
 * on that thread; anything else throws {@link IllegalStateException}.
 */
public final class FetchSink {
    private long handle; // the native sink of this fetch call; 0 once the call returned
    private final Thread owner = Thread.currentThread();

    FetchSink(long handle) {
        this.handle = handle;
    }

    /**
     * Deliver {@code len} bytes of {@code buf} from {@code off}: bytes {@code at ..} of the resource.
     *
     * @return true for more; false when the library wants no more (it has what it needs, or the
     *         update was cancelled or the thread interrupted): stop reading and return
     */
    public boolean accept(long at, byte[] buf, int off, int len) {
        if (Thread.currentThread() != owner || handle == 0) {
            throw new IllegalStateException("a FetchSink is used during its fetch call, on the fetching thread");
        }
        if (buf == null) {
            throw new NullPointerException("buf");
        }
        if (off < 0 || len < 0 || off > buf.length - len || at < 0) {
            throw new IndexOutOfBoundsException("at " + at + ", off " + off + ", len " + len + ", buf " + buf.length);
        }
        if (owner.isInterrupted()) {
            return false;
        }
        return accept0(handle, at, buf, off, len);
    }

    void close() {
        handle = 0;
    }

    private static native boolean accept0(long handle, long at, byte[] buf, int off, int len);
}
