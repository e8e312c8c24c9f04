import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.Random;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicReference;
import java.util.concurrent.locks.LockSupport;

import org.nnpatch.Cancellation;
import org.nnpatch.FetchSink;
import org.nnpatch.Fetcher;
import org.nnpatch.HttpFetcher;
import org.nnpatch.NNPatch;
import org.nnpatch.NNPatchException;
import org.nnpatch.UpdateOptions;
import org.nnpatch.UpdateResult;

/**
 * java -Xcheck:jni -Djava.library.path=build/native UpdateTest SCENARIO MODEL MANIFEST KEYS_DIR [ARG]:
 * one NNPatch.update scenario, driven by tests/native/test_jni_update.py, which lays out the feed
 * and checks the model by BLAKE3 afterwards. Prints one line, "RESULT k=v ..." or
 * "EXCEPTION status kind cause | message", plus "TRACE ..." lines; exits 1 on a failed expectation.
 */
public class UpdateTest {
    static String MANIFEST;

    static void expect(boolean ok, String what) {
        if (!ok) {
            System.out.println("FAIL: " + what);
            System.exit(1);
        }
    }

    static void print(UpdateResult r) {
        System.out.println("RESULT status=" + r.getStatus() + " from=" + r.getFromBlake3() + " to=" + r.getToBlake3()
                + " release=" + r.getRelease() + " signed=" + r.isSigned() + " key_id=" + r.getKeyId()
                + " patches=" + String.join(",", r.getPatches()) + " patch_bytes=" + r.getPatchBytes()
                + " downloaded=" + r.getDownloadedBytes() + " resumed=" + r.getResumedBytes()
                + " in_place=" + r.isInPlace() + " to_name=" + r.getToName() + " from_name=" + r.getFromName());
    }

    static void print(NNPatchException e) {
        Throwable c = e.getCause();
        System.out.println("EXCEPTION " + e.getStatus() + " " + e.getKind() + " "
                + (c == null ? "-" : c.getClass().getName()) + " | " + e.getMessage());
    }

    /** A feed at https://feed.invalid/ served from a folder by the app's "own HTTP stack": pieces of
     * random size, the first try of each patch cut half-way (the library resumes from its offset). */
    static final class FolderFetcher implements Fetcher {
        final Path dir;
        final Random rng = new Random(7);
        final List<String> calls = new ArrayList<>();
        volatile String current = "";
        boolean cutFirstPatchTry = true;
        long pieceDelayMillis;
        Runnable onPatchBytes = () -> {};

        FolderFetcher(Path dir) {
            this.dir = dir;
        }

        @Override
        public Result fetch(String url, long offset, long limit, FetchSink sink) throws IOException {
            calls.add(url + "@" + offset);
            current = url;
            String prefix = "https://feed.invalid/";
            if (!url.startsWith(prefix)) {
                return Result.fail(url + ": not on this feed");
            }
            Path f = dir.resolve(url.substring(prefix.length()));
            if (!Files.isRegularFile(f)) {
                return Result.fail(url + ": HTTP 404");
            }
            byte[] data = Files.readAllBytes(f);
            boolean patch = url.endsWith(".nnpatch");
            int end = data.length;
            if (patch && cutFirstPatchTry && offset == 0) {
                cutFirstPatchTry = false;
                end = data.length / 2;
            }
            int pos = (int) offset;
            while (pos < end) {
                int n = Math.min(end - pos, 1 + rng.nextInt(4096));
                if (!sink.accept(pos, data, pos, n)) {
                    return Result.ok();
                }
                pos += n;
                if (patch) {
                    onPatchBytes.run();
                }
                if (pieceDelayMillis > 0) {
                    try {
                        Thread.sleep(pieceDelayMillis);
                    } catch (InterruptedException e) {
                        Thread.currentThread().interrupt(); // keep the flag: the library sees it
                        return Result.retry("interrupted while sleeping");
                    }
                }
            }
            return end < data.length ? Result.retry(url + ": cut after " + end + " bytes") : Result.ok();
        }
    }

    static UpdateOptions fast() {
        return new UpdateOptions().setRetries(3).setBackoffMillis(10);
    }

