#!/bin/sh
# What the native applier's build and tests need on Debian 12, installed with
# apt-get only when something is missing (a machine that has it all never
# touches the network). Run by `make test`, never by `make demo`. Not root, or
# no apt-get: say what is missing and go on; the native tests then fail one by one.
set -u

# host build (g++ only checks that nnpatch.h compiles as C++), ASan/UBSan build, libFuzzer
# (clang + compiler-rt), aarch64 cross build and qemu; the suites' tools: /usr/bin/time
# (peak RSS), b3sum (BLAKE3 cross-check)
PKGS="make gcc g++ libc6-dev binutils libzstd-dev libsodium-dev libcurl4-openssl-dev clang libclang-rt-14-dev \
gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user cmake time b3sum"
ARM64_PKGS="libzstd-dev:arm64 libsodium-dev:arm64"

# (with a foreign architecture added, Multi-Arch: same packages need the :arch suffix)
have() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'ok installed' ||
        dpkg-query -W -f='${Status}' "$1:$(dpkg --print-architecture)" 2>/dev/null | grep -q 'ok installed'
}

command -v dpkg >/dev/null 2>&1 || { echo "native deps: not a Debian system (no dpkg); install a C99 compiler, libzstd, libsodium, clang, a JDK, gcc-aarch64-linux-gnu and qemu-user by hand"; exit 0; }

missing=""
for p in $PKGS; do have "$p" || missing="$missing $p"; done
# a JDK (javac): any Debian OpenJDK will do; default-jdk-headless when none is there
command -v javac >/dev/null 2>&1 || missing="$missing default-jdk-headless"
arm64=""
for p in $ARM64_PKGS; do have "$p" || arm64="$arm64 $p"; done

if [ -z "$missing$arm64" ]; then
    echo "native deps: all present"
    exit 0
fi

# What each missing package is for, said before anything is installed (issue 27: set-up asks first).
why() {
    case "$1" in
        make|gcc|libc6-dev|binutils|libzstd-dev|libsodium-dev) echo "build libnnpatch and nnpatch-apply" ;;
        libcurl4-openssl-dev) echo "nnpatch-update's HTTP client (libcurl: TLS, redirects, proxies; only the command links it)" ;;
        g++) echo "check that nnpatch.h compiles as C++" ;;
        clang|libclang-rt-14-dev) echo "the AddressSanitizer/UBSan build and the libFuzzer harnesses" ;;
        gcc-aarch64-linux-gnu|libc6-dev-arm64-cross|qemu-user|*:arm64) echo "the aarch64 build, run under qemu-user" ;;
        default-jdk-headless) echo "the JNI binding's tests (javac, java)" ;;
        cmake) echo "building README's Android CMake recipe (with the aarch64 compiler) to count its exports" ;;
        time) echo "peak-memory checks (/usr/bin/time)" ;;
        b3sum) echo "the BLAKE3 cross-check against b3sum" ;;
        *) echo "the native suites" ;;
    esac
}
echo "native deps: make test needs these Debian packages for the native applier's suites:"
for p in $missing $arm64; do echo "  $p: $(why "$p")"; done
if [ -n "$arm64" ] && ! dpkg --print-foreign-architectures 2>/dev/null | grep -qx arm64; then
    echo "  (and adds arm64 as a dpkg architecture, for the arm64 libraries above)"
fi
if [ -n "${NNPATCH_DEPS_DRY_RUN:-}" ]; then
    echo "native deps: NNPATCH_DEPS_DRY_RUN is set: nothing installed"
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "native deps: not root (or no apt-get): skipping apt; install them to run the native tests"
    exit 0
fi
echo "native deps: installing them with apt-get (and what they depend on)"

export DEBIAN_FRONTEND=noninteractive
if [ -n "$arm64" ] && ! dpkg --print-foreign-architectures | grep -qx arm64; then
    dpkg --add-architecture arm64
fi
apt-get update -q || { echo "native deps: apt-get update failed" >&2; exit 1; }
# shellcheck disable=SC2086
apt-get install -y -q --no-install-recommends $missing $arm64 </dev/null || {
    echo "native deps: apt-get install failed" >&2; exit 1; }
