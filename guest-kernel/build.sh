#!/usr/bin/env bash
# Build (or fetch from the cache) rtv's guest kernel.
#
#   KERNEL=$(guest-kernel/build.sh)          # SMP (any number of vCPUs)
#   KERNEL_UP=$(guest-kernel/build.sh --up)  # uniprocessor: VMs with one vCPU
#
# stdout: only the absolute path of the vmlinux (PVH-bootable ELF), last line.
# stderr: progress.
#
# Source: Debian's linux-source-6.1 package (/usr/src/linux-source-6.1.tar.xz)
# + patches/*.patch + `make tinyconfig` + config.fragment (+ config-up.fragment
# with --up, whose options override) + `make olddefconfig`.
# Cache: ${RTV_CACHE_DIR:-$HOME/.cache/rtv}/kernel/<key>/{vmlinux,System.map,config,.config}, where
# <key> = sha256 over the linux-source package version, config.fragment,
# patches/* and this script (and, with --up, config-up.fragment). A cache entry counts only with both vmlinux and
# System.map (rtv-vmm --profile symbolizes with it). Concurrent invocations
# serialise on a flock.
#
# Environment:
#   RTV_CACHE_DIR         cache root (default $HOME/.cache/rtv)
#   RTV_KERNEL_JOBS       make -j value (default: nproc)
#   RTV_KERNEL_KEEP_BUILD=1  keep the build tree after a successful build
set -euo pipefail

# Everything but the final path goes to stderr.
exec 3>&1 1>&2

SRC_PKG=linux-source-6.1
SRC_TARBALL=/usr/src/linux-source-6.1.tar.xz
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SELF="$HERE/$(basename "${BASH_SOURCE[0]}")"
FRAGMENT="$HERE/config.fragment"
UP_FRAGMENT="$HERE/config-up.fragment"
PATCH_DIR="$HERE/patches"

log() { printf 'guest-kernel: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# The fragments merged over tinyconfig, later ones overriding earlier ones.
fragments=("$FRAGMENT")
case "${1:-}" in
"") ;;
--up) fragments+=("$UP_FRAGMENT") ;;
*) die "usage: build.sh [--up]" ;;
esac

# ---------------------------------------------------------------- deps
need_pkgs=()
for p in bc bison flex libelf-dev libssl-dev "$SRC_PKG" build-essential cpio; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        need_pkgs+=("$p")
    fi
done
if [ "${#need_pkgs[@]}" -gt 0 ]; then
    log "installing build dependencies: ${need_pkgs[*]}"
    SUDO=()
    if [ "$(id -u)" -ne 0 ]; then SUDO=(sudo); fi
    export DEBIAN_FRONTEND=noninteractive
    "${SUDO[@]}" apt-get update -qq
    "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}"
fi
[ -f "$SRC_TARBALL" ] || die "$SRC_TARBALL missing (package $SRC_PKG)"

# ---------------------------------------------------------------- cache key
src_version="$(dpkg-query -W -f='${Version}' "$SRC_PKG")"
shopt -s nullglob
patches=("$PATCH_DIR"/*.patch)
shopt -u nullglob
key="$(
    {
        printf 'linux-source-version %s\n' "$src_version"
        printf 'config.fragment %s\n' "$(sha256sum <"$FRAGMENT" | cut -d' ' -f1)"
        for p in "${patches[@]}"; do
            printf 'patch %s %s\n' "$(basename "$p")" "$(sha256sum <"$p" | cut -d' ' -f1)"
        done
        printf 'build.sh %s\n' "$(sha256sum <"$SELF" | cut -d' ' -f1)"
        for f in "${fragments[@]:1}"; do
            printf 'fragment %s %s\n' "$(basename "$f")" "$(sha256sum <"$f" | cut -d' ' -f1)"
        done
    } | sha256sum | cut -c1-32
)"

CACHE_ROOT="${RTV_CACHE_DIR:-$HOME/.cache/rtv}/kernel"
OUT="$CACHE_ROOT/$key"
cached() { [ -f "$OUT/vmlinux" ] && [ -f "$OUT/System.map" ]; }
if cached; then
    printf '%s\n' "$OUT/vmlinux" >&3
    exit 0
fi

mkdir -p "$CACHE_ROOT"
CACHE_ROOT="$(cd "$CACHE_ROOT" && pwd)"
OUT="$CACHE_ROOT/$key"
exec 9>"$CACHE_ROOT/.lock"
if ! flock -n 9; then
    log "another build holds $CACHE_ROOT/.lock, waiting"
    flock 9
fi
if cached; then # built by whoever held the lock
    printf '%s\n' "$OUT/vmlinux" >&3
    exit 0
fi

BUILD="$CACHE_ROOT/build-$key"
LOGFILE="$CACHE_ROOT/build-$key.log"
start=$SECONDS
log "cache miss (key $key, $SRC_PKG $src_version); building in $BUILD"
log "full build log: $LOGFILE"
rm -rf "$BUILD"
mkdir -p "$BUILD"
: >"$LOGFILE"
ok=0
cleanup() {
    if [ "$ok" != 1 ]; then
        log "build FAILED; last lines of $LOGFILE:"
        tail -n 40 "$LOGFILE" >&2 || true
        rm -rf "$BUILD"
    fi
}
trap cleanup EXIT

# ---------------------------------------------------------------- source
log "[1/5] extracting $SRC_TARBALL"
tar -xJf "$SRC_TARBALL" -C "$BUILD" --strip-components=1

log "[2/5] applying ${#patches[@]} patches"
for p in "${patches[@]}"; do
    log "  $(basename "$p")"
    patch -d "$BUILD" -p1 --forward --batch <"$p" >>"$LOGFILE" 2>&1 ||
        die "patch $(basename "$p") does not apply"
done

# ---------------------------------------------------------------- config
export KBUILD_BUILD_USER=rtv KBUILD_BUILD_HOST=rtv
export KBUILD_BUILD_TIMESTAMP="$src_version"
MAKE=(make -C "$BUILD" ARCH=x86_64)

log "[3/5] configuring: tinyconfig + $(for f in "${fragments[@]}"; do printf '%s + ' "$(basename "$f")"; done)olddefconfig"
"${MAKE[@]}" tinyconfig >>"$LOGFILE" 2>&1
(cd "$BUILD" && scripts/kconfig/merge_config.sh -m .config "${fragments[@]}") >>"$LOGFILE" 2>&1
"${MAKE[@]}" olddefconfig >>"$LOGFILE" 2>&1

# The options the fragments ask for, the last fragment's line for each symbol.
REQUIRED="$BUILD/.rtv-required-config"
cat "${fragments[@]}" | awk '
    /^CONFIG_[A-Za-z0-9_]*=/ { sym = $0; sub(/=.*/, "", sym) }
    /^# CONFIG_[A-Za-z0-9_]* is not set$/ { sym = $2 }
    /^CONFIG_[A-Za-z0-9_]*=/ || /^# CONFIG_[A-Za-z0-9_]* is not set$/ {
        if (!(sym in line)) order[n++] = sym
        line[sym] = $0
    }
    END { for (i = 0; i < n; i++) print line[order[i]] }' >"$REQUIRED"