    public static void main(String[] args) throws Exception {
        String scenario = args[0];
        String model = args[1];
        String manifest = args[2];
        MANIFEST = manifest;
        Path keys = Paths.get(args[3]);
        String pem = new String(Files.readAllBytes(keys.resolve("release.pub.pem")), StandardCharsets.UTF_8);
        byte[] raw = Files.readAllBytes(keys.resolve("release.raw"));
        try {
            run(scenario, model, manifest, keys, pem, raw, args.length > 4 ? args[4] : null);
        } catch (NNPatchException e) {
            print(e);
        }
    }

    static void run(String scenario, String model, String manifest, Path keys, String pem, byte[] raw, String arg)
            throws Exception {
        switch (scenario) {
            case "http-pem": // the default HttpURLConnection fetcher (null), the key as PEM text
                print(NNPatch.update(model, manifest, pem, fast(), null));
                return;
            case "http-raw": { // the key as raw bytes, an explicit HttpFetcher with a header
                HttpFetcher http = new HttpFetcher().setTimeoutMillis(2000).setHeader("Authorization", "Bearer t0k");
                print(NNPatch.update(model, manifest, raw, fast().setInPlace(UpdateOptions.InPlace.ALWAYS), http));
                return;
            }
            case "http-faults": { // quick to give up on a stalled connection, patient with retries
                HttpFetcher http = new HttpFetcher().setTimeoutMillis(1000);
                print(NNPatch.update(model, manifest, pem, fast().setRetries(5), http));
                return;
            }
            case "http-path": // the key as a PEM file's path
                print(NNPatch.update(model, manifest, keys.resolve("release.pub.pem").toString(), fast(), null));
                return;
            case "dry-run":
                print(NNPatch.update(model, manifest, pem, fast().setDryRun(true), null));
                return;
            case "wrong-key":
                print(NNPatch.update(model, manifest, Files.readAllBytes(keys.resolve("other.pub.pem")), fast(), null));
                return;
            case "private-key":
                print(NNPatch.update(model, manifest, Files.readAllBytes(keys.resolve("release.pem")), fast(), null));
                return;
            case "custom": {
                FolderFetcher f = new FolderFetcher(Paths.get(arg));
                print(NNPatch.update(model, "https://feed.invalid/manifest.json", raw, fast(), f));
                System.out.println("TRACE calls " + String.join(" ", f.calls));
                return;
            }
            case "throwing-fetcher":
                print(NNPatch.update(model, manifest, pem, fast(), (url, offset, limit, sink) -> {
                    if (url.endsWith(".nnpatch")) {
                        throw new IllegalStateException("the app's bug");
                    }
                    return new HttpFetcher().fetch(url, offset, limit, sink);
                }));
                return;
            case "misused-sink": { // a sink kept past its call, and used from another thread: refused
                AtomicReference<FetchSink> kept = new AtomicReference<>();
                AtomicReference<Throwable> other = new AtomicReference<>();
                print(NNPatch.update(model, manifest, pem, fast(), (url, offset, limit, sink) -> {
                    if (kept.get() == null) {
                        kept.set(sink);
                        Thread t = new Thread(() -> {
                            try {
                                sink.accept(0, new byte[1], 0, 1);
                            } catch (Throwable e) {
                                other.set(e);
                            }
                        });
                        t.start();
                        try {
                            t.join();
                        } catch (InterruptedException e) {
                            throw new IOException(e);
                        }
                    }
                    return new HttpFetcher().fetch(url, offset, limit, sink);
                }));
                expect(other.get() instanceof IllegalStateException, "another thread's accept: " + other.get());
                try {
                    kept.get().accept(0, new byte[1], 0, 1);
                    expect(false, "a sink used after its call was accepted");
                } catch (IllegalStateException e) {
                    System.out.println("TRACE sink-after-call refused");
                }
                return;
            }
            case "throwing-listener":
                print(NNPatch.update(model, manifest, pem, fast().setProgressListener((done, total) -> {
                    throw new IllegalArgumentException("the listener's bug");
                }), null));
                return;
            case "cancel-download":
                cancelDownload(model, raw, Paths.get(arg));
                return;
            case "cancel-apply-in-place":
            case "cancel-apply-new-file":
                cancelApply(model, manifest, pem, scenario.endsWith("in-place"));
                return;
            case "interrupt":
                interrupt(model, raw, Paths.get(arg));
                return;
            case "interrupt-pause":
                interruptPause(model, raw);
                return;
            case "cancelled-before":
                Cancellation c = new Cancellation();
                c.cancel();
                print(NNPatch.update(model, manifest, pem, fast().setCancellation(c), null));
                return;
            case "check":
                check(model, keys, pem, raw, arg);
                return;
            default:
                throw new IllegalArgumentException(scenario);
        }
    }

