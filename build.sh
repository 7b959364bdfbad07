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
                 console    the console's API requests against 50,000 agents on
                            PostgreSQL, against 500 (optional: agents)
                 footprint  memory and CPU of an idle agent and its three plugins
                            (the dist profile's binaries, run by a quickstart),
                            against a bare tokio runtime (optional: settle and
                            measure seconds, default 30 and 120)
                 scale      simulated agents held by keel-servers sharing one port,
                            on PostgreSQL and NATS JetStream, against a bare tonic
                            server (optional: agents, default 50000; servers, 3)
  fuzz [SECS]  build the cargo-fuzz targets in fuzz/ and run each for SECS seconds
               (default 60), one after another on one core, then schemathesis
               against the HTTP API for as long; prints executions and failures
               per target and exits non-zero if any failed (crashing inputs in
               fuzz/artifacts/<target>/)
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
            footprint)
                # The packages' binaries: the dist profile, built as ./build.sh package
                # builds them (each side on its own); and the baseline's keel-bench
                # in the same profile, beside them.
                packaging/build-bins.sh dist
                cargo build --profile dist -p keel-tests --bin keel-bench --quiet
                export KEEL_FOOTPRINT_BIN_DIR="$PWD/target/dist"
                ;;
            dataflow | rollout | keyrequest | filedelivery | proxy | console | scale) ;;
            *)
                echo "build.sh: bench needs a benchmark name: dataflow, rollout, keyrequest, filedelivery, proxy, console, footprint or scale" >&2
                exit 64
                ;;
        esac
        cargo build --release --workspace --bins --quiet
        exec target/release/keel-bench "$name" "${@:3}"
        ;;
    fuzz)
        seconds="${2:-60}"
        if ! [[ "$seconds" =~ ^[1-9][0-9]*$ ]]; then
            echo "build.sh: fuzz takes a number of seconds per target, not: $seconds" >&2
            exit 64
        fi
        if ! cargo fuzz --version >/dev/null 2>&1; then
            cargo install cargo-fuzz --locked
        fi
        # libFuzzer needs unstable flags (-Zsanitizer, sancov): nightly if installed,
        # else the stable compiler with RUSTC_BOOTSTRAP.
        if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
            fuzz=(cargo +nightly fuzz)
        else
            fuzz=(env RUSTC_BOOTSTRAP=1 cargo fuzz)
        fi
        # address (the default), or none where the sanitizer runtime is missing.
        sanitizer="${KEEL_FUZZ_SANITIZER:-address}"
        "${fuzz[@]}" build --fuzz-dir fuzz --sanitizer "$sanitizer"
        mapfile -t targets < <("${fuzz[@]}" list --fuzz-dir fuzz)
        summary="fuzz seconds=$seconds"
        crashes=0
        for target in "${targets[@]}"; do
            # New inputs go to the working corpus under fuzz/target (not in git);
            # fuzz/corpus/<target> holds the seeds and is only read.
            work="fuzz/target/corpus/$target"
            log="fuzz/target/logs/$target.log"
            mkdir -p "$work" "fuzz/corpus/$target" "$(dirname "$log")"
            status=ok
            if ! "${fuzz[@]}" run --fuzz-dir fuzz --sanitizer "$sanitizer" "$target" "$work" "fuzz/corpus/$target" -- \
                -max_total_time="$seconds" -timeout=30 -print_final_stats=1 >"$log" 2>&1; then
                status=crashed
                crashes=$((crashes + 1))
            fi
            execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
            if [[ "$status" == ok ]]; then
                echo "fuzz $target: ${execs:-0} executions in ${seconds}s, no crash (log: $log)"
            else
                echo "fuzz $target: CRASHED after ${execs:-0} executions (log: $log)"
            fi
            if [[ "$status" == crashed ]]; then
                grep -E '^(thread .* panicked|==[0-9]+==ERROR|SUMMARY:|Test unit written to|artifact_prefix)' "$log" | head -n 8 | sed 's/^/    /' || true
            fi
            summary+=" $target=${execs:-0}"
        done
        # The HTTP API from its own OpenAPI document, against a quickstart server.
        cargo build --workspace --bins --quiet
        api=ok
        if ! fuzz/schemathesis/run.sh "$seconds" >fuzz/target/logs/schemathesis.log 2>&1; then
            api=failed
            crashes=$((crashes + 1))
            tail -n 40 fuzz/target/logs/schemathesis.log | sed 's/^/    /'
        fi
        cases=$(sed -n 's/^ *\([0-9]*\) generated.*/\1/p' fuzz/target/logs/schemathesis.log | tail -n 1)
        echo "fuzz schemathesis: ${cases:-0} API calls in ${seconds}s, $api (log: fuzz/target/logs/schemathesis.log)"
        summary+=" schemathesis=${cases:-0}"
        echo "$summary crashes=$crashes"
        [[ "$crashes" -eq 0 ]]
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
