#!/usr/bin/env bash
# Set up zion on a Debian machine, idempotently:
#   - as root with apt: Debian's bcc (python3-bpfcc) and kernel headers for it (the
#     running kernel's if packaged, else linux-headers-amd64): they compile the demux
#     program once, here; with the test extras also what the tests drive zion with;
#   - .venv/ with zion and its test tools (EXTRAS=test, the default);
#   - Debian's bcc linked into .venv, alone: not the rest of dist-packages;
#   - the demux program compiled into zion/_data/objects (python -m zion.demux.objects),
#     which any later start loads without headers or LLVM.
# A server needs no test tools: EXTRAS= ./scripts/setup.sh (empty) installs only what
# serving needs (no browser, no HAProxy, no test packages).
# Without root or apt it says what to install and carries on: zion then serves on
# the kernel's reuseport hash.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${EXTRAS-test}  # unset: the test extras; set and empty: none
python=${PYTHON:-python3}

want=(python3-bpfcc)
# bpftool, capsh (libcap2-bin), curl: the demux tests and checks.
# chromium: the browser test (a page that opens wss:// back to zion).
# haproxy, iproute2: the load-balancer test (HAProxy in front of two zions, a
# client in a network namespace of its own).
# nghttp2-client: h2load against zion's HTTP/2.
# systemd-container, debootstrap: the test that boots config/zion.service under a
# real systemd (systemd-nspawn -b) in a cached Debian root.
# podman, runc: the test that runs zion in an OCI container under Podman's default
# seccomp profile (tests/deploy/); runc, as Debian 12's crun refuses hybrid cgroups.
if [[ ",$extras," == *",test,"* ]]; then
  want+=(bpftool libcap2-bin curl chromium haproxy iproute2 nghttp2-client
         systemd-container debootstrap podman runc)
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  missing=()
  # installed, not merely known: `dpkg -s` also succeeds for a package removed with
  # its configuration files left ("rc"), which apt would then never reinstall
  for p in "${want[@]}"; do
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null)" = installed ] || missing+=("$p")
  done
  release=$(uname -r)
  if [ ! -d "/lib/modules/$release/build/include" ] && ! ls -d /usr/src/linux-headers-*-common >/dev/null 2>&1; then
    missing+=("__headers__")
  fi
  if [ ${#missing[@]} -gt 0 ]; then
    echo "zion setup: installing ${missing[*]}" >&2
    apt-get update -qq
    pkgs=()
    for p in "${missing[@]}"; do
      if [ "$p" = "__headers__" ]; then
        # bcc compiles against kernel headers; the SK_REUSEPORT program needs only
        # uapi definitions, so Debian's generic headers serve a kernel with none.
        if apt-cache show "linux-headers-$release" >/dev/null 2>&1; then
          pkgs+=("linux-headers-$release")
        else
          pkgs+=(linux-headers-amd64)
        fi
      else
        pkgs+=("$p")
      fi
    done
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
  fi
else
  echo "zion setup: not root with apt-get; for the eBPF demux install: python3-bpfcc bpftool" \
       "linux-headers-\$(uname -r) (or linux-headers-amd64). zion serves without them." >&2
fi

if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
if [ -n "$extras" ]; then spec=".[${extras}]"; else spec="."; fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e "$spec"

# Debian's bcc is pure Python over libbcc.so; link just that package into .venv.
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ -d /usr/lib/python3/dist-packages/bcc ]; then
  ln -sfn /usr/lib/python3/dist-packages/bcc "$site/bcc"
fi
# Compile the demux program once, here (bcc, headers and bpf() are at hand as root):
# every later start loads the kept object, with or without headers.
if [ "$(id -u)" = 0 ] && [ -d "$site/bcc" ]; then
  .venv/bin/python -m zion.demux.objects >&2 || \
    echo "zion setup: the demux program was not compiled; a start with headers will" >&2
fi
echo "zion setup: ready ($(.venv/bin/zion --version))" >&2