    /** Another thread cancels once patch bytes are arriving (from the app's fetcher, which waits for it). */
    static void cancelDownload(String model, byte[] raw, Path dist) throws Exception {
        FolderFetcher f = new FolderFetcher(dist);
        f.cutFirstPatchTry = false;
        f.pieceDelayMillis = 5;
        CountDownLatch arriving = new CountDownLatch(1);
        Cancellation c = new Cancellation();
        f.onPatchBytes = () -> { // held until the cancel has landed: mid-download every time
            arriving.countDown();
            for (int i = 0; i < 2000 && !c.isCancelled(); i++) {
                LockSupport.parkNanos(5_000_000L);
            }
        };
        Thread canceller = new Thread(() -> {
            try {
                arriving.await();
                c.cancel();
            } catch (InterruptedException e) {
                Thread.currentThread().interrupt();
            }
        });
        canceller.start();
        long[] last = {0, 0};
        UpdateOptions o = fast().setCancellation(c).setProgressListener((done, total) -> {
            last[0] = done;
            last[1] = total;
        });
        try {
            print(NNPatch.update(model, "https://feed.invalid/manifest.json", raw, o, f));
        } finally {
            canceller.join();
            System.out.println("TRACE cancelled-at " + f.current + " " + last[0] + "/" + last[1]);
        }
    }

    /** Another thread cancels half-way through the apply: the first progress report after the patch
     * was fetched in which the step's total is ahead of what is done (a download's total grows with
     * it; an apply announces its total first) and at least half is done (in place, the journal is
     * written and the model half rewritten by then). The listener holds the updating thread until
     * the cancel has landed, so it lands mid-apply every time. */
    static void cancelApply(String model, String manifest, String pem, boolean inPlace) throws Exception {
        Cancellation c = new Cancellation();
        CountDownLatch applying = new CountDownLatch(1);
        String[] current = {""};
        boolean[] patchFetched = {false};
        Fetcher http = new HttpFetcher().setTimeoutMillis(2000);
        Fetcher watching = (url, offset, limit, sink) -> {
            current[0] = url;
            Fetcher.Result r = http.fetch(url, offset, limit, sink);
            patchFetched[0] |= url.endsWith(".nnpatch");
            return r;
        };
        Thread canceller = new Thread(() -> {
            try {
                applying.await();
                c.cancel();
            } catch (InterruptedException e) {
                Thread.currentThread().interrupt();
            }
        });
        canceller.start();
        String[] at = {"never"};
        UpdateOptions o = fast().setCancellation(c)
                .setInPlace(inPlace ? UpdateOptions.InPlace.ALWAYS : UpdateOptions.InPlace.NEVER)
                .setProgressListener((done, total) -> {
                    if (patchFetched[0] && done < total && done >= total / 2 && applying.getCount() > 0) {
                        at[0] = done + "/" + total;
                        applying.countDown();
                        for (int i = 0; i < 1000 && !c.isCancelled(); i++) {
                            try {
                                Thread.sleep(10);
                            } catch (InterruptedException e) {
                                Thread.currentThread().interrupt();
                            }
                        }
                    }
                });
        try {
            print(NNPatch.update(model, manifest, pem, o, watching));
        } finally {
            applying.countDown();
            canceller.join();
            System.out.println("TRACE cancelled-at apply " + at[0]);
        }
    }

