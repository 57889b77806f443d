#!/usr/bin/env bash
# Coverage-guided fuzzing of the server's decoders and REST router (cargo-fuzz + libFuzzer; the
# targets are in fuzz/, their own workspace, built into fuzz/target).
#
#   scripts/fuzz.sh [--short | --replay] [TARGET...]
#
# Runs every target (or those named: v2_json v2_binary v1_json router) for FUZZ_SECONDS each
# (default 60) and exits 1 if any target crashed, hung or allocated past the limits, printing the
# reproducer's path and the command that replays it.
#   --short   FUZZ_SECONDS defaults to 5: a smoke run for tests (after a first, cold build).
#   --replay  no fuzzing: runs the committed seeds (fuzz/corpus/TARGET) and the working corpus once.
#
# Environment:
#   FUZZ_SECONDS          seconds per target (-max_total_time)
#   FUZZ_TOOLCHAIN        stable | nightly | auto (default auto: stable when it builds, else nightly)
#   FUZZ_SANITIZER        none (default; works on stable) | address (nightly only)
#   FUZZ_RSS_LIMIT_MB     libFuzzer -rss_limit_mb (default 2048)
#   FUZZ_MALLOC_LIMIT_MB  Rust heap growth allowed, MiB (default 256); also libFuzzer's -malloc_limit_mb
#                         (effective under a sanitizer) and the targets' own allocator guard
#   FUZZ_MAX_LEN          largest input, bytes (default 16384)
#
# cargo-fuzz is installed (pinned version, cached in ~/.cargo/bin) when `cargo fuzz --version`
# does not match. New inputs libFuzzer finds go to fuzz/target/corpus/TARGET (kept between runs,
# not committed); crashes to fuzz/artifacts/TARGET/ (git-ignored).
set -euo pipefail

CARGO_FUZZ_VERSION=0.13.2
ALL_TARGETS=(v2_json v2_binary v1_json router)

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
fuzz_dir="$root/fuzz"
mode=run
seconds="${FUZZ_SECONDS:-}"
targets=()
for arg in "$@"; do
    case "$arg" in
        --short) mode=short ;;
        --replay) mode=replay ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        -*)
            echo "fuzz.sh: unknown option $arg (see --help)" >&2
            exit 2
            ;;
        *)
            if [[ ! " ${ALL_TARGETS[*]} " == *" $arg "* ]]; then
                echo "fuzz.sh: unknown target $arg; targets: ${ALL_TARGETS[*]}" >&2
                exit 2
            fi
            targets+=("$arg")
            ;;
    esac
