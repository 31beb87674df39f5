#!/usr/bin/env bash
# Build (once) the Debian 12 root the systemd-nspawn tests boot, under
# /var/cache/zion-test/ so every run on this machine reuses it. The mirror is
# the machine's own configured Debian mirror (deb822 URIs: or a deb line).
# Usage: nspawn_root.sh <target dir>. Prints nothing on success but the path.
set -euo pipefail
target=$1
# One build at a time: the Podman test and the systemd test may ask at once
# (pytest-xdist runs their modules on different workers); the second waits and
# then finds the root complete.
mkdir -p "$(dirname "$target")"
exec 9>"$target.lock"
flock 9
[ -x "$target/lib/systemd/systemd" ] && [ -e "$target/.zion-root-complete" ] && { echo "$target"; exit 0; }

mirror=""
for f in /etc/apt/sources.list.d/*.sources; do
  [ -e "$f" ] || continue
  # first URIs: line of a stanza whose Suites: names bookworm (not -security)
  mirror=$(awk '/^URIs:/{u=$2} /^Suites:/{ for(i=2;i<=NF;i++) if ($i=="bookworm") {print u; exit} }' "$f")
  [ -n "$mirror" ] && break
done
if [ -z "$mirror" ] && [ -e /etc/apt/sources.list ]; then
  mirror=$(awk '$1=="deb" && $3=="bookworm" {print $2; exit}' /etc/apt/sources.list)
fi
[ -n "$mirror" ] || { echo "no bookworm mirror in /etc/apt/sources.list*" >&2; exit 1; }

# What serving and the test need inside; python3-bpfcc, bpftool, libcap2-bin and
# linux-headers-amd64 are what scripts/setup.sh would install (present already,
# so set-up there needs no apt run).
include=systemd,systemd-sysv,dbus,python3,python3-venv,python3-pip,python3-bpfcc,bpftool,libcap2-bin,curl,ca-certificates,linux-headers-amd64,procps
tmp="$target.tmp.$$"
rm -rf "$tmp"
mkdir -p "$(dirname "$target")"
debootstrap --variant=minbase --include="$include" bookworm "$tmp" "$mirror" >&2
# A machine id, no root password prompt, no getty to hold the console.
systemd-machine-id-setup --root="$tmp" >&2 || true
rm -f "$tmp/etc/systemd/system/getty.target.wants/"* 2>/dev/null || true
touch "$tmp/.zion-root-complete"
rm -rf "$target"
mv "$tmp" "$target"
echo "$target"
