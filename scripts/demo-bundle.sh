#!/usr/bin/env bash
# Makes an OCI bundle with a busybox root file system (Debian's
# busybox-static) in DIR, with `rtv spec`'s config.json running ARGS.
#   demo-bundle.sh DIR RTV ARGS...
set -euo pipefail
dir=$1 rtv=$2
shift 2
rm -rf "$dir"
mkdir -p "$dir/rootfs/bin" "$dir/rootfs/etc" "$dir/rootfs/tmp"
cp /bin/busybox "$dir/rootfs/bin/busybox"
for applet in $(/bin/busybox --list); do
  [ "$applet" = busybox ] || ln -sf busybox "$dir/rootfs/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$dir/rootfs/etc/passwd"
printf 'root:x:0:\n' >"$dir/rootfs/etc/group"
"$rtv" spec --bundle "$dir"
# The command, without a terminal (the demo's output goes to a log too).
args=""
for a in "$@"; do
  a=${a//\\/\\\\}
  a=${a//\"/\\\"}
  args+="\"$a\", "
done
while IFS= read -r line; do
  if [[ $line == *'"args": ["sh"]'* ]]; then
    printf '    "args": [%s],\n' "${args%, }"
  else
    printf '%s\n' "${line/\"terminal\": true/\"terminal\": false}"
  fi
done <"$dir/config.json" >"$dir/config.json.new"
mv "$dir/config.json.new" "$dir/config.json"
