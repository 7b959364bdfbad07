#!/usr/bin/env bash
# Keel's one entry point for building, trying and testing.
set -euo pipefail
cd "$(dirname "$0")"

usage() {
    cat <<'USAGE'
usage: ./build.sh <command>

  quickstart   build in release mode, then run a server and one enrolled agent on
               127.0.0.1 (state in ./.keel-quickstart/) until Ctrl-C
  test         build and run every test, with formatting and lint checks
  package      BUILD_VERSION=1.2.3 ./build.sh package: deb and rpm packages of
               keel-agent and keel-server in output/
  bench NAME   build in release mode and run a benchmark; NAME is one of:
                 dataflow   plugin -> agent -> mTLS -> server -> sink throughput,
                            against raw tonic streaming (optional: record count)
                 rollout    a plugin version to simulated agents over mTLS, with
                            and without batching (optional: agents, batch size)
                 keyrequest key lookups/s through the key-request plugin against
                            the MariaDB-backed providers, socket and exec, against
                            direct provider calls (optional: socket and exec
                            lookup counts; needs MariaDB and PyMySQL)
                 filedelivery  a delivery on the host (verify, decrypt, atomic
                            write) against a bare atomic write (optional: files,
                            bytes)
                 proxy      TLS inventory scans through an agent's proxy plugin
                            and tunnel, against direct handshakes (optional: scans)
                 scale      simulated agents held by keel-servers sharing one port,
                            on PostgreSQL and NATS JetStream, against a bare tonic
                            server (optional: agents, default 50000; servers, 3)
  help         this text
USAGE
}

cmd="${1:-help}"
case "$cmd" in
    quickstart)
        cargo build --release --workspace --bins
        exec target/release/keel-server quickstart --dir .keel-quickstart
        ;;
    test)
        cargo fmt --all -- --check
        cargo clippy --workspace --all-targets --quiet -- -D warnings
        # Two versions of the deb and rpm packages for the packaging tests; debug
        # builds are quick, and what is under test is the packaging.
        rm -rf target/test-packages
        for version in 1.0.0 1.0.1; do
            BUILD_VERSION="$version" CARGO_PROFILE=dev OUTPUT_DIR=target/test-packages packaging/package.sh >/dev/null
        done
        # The end-to-end tests run the real binaries.
        cargo build --workspace --bins --quiet
        # Every test with the registry on SQLite, the embedded default (the cluster
        # tests use PostgreSQL and NATS whatever this says: KEEL_TEST_POSTGRES,
        # KEEL_TEST_NATS, default the local services).
        KEEL_TEST_STORE=sqlite KEEL_TEST_PACKAGES="$PWD/target/test-packages" cargo test --workspace
        # The registry's own tests and every end-to-end test again on PostgreSQL,
        # a schema per test.
        KEEL_TEST_STORE=postgres cargo test -p keel-server -p keel-tests
        ;;
    package)
        exec packaging/package.sh
        ;;
    bench)
        name="${2:-}"
        case "$name" in
            dataflow | rollout | keyrequest | filedelivery | proxy | scale) ;;
            *)
                echo "build.sh: bench needs a benchmark name: dataflow, rollout, keyrequest, filedelivery, proxy or scale" >&2
                exit 64
                ;;
        esac
        cargo build --release --workspace --bins --quiet
        exec target/release/keel-bench "$name" "${@:3}"
        ;;
    help | -h | --help)
        usage
        ;;
    *)
        echo "build.sh: unknown command: $cmd" >&2
        usage >&2
        exit 64
        ;;
esac