    /** Thread.interrupt() of the updating thread while patch bytes arrive: CANCELLED, flag kept. */
    static void interrupt(String model, byte[] raw, Path dist) throws Exception {
        FolderFetcher f = new FolderFetcher(dist);
        f.cutFirstPatchTry = false;
        f.pieceDelayMillis = 5;
        CountDownLatch arriving = new CountDownLatch(1);
        f.onPatchBytes = () -> { // held until the interrupt has landed (parkNanos keeps the flag)
            arriving.countDown();
            for (int i = 0; i < 2000 && !Thread.currentThread().isInterrupted(); i++) {
                LockSupport.parkNanos(5_000_000L);
            }
        };
        AtomicReference<Object> outcome = new AtomicReference<>();
        boolean[] flagAfter = {false};
        Thread worker = new Thread(() -> {
            try {
                outcome.set(NNPatch.update(model, "https://feed.invalid/manifest.json", raw, fast(), f));
            } catch (NNPatchException e) {
                outcome.set(e);
            }
            flagAfter[0] = Thread.currentThread().isInterrupted();
        });
        worker.start();
        expect(arriving.await(60, TimeUnit.SECONDS), "patch bytes never arrived");
        worker.interrupt();
        worker.join();
        System.out.println("TRACE interrupted-flag-kept " + flagAfter[0]);
        if (outcome.get() instanceof NNPatchException) {
            print((NNPatchException) outcome.get());
        } else {
            print((UpdateResult) outcome.get());
        }
    }

    /** arg: "PATCH,OTHER_MODEL" (a model that is not the patch's base). */
    /** Thread.interrupt() while the update waits out a 30 s pause between tries of the patch (a
     * fetcher that always answers "retry"): heard within the pause, not after it. */
    static void interruptPause(String model, byte[] raw) throws Exception {
        CountDownLatch failedOnce = new CountDownLatch(1);
        Fetcher flaky = (url, offset, limit, sink) -> {
            if (url.endsWith(".nnpatch")) {
                failedOnce.countDown();
                return Fetcher.Result.retry(url + ": HTTP 503");
            }
            return new HttpFetcher().fetch(url, offset, limit, sink);
        };
        AtomicReference<Object> outcome = new AtomicReference<>();
        Thread worker = new Thread(() -> {
            try {
                outcome.set(NNPatch.update(model, MANIFEST, raw,
                                           new UpdateOptions().setRetries(3).setBackoffMillis(30_000), flaky));
            } catch (NNPatchException e) {
                outcome.set(e);
            }
        });
        worker.start();
        expect(failedOnce.await(60, TimeUnit.SECONDS), "the patch was never fetched");
        Thread.sleep(200); // into the pause
        long t0 = System.nanoTime();
        worker.interrupt();
        worker.join(20_000);
        long ms = (System.nanoTime() - t0) / 1_000_000;
        expect(!worker.isAlive(), "still waiting out the pause");
        System.out.println("TRACE stopped-after-ms " + ms);
        if (outcome.get() instanceof NNPatchException) {
            print((NNPatchException) outcome.get());
        } else {
            print((UpdateResult) outcome.get());
        }
    }

    static void check(String model, Path keys, String pem, byte[] raw, String arg) throws Exception {
        String patch = arg.split(",")[0];
        String other = arg.split(",")[1];
        NNPatch.check(patch, model, raw);
        NNPatch.check(patch, model, pem);
        NNPatch.check(patch, null, (byte[]) null);
        expect(NNPatch.blake3(model).length() == 64, "blake3");
        for (Object key : new Object[] {Files.readAllBytes(keys.resolve("other.pub.pem")), "other"}) {
            try {
                if (key instanceof byte[]) {
                    NNPatch.check(patch, model, (byte[]) key);
                } else {
                    NNPatch.check(patch, other, raw);
                }
                expect(false, "check passed where it must not");
            } catch (NNPatchException e) {
                System.out.println("TRACE refused " + e.getStatus() + " " + e.getKind() + " | " + e.getMessage());
            }
        }
        System.out.println("RESULT checked=yes");
    }
}