done
[[ ${#targets[@]} -gt 0 ]] || targets=("${ALL_TARGETS[@]}")
if [[ -z "$seconds" ]]; then
    if [[ $mode == short ]]; then seconds=5; else seconds=60; fi
fi
sanitizer="${FUZZ_SANITIZER:-none}"
rss_limit="${FUZZ_RSS_LIMIT_MB:-2048}"
malloc_limit="${FUZZ_MALLOC_LIMIT_MB:-256}"
max_len="${FUZZ_MAX_LEN:-16384}"
# Build output stays in fuzz/target whatever the caller's environment says.
export CARGO_TARGET_DIR="$fuzz_dir/target"

# --- cargo-fuzz ------------------------------------------------------------------------------------
if [[ "$(cargo fuzz --version 2>/dev/null || true)" != "cargo-fuzz $CARGO_FUZZ_VERSION" ]]; then
    echo "fuzz.sh: installing cargo-fuzz $CARGO_FUZZ_VERSION (cargo install --locked)" >&2
    cargo install --locked "cargo-fuzz@$CARGO_FUZZ_VERSION"
fi

# --- toolchain -------------------------------------------------------------------------------------
# cargo-fuzz passes only -C flags (sancov) unless a sanitizer is asked for, which needs -Zsanitizer:
# stable builds with --sanitizer none; nightly is the fallback (and needed for address).
have_rustup=false
command -v rustup >/dev/null 2>&1 && have_rustup=true
cargo_fuzz() {
    # $1: toolchain (empty: cargo's default), then cargo-fuzz arguments.
    local tc="$1"
    shift
    if [[ -n "$tc" ]] && $have_rustup; then
        cargo "+$tc" fuzz "$@"
    else
        cargo fuzz "$@"
    fi
}
build() {
    # `cargo fuzz build` takes one target, or none for all of them.
    local one=("${targets[@]}")
    [[ ${#targets[@]} -eq ${#ALL_TARGETS[@]} ]] && one=("")
    local t
    for t in "${one[@]}"; do
        cargo_fuzz "$1" build --fuzz-dir "$fuzz_dir" --target-dir "$CARGO_TARGET_DIR" -s "$sanitizer" ${t:+"$t"} || return 1
    done
}
want="${FUZZ_TOOLCHAIN:-auto}"
if [[ $want == auto && $sanitizer != none ]]; then want=nightly; fi
toolchain=""
case "$want" in
    stable | nightly)
        build "$want"
        toolchain="$want"
        ;;
    auto)
        if build stable; then
            toolchain=stable
        elif $have_rustup && rustup toolchain list | grep -q '^nightly'; then
            echo "fuzz.sh: the stable build failed; trying nightly" >&2
            build nightly
            toolchain=nightly
        else
            echo "fuzz.sh: the stable build failed and no nightly toolchain is installed" >&2
            exit 1
        fi
        ;;
    *)
        echo "fuzz.sh: FUZZ_TOOLCHAIN must be stable, nightly or auto" >&2
        exit 2
        ;;
esac
rustc_version="$( ($have_rustup && rustc "+$toolchain" --version) || rustc --version)"
echo "fuzz.sh: toolchain $toolchain ($rustc_version), sanitizer $sanitizer, cargo-fuzz $CARGO_FUZZ_VERSION"

# --- run -------------------------------------------------------------------------------------------
export KUBEMAAS_FUZZ_MALLOC_LIMIT_MB="$malloc_limit"
failed=()
for t in "${targets[@]}"; do
    work="$CARGO_TARGET_DIR/corpus/$t"
    artifacts="$fuzz_dir/artifacts/$t"
    log="$CARGO_TARGET_DIR/logs/$t.log"
    mkdir -p "$work" "$artifacts" "$(dirname "$log")"
    stamp="$(mktemp)"
    args=(-rss_limit_mb="$rss_limit" -malloc_limit_mb="$malloc_limit" -max_len="$max_len" -timeout=10
        -print_final_stats=1)
    if [[ -f "$fuzz_dir/dict/$t.dict" ]]; then args+=(-dict="$fuzz_dir/dict/$t.dict"); fi
    if [[ $mode == replay ]]; then
        args+=(-runs=0)
        what="replaying the corpus"
    else
        args+=(-max_total_time="$seconds")
        what="fuzzing for ${seconds}s"
    fi
    echo "fuzz.sh: $t: $what"
    rc=0
    # The working corpus comes first: libFuzzer writes what it finds there, never into the seeds.
    cargo_fuzz "$toolchain" run --fuzz-dir "$fuzz_dir" --target-dir "$CARGO_TARGET_DIR" -s "$sanitizer" \
        "$t" "$work" "$fuzz_dir/corpus/$t" -- "${args[@]}" >"$log" 2>&1 || rc=$?
    new="$(find "$artifacts" -type f -newer "$stamp" | sort)"
    rm -f "$stamp"
    last="$(grep -E '^#[0-9]+[[:space:]]+(DONE|INITED|pulse|NEW|REDUCE)' "$log" | tail -1 || true)"
    execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)"
    speed="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)"
    cov="$(sed -n 's/.* cov: \([0-9]*\) ft: \([0-9]*\) corp: \([^ ]*\).*/cov \1, features \2, corpus \3/p' <<<"$last")"
    if [[ $rc -ne 0 || -n "$new" ]]; then
        failed+=("$t")
        echo "fuzz.sh: $t FAILED (exit $rc); log: $log" >&2
        # The panic (and its message, on the next lines) or libFuzzer's verdict.
        grep -E -A3 '^(thread .* panicked|==kubemaas-fuzz==)' "$log" | head -20 >&2 || true
        grep -E '^(==[0-9]+== ERROR|SUMMARY)' "$log" | head -5 >&2 || true
        if [[ -z "$new" ]]; then
            tail -30 "$log" >&2
        fi
        for f in $new; do
            echo "fuzz.sh: reproducer: $f" >&2
            echo "fuzz.sh:   replay with: cargo +$toolchain fuzz run --fuzz-dir fuzz -s $sanitizer $t $f" >&2
        done
    else
        echo "fuzz.sh: $t ok: ${execs:-?} runs, ${speed:-?} exec/s, ${cov:-no coverage line}"
    fi
done

if [[ ${#failed[@]} -gt 0 ]]; then
    echo "fuzz.sh: ${#failed[@]} target(s) failed: ${failed[*]}" >&2
    exit 1
fi
echo "fuzz.sh: ${#targets[@]} target(s) passed"
