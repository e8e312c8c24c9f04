package org.nnpatch;

import java.io.IOException;
import java.io.InputStream;
import java.net.HttpURLConnection;
import java.net.MalformedURLException;
import java.net.URL;
import java.util.LinkedHashMap;
import java.util.Map;
import java.util.regex.Matcher;
import java.util.regex.Pattern;

import javax.net.ssl.HttpsURLConnection;
import javax.net.ssl.SSLException;
import javax.net.ssl.SSLSocketFactory;

/**
 * The default {@link Fetcher}: {@link HttpURLConnection}, with the bounds of {@code nnpatch-update}
 * (native/cli/http_curl.c) and {@code nnpatch update}: only http:// and https://, at most 5
 * redirects, each checked (never from https:// down to http://), TLS verified by the platform
 * (or a given {@link SSLSocketFactory}), no compressed bodies (Range counts raw bytes), resumes by
 * {@code Range: bytes=N-}. The timeout bounds the connection set-up and each stall; a whole
 * request is also cut after the timeout plus what its bytes take at 1 KiB/s, so a server that
 * drips bytes cannot hold an update forever. Configure it before use; then it is thread-safe.
 */
public class HttpFetcher implements Fetcher {
    public static final int MAX_REDIRECTS = 5;
    private static final long SLOWEST = 1024; // bytes per second below which a request counts as stalled
    private static final Pattern CONTENT_RANGE = Pattern.compile("^bytes (\\d+)-\\d+/(\\d+|\\*)$");

    private int timeoutMillis = 30_000;
    private final Map<String, String> headers = new LinkedHashMap<>();
    private SSLSocketFactory sslSocketFactory;

    /** Connection set-up and stall timeout (30 s by default). */
    public HttpFetcher setTimeoutMillis(int timeoutMillis) {
        if (timeoutMillis <= 0) {
            throw new IllegalArgumentException("timeoutMillis must be positive, got " + timeoutMillis);
        }
        this.timeoutMillis = timeoutMillis;
        return this;
    }

    /** A header sent with every request (a token, a signed-URL scheme's header), as {@code --header}. */
    public HttpFetcher setHeader(String name, String value) {
        if (name == null || value == null || !name.matches("[!#$%&'*+.^_`|~0-9A-Za-z-]+")
                || value.indexOf('\r') >= 0 || value.indexOf('\n') >= 0) {
            throw new IllegalArgumentException("not a header: " + name);
        }
        headers.put(name, value);
        return this;
    }

    /** The TLS set-up for https:// (a private CA, as {@code --ca-file}); null: the platform's. */
    public HttpFetcher setSslSocketFactory(SSLSocketFactory factory) {
        this.sslSocketFactory = factory;
        return this;
    }

    @Override
    public Result fetch(String url, long offset, long limit, FetchSink sink) throws IOException {
        String where = url;
        for (int hop = 0; ; hop++) {
            URL u;
            try {
                u = new URL(where);
            } catch (MalformedURLException e) {
                return Result.fail(shown(where) + ": not a URL");
            }
            if (!u.getProtocol().equals("http") && !u.getProtocol().equals("https")) {
                return Result.fail(shown(where) + ": only http:// and https:// URLs are fetched");
            }
            HttpURLConnection h = (HttpURLConnection) u.openConnection();
            try {
                prepare(h, offset);
                int status = h.getResponseCode();
                if (status >= 300 && status < 400 && status != 304) {
                    String location = h.getHeaderField("Location");
                    if (location == null) {
                        return Result.fail(shown(where) + ": HTTP " + status + " without a Location");
                    }
                    URL next = new URL(u, location);
                    if (hop >= MAX_REDIRECTS) {
                        return Result.fail(shown(url) + ": more than " + MAX_REDIRECTS + " redirects");
                    }
                    boolean https = next.getProtocol().equals("https");
                    boolean httpToHttp = next.getProtocol().equals("http") && u.getProtocol().equals("http");
                    if (!https && !httpToHttp) {
                        return Result.fail(shown(url) + ": redirected to " + shown(next.toString()) + ", refused (a "
                                + "download may only be redirected to https://, or from http:// to http://)");
                    }
                    where = next.toString();
                    continue;
                }
                if (status == 200 || status == 206) {
                    return body(h, status, where, limit, sink);
                }
                if (status == 408 || status == 425 || status == 429 || status == 500 || status == 502
                        || status == 503 || status == 504) {
                    return Result.retry(shown(where) + ": HTTP " + status);
                }
                if (status == 416) {
                    return Result.restart(shown(where) + ": HTTP 416 for a resumed download");
                }
                return Result.fail(shown(where) + ": HTTP " + status);
            } catch (SSLException e) { // a certificate that does not verify is not worth another try
                return Result.fail(shown(where) + ": " + e.getMessage());
            } catch (IOException e) { // refused, reset, timed out: worth another try
                return Result.retry(shown(where) + ": " + e);
            } finally {
                h.disconnect();
            }
        }
    }

