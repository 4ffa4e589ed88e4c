#!/usr/bin/env bash
# Runs the whole test suite: builds everything (the kernel from its cache
# when its inputs are unchanged), checks formatting and lints, then runs
# every test, the end-to-end boots on the real /dev/kvm included.
#
# The test binaries run in two lanes at once. A VM test keeps one host CPU
# busy with its vCPU (under PVM the guest kernel is emulated) and leaves the
# other mostly idle; each binary lets one VM run at a time
# (`one_vm_at_a_time`), so two lanes keep both CPUs of a 2-CPU host busy.
# Binaries are dealt to the lanes longest first, by the durations measured
# below (seconds, one lane); the soak test runs alone at the end, as it
# counts what the whole host holds.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
eval "$(bash scripts/build.sh)"
export RTV_KERNEL RTV_KERNEL_UP RTV_INITRAMFS RTV_TEST_INITRAMFS RTV_VMM
# The suite's pods and containers without a size of their own get 128 MiB
# and 1 vCPU (config/tiny.toml), not the shipped 2 GiB and 2 vCPUs: on a
# PVM host a 2 GiB guest's template takes ~50 s to make. The CRI test
# checks the shipped defaults with a handler of their own. Tests that
# need another file pass `--config` or a handler's ConfigPath.
export RTV_CONFIG="${RTV_CONFIG:-$root/config/tiny.toml}"
echo "[test] cargo fmt --check" >&2
cargo fmt --all -- --check
echo "[test] cargo clippy" >&2
cargo clippy --quiet --workspace --all-targets -- -D warnings
echo "[test] cargo test: building" >&2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cargo test --workspace --all-targets --no-run --message-format=json-render-diagnostics \
    > "$work/build.json"
# One line per test binary: package directory, binary, name.
python3 - "$work/build.json" > "$work/binaries" <<'PY'
import json, os, sys
for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("profile", {}).get("test") and m.get("executable"):
        pkg = os.path.dirname(m["manifest_path"])
        kind = m["target"]["kind"][0]
        name = m["target"]["name"] if kind == "test" else f'{m["target"]["name"]}({kind})'
        print(f'{pkg}\t{m["executable"]}\t{name}')
PY
# Measured seconds per binary (2026-12-07, one lane, Intel Xeon 2 cores PVM;
# cri, conformance_rtv and templates with the fault scenarios added since).
declare -A weight=(
    [cri]=720 [conformance_rtv]=570 [docker]=310 [containers_vm]=150 [templates]=170
    [ctr]=110 [virtiofs]=60 [jail]=50 [agent_vm]=50 [boot]=45 [containerd_rtv]=45
    [cri_restart]=80 [network_rtv]=27 [profile]=19 [cri_runc]=7
)
solo="soak"
lanes=2
declare -a load=(0 0)
: > "$work/lane0"
: > "$work/lane1"
: > "$work/solo"
while IFS=$'\t' read -r w line; do
    name=${line##*$'\t'}
    if [ "$name" = "$solo" ]; then
        echo "$line" >> "$work/solo"
        continue
    fi
    best=0
    for ((i = 1; i < lanes; i++)); do
        if ((load[i] < load[best])); then best=$i; fi
    done
    load[best]=$((load[best] + w))
    echo "$line" >> "$work/lane$best"
done < <(while IFS=$'\t' read -r pkg exe name; do
    printf '%s\t%s\t%s\t%s\n' "${weight[$name]:-2}" "$pkg" "$exe" "$name"
done < "$work/binaries" | sort -t$'\t' -k1,1nr)

# Runs the binaries listed in $1, one after another, each from its
# package's directory as `cargo test` does; prints each one's output whole
# when it ends and records its status.
run_lane() {
    local list=$1 n=0 pkg exe name status
    while IFS=$'\t' read -r pkg exe name; do
        n=$((n + 1))
        local out="$list.$n.out"
        local start=$SECONDS
        set +e
        (cd "$pkg" && "$exe") > "$out" 2>&1 < /dev/null
        status=$?
        set -e
        echo "$status $name" >> "$work/status"
        {
            flock 9
            echo "     Running $name ($((SECONDS - start)) s, exit $status)"
            cat "$out"
        } 9> "$work/print.lock"
    done < "$list"
}

echo "[test] cargo test: running in $lanes lanes" >&2
: > "$work/status"
pids=()
for ((i = 0; i < lanes; i++)); do
    run_lane "$work/lane$i" &
    pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
run_lane "$work/solo"

# One closing line for the whole run, summed over every test binary.
cat "$work"/*.out | awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "%d passed, %d failed\n", p, f }'
failed=$(awk '$1 != 0 { print $2 " (exit " $1 ")" }' "$work/status")
if [ -n "$failed" ]; then
    echo "[test] failed binaries:" $failed >&2
    exit 1
fi
