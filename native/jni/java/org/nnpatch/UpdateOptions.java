package org.nnpatch;

/**
 * How {@link NNPatch#update} goes about it: the options of {@code nnpatch update} and
 * {@code nnpatch-update} ({@code nnp_update_options}). Setters return this, to chain. Timeouts
 * and headers belong to the {@link Fetcher} ({@link HttpFetcher#setTimeoutMillis}).
 */
public final class UpdateOptions {
    /** Which patches to take when the manifest offers a direct patch and a chain. */
    public enum Prefer { DIRECT, SMALLEST, CHAIN } // nnp_prefer's order

    /** Where the new version is built. */
    public enum InPlace {
        /** Beside the model when the disk has room for it, else in place ({@code nnpatch update}). */
        AUTO(0),
        /** In place behind the undo journal ({@code --in-place}): needs the least room. */
        ALWAYS(1),
        /** Never in place: {@link NNPatchException#IO} when there is no room beside the model. */
        NEVER(-1);

        final int code;

        InPlace(int code) {
            this.code = code;
        }
    }

    Prefer prefer = Prefer.DIRECT;
    InPlace inPlace = InPlace.AUTO;
    boolean dryRun;
    int retries = 5;
    int backoffMillis = 500;
    long now;
    boolean fallbackFull;
    ProgressListener progress;
    Cancellation cancellation;

    public UpdateOptions setPrefer(Prefer prefer) {
        if (prefer == null) {
            throw new NullPointerException("prefer");
        }
        this.prefer = prefer;
        return this;
    }

    public UpdateOptions setInPlace(InPlace inPlace) {
        if (inPlace == null) {
            throw new NullPointerException("inPlace");
        }
        this.inPlace = inPlace;
        return this;
    }

    /** Decide and report ({@link UpdateResult.Status#WOULD_UPDATE}); fetch only the manifest, write nothing. */
    public UpdateOptions setDryRun(boolean dryRun) {
        this.dryRun = dryRun;
        return this;
    }

    /** Further tries of one file after a failure worth another try (5, as {@code nnpatch update}). */
    public UpdateOptions setRetries(int retries) {
        if (retries < 0) {
            throw new IllegalArgumentException("retries must be 0 or more, got " + retries);
        }
        this.retries = retries;
        return this;
    }

    /** The first pause between tries, doubled after each (500 ms). */
    public UpdateOptions setBackoffMillis(int backoffMillis) {
        if (backoffMillis < 0) {
            throw new IllegalArgumentException("backoffMillis must be 0 or more, got " + backoffMillis);
        }
        this.backoffMillis = backoffMillis;
        return this;
    }

    /** Seconds since the epoch to judge the manifest's expiry by; 0 (the default): the clock. */
    public UpdateOptions setNow(long epochSeconds) {
        this.now = epochSeconds;
        return this;
    }

    /** With no patch from the model's version, download the manifest's whole target ({@code --fallback full}). */
    public UpdateOptions setFallbackFull(boolean fallbackFull) {
        this.fallbackFull = fallbackFull;
        return this;
    }

    public UpdateOptions setProgressListener(ProgressListener progress) {
        this.progress = progress;
        return this;
    }

    public UpdateOptions setCancellation(Cancellation cancellation) {
        this.cancellation = cancellation;
        return this;
    }
}