    private void prepare(HttpURLConnection h, long offset) {
        h.setInstanceFollowRedirects(false); // followed in fetch, one checked hop at a time
        h.setConnectTimeout(timeoutMillis);
        h.setReadTimeout(timeoutMillis);
        h.setUseCaches(false);
        h.setRequestProperty("User-Agent", "nnpatch-jni/" + NNPatch.version());
        h.setRequestProperty("Accept-Encoding", "identity");
        if (offset > 0) {
            h.setRequestProperty("Range", "bytes=" + offset + "-");
        }
        for (Map.Entry<String, String> e : headers.entrySet()) {
            h.setRequestProperty(e.getKey(), e.getValue());
        }
        if (sslSocketFactory != null && h instanceof HttpsURLConnection) {
            ((HttpsURLConnection) h).setSSLSocketFactory(sslSocketFactory);
        }
    }

    private Result body(HttpURLConnection h, int status, String where, long limit, FetchSink sink)
            throws IOException {
        long at = 0; // 200: the whole file, the server ignored the range; the library skips what it has
        if (status == 206) {
            String range = h.getHeaderField("Content-Range");
            Matcher m = range == null ? null : CONTENT_RANGE.matcher(range.trim());
            if (m == null || !m.matches()) {
                return Result.retry(shown(where) + ": HTTP 206 with an unreadable Content-Range " + range);
            }
            at = Long.parseLong(m.group(1));
        }
        long deadline = System.nanoTime() + (timeoutMillis + Math.min(limit / SLOWEST, 1L << 30) * 1000L) * 1_000_000L;
        byte[] buf = new byte[65536];
        long got = 0;
        try (InputStream in = h.getInputStream()) {
            int n;
            while ((n = in.read(buf)) > 0) {
                if (!sink.accept(at + got, buf, 0, n)) {
                    return Result.ok();
                }
                got += n;
                if (System.nanoTime() - deadline > 0) {
                    return Result.retry(shown(where) + ": slower than " + SLOWEST + " bytes/s, cut after " + got
                            + " bytes");
                }
            }
        } catch (IOException e) {
            return Result.retry(shown(where) + ": " + e + " after " + got + " bytes");
        }
        return Result.ok();
    }

    /** A URL without credentials or query, for messages (fetch.py's _shown). */
    static String shown(String url) {
        int s = url.indexOf("://");
        int hostAt = s < 0 ? 0 : s + 3;
        int slash = url.indexOf('/', hostAt);
        int at = url.indexOf('@', hostAt);
        String head = url.substring(0, hostAt);
        String rest = url.substring(at >= 0 && (slash < 0 || at < slash) ? at + 1 : hostAt);
        int cut = rest.length();
        for (char c : new char[] {'?', '#'}) {
            int i = rest.indexOf(c);
            if (i >= 0 && i < cut) {
                cut = i;
            }
        }
        return UpdateCall.oneLine(head + rest.substring(0, cut));
    }
}