# Verify: olddefconfig silently drops options whose dependencies are unmet.
missing=()
while IFS= read -r line; do
    case "$line" in
    CONFIG_*=*)
        grep -qxF -- "$line" "$BUILD/.config" || missing+=("$line (have: $(grep -E "^(# )?${line%%=*}[= ]" "$BUILD/.config" || echo unset))")
        ;;
    "# CONFIG_"*" is not set")
        sym="${line#\# }"
        sym="${sym%% *}"
        if grep -qE "^$sym=" "$BUILD/.config"; then
            missing+=("$line (have: $(grep -E "^$sym=" "$BUILD/.config"))")
        fi
        ;;
    esac
done <"$REQUIRED"
if [ "${#missing[@]}" -gt 0 ]; then
    for m in "${missing[@]}"; do log "config option not as required: $m"; done
    die "${#missing[@]} required config option(s) missing from the final .config"
fi
log "  all $(wc -l <"$REQUIRED") fragment options verified"

# ---------------------------------------------------------------- build
jobs="${RTV_KERNEL_JOBS:-$(nproc)}"
expected=0
[ -f "$CACHE_ROOT/.objcount" ] && expected="$(cat "$CACHE_ROOT/.objcount" 2>/dev/null || echo 0)"
[[ "$expected" =~ ^[0-9]+$ ]] && [ "$expected" -gt 0 ] || expected=950
log "[4/5] make -j$jobs vmlinux (~$expected objects, several minutes)"
set +e
"${MAKE[@]}" -j"$jobs" vmlinux 2>&1 | tee -a "$LOGFILE" | {
    n=0
    linked=0
    while IFS= read -r line; do
        case "$line" in
        "  CC "* | "  AS "*)
            n=$((n + 1))
            if [ $((n % 100)) -eq 0 ]; then
                pct=$((n * 100 / expected))
                [ "$pct" -le 99 ] || pct=99
                log "  $n objects compiled (~$pct%)"
            fi
            ;;
        "  LD      vmlinux"*)
            [ "$linked" = 1 ] || log "  linking vmlinux"
            linked=1
            ;;
        esac
    done
    echo "$n" >"$BUILD/.objcount"
}
rc=("${PIPESTATUS[@]}")
set -e
[ "${rc[0]}" -eq 0 ] || die "make vmlinux failed (exit ${rc[0]})"
[ -f "$BUILD/vmlinux" ] || die "make succeeded but $BUILD/vmlinux is missing"
[ -f "$BUILD/System.map" ] || die "make succeeded but $BUILD/System.map is missing"
cp "$BUILD/.objcount" "$CACHE_ROOT/.objcount" 2>/dev/null || true

# ---------------------------------------------------------------- install
log "[5/5] installing into $OUT"
mkdir -p "$OUT"
tmp="$OUT/.vmlinux.tmp.$$"
objcopy --strip-debug "$BUILD/vmlinux" "$tmp"
cp "$BUILD/.config" "$OUT/.config.tmp.$$"
cp "$BUILD/System.map" "$OUT/.System.map.tmp.$$"
mv -f "$OUT/.System.map.tmp.$$" "$OUT/System.map"
mv -f "$OUT/.config.tmp.$$" "$OUT/config"
ln -sfn config "$OUT/.config"
mv -f "$tmp" "$OUT/vmlinux"
ok=1
if [ "${RTV_KERNEL_KEEP_BUILD:-0}" = 1 ]; then
    log "keeping build tree $BUILD"
else
    rm -rf "$BUILD"
fi
log "done in $((SECONDS - start)) s: $OUT/vmlinux"
printf '%s\n' "$OUT/vmlinux" >&3
