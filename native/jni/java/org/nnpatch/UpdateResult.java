package org.nnpatch;

/** What {@link NNPatch#update} did: {@code nnp_update_result}, the fields of {@code nnpatch update --json}. */
public final class UpdateResult {
    public enum Status {
        /** The model is now the release's target. */
        UPDATED,
        /** The model already was the release's target. */
        CURRENT,
        /** A dry run: an update would run. */
        WOULD_UPDATE
    }

    private final Status status;
    private final String fromBlake3, toBlake3, fromName, toName, expires, keyId;
    private final boolean hasRelease, signed, inPlace, recovered, inPlaceForRoom, full;
    private final long release, patchBytes, downloadedBytes, resumedBytes;
    private final String[] patches;

    // libnnpatch_jni makes it (proguard-rules.pro keeps this constructor)
    UpdateResult(int status, String fromBlake3, String toBlake3, String fromName, String toName, boolean hasRelease,
                 long release, String expires, boolean signed, String keyId, String[] patches, long patchBytes,
                 long downloadedBytes, long resumedBytes, boolean inPlace, boolean recovered, boolean inPlaceForRoom,
                 boolean full) {
        this.status = Status.values()[status];
        this.fromBlake3 = fromBlake3;
        this.toBlake3 = toBlake3;
        this.fromName = fromName;
        this.toName = toName;
        this.hasRelease = hasRelease;
        this.release = release;
        this.expires = expires;
        this.signed = signed;
        this.keyId = keyId;
        this.patches = patches;
        this.patchBytes = patchBytes;
        this.downloadedBytes = downloadedBytes;
        this.resumedBytes = resumedBytes;
        this.inPlace = inPlace;
        this.recovered = recovered;
        this.inPlaceForRoom = inPlaceForRoom;
        this.full = full;
    }

    public Status getStatus() { return status; }
    /** BLAKE3 (hex) of the model before the update. */
    public String getFromBlake3() { return fromBlake3; }
    /** BLAKE3 (hex) of the release's target. */
    public String getToBlake3() { return toBlake3; }
    /** The manifest's names of the two versions; "" when it names none. */
    public String getFromName() { return fromName; }
    public String getToName() { return toName; }
    /** The release number, or -1 when the manifest has none. */
    public long getRelease() { return hasRelease ? release : -1; }
    /** The manifest's expiry (ISO 8601), "" when none. */
    public String getExpires() { return expires; }
    /** The manifest was a signed envelope. */
    public boolean isSigned() { return signed; }
    /** The id of the key the signature was checked with; "" when none was. */
    public String getKeyId() { return keyId; }
    /** The patch files applied (or, with {@link #isFull()}, the whole target's file), in order. */
    public String[] getPatches() { return patches.clone(); }
    public long getPatchBytes() { return patchBytes; }
    /** Bytes fetched by this call (resumed downloads count only what came now). */
    public long getDownloadedBytes() { return downloadedBytes; }
    /** Bytes a partial download from an earlier try already held. */
    public long getResumedBytes() { return resumedBytes; }
    public boolean isInPlace() { return inPlace; }
    /** An interrupted in-place update was rolled back first. */
    public boolean isRecovered() { return recovered; }
    /** In place although not asked for: only that fitted the free space. */
    public boolean isInPlaceForRoom() { return inPlaceForRoom; }
    /** The whole target was downloaded ({@link UpdateOptions#setFallbackFull}). */
    public boolean isFull() { return full; }

    @Override
    public String toString() {
        return status + " " + fromBlake3 + " -> " + toBlake3 + " release " + getRelease() + ", "
                + patches.length + " patch(es), " + downloadedBytes + " bytes fetched";
    }
}
