package org.nnpatch;

import java.io.IOException;

/**
 * How {@link NNPatch#update} downloads: the app's own HTTP stack (OkHttp, Cronet, its proxy and
 * auth settings) behind libnnpatch's fetch callback ({@code nnp_fetch_fn} in nnpatch.h). The
 * library opens no connection itself. {@link HttpFetcher} is a default on HttpURLConnection.
 *
 * <p>Called on the thread that called {@code update}, once per try of one file. Deliver the
 * resource at {@code url} from byte {@code offset} on ({@code Range: bytes=offset-}; offset 0:
 * the whole of it) to {@code sink}, each piece with its position in the resource: a server that
 * ignored the range sends from 0, so pass {@code at = 0} and the library skips what it has. Stop
 * reading when {@link FetchSink#accept} returns false (the library has what it wants, or the
 * update is cancelled). The library never takes more than {@code limit} bytes from {@code offset}.
 *
 * <p>Return {@link Result#ok()} when the body ended, complete or not (the library counts the
 * bytes and asks again for the rest); {@link Result#retry} for a failure worth another try (cut,
 * stall, timeout, HTTP 408/425/429/5xx); {@link Result#fail} for one that is not (HTTP 404, a
 * refused redirect); {@link Result#restart} when what was asked for does not fit what the server
 * has now (HTTP 416, another total length): the library drops what it holds and asks from byte 0.
 * An {@link IOException} thrown counts as a retry, anything else thrown as a failure: the update
 * then fails with {@link NNPatchException#IO}, the exception as its cause. The VM is never at risk.
 */
public interface Fetcher {
    Result fetch(String url, long offset, long limit, FetchSink sink) throws IOException;

    /** What one fetch came to: {@code nnp_fetch_result} and a one-line reason. */
    final class Result {
        static final int OK = 0, RETRY = 1, FAIL = 2, RESTART = 3; // nnp_fetch_result's numbers

        private static final Result DONE = new Result(OK, null);

        final int code;
        final String reason;

        private Result(int code, String reason) {
            this.code = code;
            this.reason = reason;
        }

        /** The body ended (complete or not). */
        public static Result ok() {
            return DONE;
        }

        /** A failure worth another try, after a growing pause (UpdateOptions' retries and backoff). */
        public static Result retry(String reason) {
            return new Result(RETRY, reason);
        }

        /** A failure not worth another try: the update fails with {@link NNPatchException#IO}. */
        public static Result fail(String reason) {
            return new Result(FAIL, reason);
        }

        /** The partial download does not fit the server's file: start again from byte 0. */
        public static Result restart(String reason) {
            return new Result(RESTART, reason);
        }

        @Override
        public String toString() {
            String[] names = {"ok", "retry", "fail", "restart"};
            return reason == null ? names[code] : names[code] + ": " + reason;
        }
    }
}
