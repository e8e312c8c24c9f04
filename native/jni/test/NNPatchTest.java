import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.nio.file.StandardCopyOption;
import java.util.Arrays;
import java.util.concurrent.atomic.AtomicReference;

import org.nnpatch.NNPatch;
import org.nnpatch.NNPatchException;

/** java -Djava.library.path=build/native NNPatchTest VECTOR_DIR TMP_DIR: applies the vector's
 * patch through JNI and checks the bytes, the exceptions, in place, recover and two threads. */
public class NNPatchTest {
    static int checks = 0;

    static void check(boolean ok, String what) {
        if (!ok) {
            System.out.println("FAIL: " + what);
            System.exit(1);
        }
        checks++;
    }

    interface Call { void run() throws NNPatchException; }

    static NNPatchException fails(Call c) {
        try {
            c.run();
            return null;
        } catch (NNPatchException e) {
            return e;
        }
    }

    public static void main(String[] args) throws Exception {
        Path vec = Paths.get(args[0]);
        Path tmp = Paths.get(args[1]);
        String base = vec.resolve("base.safetensors").toString();
        String[] patch = {vec.resolve("patch.nnpatch").toString()};
        byte[] target = Files.readAllBytes(vec.resolve("target.safetensors"));

        check(NNPatch.version().length() > 0, "version");

        // a new file, every verify mode
        for (String mode : new String[] {null, "default", "full", "touched"}) {
            Path out = tmp.resolve("out-" + mode + ".safetensors");
            NNPatch.apply(base, patch, out.toString(), mode, null);
            check(Arrays.equals(Files.readAllBytes(out), target), "apply --verify " + mode + ": bytes");
        }

        // the wrong base: refused (4), nothing written
        Path out2 = tmp.resolve("wrong.safetensors");
        NNPatchException e = fails(() -> NNPatch.apply(vec.resolve("target.safetensors").toString(), patch,
                                                       out2.toString(), null, null));
        check(e != null && e.getStatus() == NNPatchException.INTEGRITY, "wrong base: status 4, got " + (e == null ? "none" : e.getStatus() + " " + e.getMessage()));
        check(e.getKind().equals("BaseMismatchError"), "wrong base: kind " + e.getKind());
        check(e.getMessage().length() > 0, "wrong base: message");
        check(!Files.exists(out2), "wrong base: nothing written");

        // usage errors
        e = fails(() -> NNPatch.apply(base, patch, tmp.resolve("x").toString(), "bogus", null));
        check(e != null && e.getStatus() == NNPatchException.USAGE, "bad verify mode: status 2");
        e = fails(() -> NNPatch.apply(base, new String[0], tmp.resolve("x").toString(), null, null));
        check(e != null && e.getStatus() == NNPatchException.USAGE, "no patch: status 2");
        e = fails(() -> NNPatch.apply(null, patch, tmp.resolve("x").toString(), null, null));
        check(e != null && e.getStatus() == NNPatchException.USAGE, "null base: status 2");
        e = fails(() -> NNPatch.apply(base, patch, tmp.resolve("x").toString(), null,
                                      tmp.resolve("no-key.pem").toString()));
        check(e != null && e.getStatus() == NNPatchException.IO, "missing key file: status 5, got " + (e == null ? "none" : e.getStatus() + " " + e.getMessage()));
        // the key as PEM text (issue 23: it was taken for a path, "cannot read"): read, and the
        // unsigned vector is refused for want of a signature
        String pem = new String(Files.readAllBytes(vec.getParent().getParent().resolve("manifest")
                .resolve("TEST-ONLY-release-key.pub.pem")), java.nio.charset.StandardCharsets.UTF_8);
        e = fails(() -> NNPatch.apply(base, patch, tmp.resolve("x").toString(), null, pem));
        check(e != null && e.getStatus() == NNPatchException.INTEGRITY && e.getMessage().contains("not signed"),
              "PEM text key: unsigned refused, got " + (e == null ? "none" : e.getStatus() + " " + e.getMessage()));

        // in place, then recover finds no journal
        Path model = tmp.resolve("model.safetensors");
        Files.copy(Paths.get(base), model, StandardCopyOption.REPLACE_EXISTING);
        NNPatch.applyInPlace(model.toString(), patch, null);
        check(Arrays.equals(Files.readAllBytes(model), target), "applyInPlace: bytes");
        check(!NNPatch.recover(model.toString()), "recover: no journal");
        e = fails(() -> NNPatch.applyInPlace(model.toString(), patch, null));
        check(e != null && e.getStatus() == NNPatchException.INTEGRITY, "in place twice: status 4");
        check(Arrays.equals(Files.readAllBytes(model), target), "in place twice: model untouched");

        // two threads at once, a context each
        AtomicReference<String> err = new AtomicReference<>();
        Thread[] ts = new Thread[2];
        for (int k = 0; k < ts.length; k++) {
            final int kk = k;
            ts[k] = new Thread(() -> {
                try {
                    for (int i = 0; i < 4; i++) {
                        Path o = tmp.resolve("t" + kk + "-" + i);
                        NNPatch.apply(base, patch, o.toString(), null, null);
                        if (!Arrays.equals(Files.readAllBytes(o), target)) err.set("thread " + kk + ": bytes");
                    }
                } catch (Exception ex) {
                    err.set("thread " + kk + ": " + ex);
                }
            });
            ts[k].start();
        }
        for (Thread t : ts) t.join();
        check(err.get() == null, String.valueOf(err.get()));

        System.out.println("OK " + checks + " checks");
    }
}
