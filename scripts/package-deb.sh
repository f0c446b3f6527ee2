#!/usr/bin/env bash
# Builds trellis_<version>_<arch>.deb with dpkg-deb: trellis-agent and trellis-pilot in /usr/bin,
# the systemd units, the SysV script, its logrotate file, default configuration (conffiles), and
# maintainer scripts that create the `trellis` user and enable the agent without starting it: no
# rule is installed until the operator starts the service. Upgrading over a running agent leaves
# it running: prerm does not stop it, postinst restarts it on the new version (drain, then start;
# with the fail-open gate no new connection fails meanwhile) only if it was running. remove and
# purge stop it (it removes its rules). A fleet installs it with `apt install ./trellis_*.deb`.
#
#   scripts/package-deb.sh [--bin-dir DIR] [--version V] [--out DIR] [--compress xz|gzip|none]
#
# --bin-dir  use already built binaries (default: build release binaries with the Swift standard
#            library linked in, so the package needs no Swift toolchain on the VM)
# --version  default: TrellisVersion.current (Sources/TrellisConfig/Version.swift)+git<date>.<commit>
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

bin_dir=""
version=""
out="$root/.build/deb"
compress=xz
while [ $# -gt 0 ]; do
  case "$1" in
    --bin-dir) bin_dir=${2:?--bin-dir needs a folder}; shift 2 ;;
    --version) version=${2:?--version needs a value}; shift 2 ;;
    --out) out=${2:?--out needs a folder}; shift 2 ;;
    --compress) compress=${2:?--compress needs xz, gzip or none}; shift 2 ;;
    -h | --help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "package-deb.sh: unknown option '$1' (try --help)" >&2; exit 2 ;;
  esac
done
case "$compress" in xz | gzip | none) ;; *) echo "package-deb.sh: --compress: expected xz, gzip or none, got '$compress'" >&2; exit 2 ;; esac
if [ -z "$version" ]; then
  version_file="$root/Sources/TrellisConfig/Version.swift"
  base=$(sed -n 's/^[[:space:]]*public static let current = "\([^"]*\)".*/\1/p' "$version_file" 2>/dev/null | head -n 1)
  [ -n "$base" ] || { echo "package-deb.sh: no version in $version_file; pass --version" >&2; exit 1; }
  commit=$(git -C "$root" log -1 --format=%cd.%h --date=format:%Y%m%d 2>/dev/null || true)
  version="$base${commit:++git$commit}"
fi
[[ "$version" =~ ^[0-9][A-Za-z0-9.+~-]*$ ]] || { echo "package-deb.sh: --version: not a Debian version: '$version'" >&2; exit 2; }
arch=$(dpkg --print-architecture)

if [ -z "$bin_dir" ]; then
  echo "== building release binaries (static Swift standard library)"
  bash "$root/scripts/build-release.sh" trellis-agent trellis-pilot
  bin_dir="$root/.build-static/release"
fi
for b in trellis-agent trellis-pilot; do
  [ -x "$bin_dir/$b" ] || { echo "package-deb.sh: $bin_dir/$b is missing" >&2; exit 1; }
done

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
pkg="$stage/trellis"
install -d "$pkg/DEBIAN" "$pkg/usr/bin" "$pkg/lib/systemd/system" "$pkg/etc/init.d" "$pkg/etc/default" \
  "$pkg/etc/logrotate.d" "$pkg/etc/trellis" "$pkg/usr/share/doc/trellis/examples"
install -m 0755 "$bin_dir/trellis-agent" "$bin_dir/trellis-pilot" "$pkg/usr/bin/"
# Debug sections are not shipped (symbol names stay, for backtraces).
strip --strip-debug "$pkg/usr/bin/trellis-agent" "$pkg/usr/bin/trellis-pilot"
for u in trellis-agent trellis-pilot; do
  sed 's#/usr/local/bin/#/usr/bin/#g' "$root/systemd/$u.service" >"$pkg/lib/systemd/system/$u.service"
  chmod 0644 "$pkg/lib/systemd/system/$u.service"
done
sed 's#^DAEMON=/usr/local/bin/#DAEMON=/usr/bin/#' "$root/init/trellis-agent" >"$pkg/etc/init.d/trellis-agent"
chmod 0755 "$pkg/etc/init.d/trellis-agent"
sed 's#/usr/local/bin/#/usr/bin/#' "$root/init/trellis-agent.default" >"$pkg/etc/default/trellis-agent"
install -m 0644 "$root/init/trellis-agent.logrotate" "$pkg/etc/logrotate.d/trellis-agent"
install -m 0644 "$root/init/agent.yaml" "$pkg/etc/trellis/agent.yaml"
install -m 0644 "$root/examples/mesh.yaml" "$pkg/etc/trellis/mesh.yaml"
install -m 0644 "$root/README.md" "$root/docs/vm-quickstart.md" "$pkg/usr/share/doc/trellis/"
install -m 0644 "$root"/examples/*.yaml "$pkg/usr/share/doc/trellis/examples/"

size=$(du -sk --exclude=DEBIAN "$pkg" | cut -f1)
cat >"$pkg/DEBIAN/control" <<CONTROL
Package: trellis
Version: $version
Architecture: $arch
Maintainer: Trellis developers <trellis@localhost>
Installed-Size: $size
Depends: iptables, util-linux, passwd, libnetfilter-queue1, libmnl0, libsqlite3-0
Recommends: logrotate
Section: net
Priority: optional
Homepage: https://github.com/trellis-mesh/trellis
Description: service mesh for Linux virtual machines
 trellis-agent captures a machine's traffic with iptables and runs it through
 an in-process proxy (routing, load balancing, resilience, metrics) without
 changing the programs; trellis-pilot is the control plane (registry, xDS v3).
CONTROL
cat >"$pkg/DEBIAN/conffiles" <<'CONFFILES'
/etc/trellis/agent.yaml
/etc/trellis/mesh.yaml
/etc/default/trellis-agent
/etc/init.d/trellis-agent
/etc/logrotate.d/trellis-agent
CONFFILES

# The SysV script, for the maintainer scripts of machines without systemd: through invoke-rc.d
# where a SysV init runs the machine (it honours policy-rc.d and the runlevel's links); directly
# where none does (a container or namespace whose agent was started by hand: invoke-rc.d cannot
# tell the runlevel there and refuses every action). Only `stop` and `try-restart` are asked for,
# and neither starts an agent that was not running.
sysv_helper='sysv() {
  if command -v invoke-rc.d >/dev/null 2>&1 && runlevel >/dev/null 2>&1; then
    invoke-rc.d trellis-agent "$1"
  else
    /etc/init.d/trellis-agent "$1"
  fi
}'

cat >"$pkg/DEBIAN/postinst" <<POSTINST
#!/bin/sh
set -e
$sysv_helper
POSTINST
cat >>"$pkg/DEBIAN/postinst" <<'POSTINST'
case "$1" in
  configure | abort-upgrade | abort-deconfigure | abort-remove) ;;
  *) exit 0 ;;
esac
if [ "$1" = configure ]; then
  if ! getent passwd trellis >/dev/null; then
    useradd --system --user-group --home-dir /var/lib/trellis --no-create-home --shell /usr/sbin/nologin trellis
  fi
  install -d -m 0750 -o trellis -g trellis /var/lib/trellis /var/log/trellis
  chown root:trellis /etc/trellis/agent.yaml /etc/trellis/mesh.yaml
  chmod 0640 /etc/trellis/agent.yaml /etc/trellis/mesh.yaml
fi
# Enabled for the next boot (unless the operator disabled it), not started: no capture rule exists
# until the operator starts it. As debhelper does: unmask what postrm masked on remove.
if command -v deb-systemd-helper >/dev/null; then
  deb-systemd-helper unmask trellis-agent.service >/dev/null || true
  if deb-systemd-helper --quiet was-enabled trellis-agent.service; then
    deb-systemd-helper enable trellis-agent.service >/dev/null || true
  else
    deb-systemd-helper update-state trellis-agent.service >/dev/null || true
  fi
fi
if [ -d /run/systemd/system ]; then systemctl --system daemon-reload >/dev/null || true; fi
if command -v update-rc.d >/dev/null; then update-rc.d trellis-agent defaults >/dev/null || true; fi
if [ -z "${2:-}" ]; then
  echo "trellis: edit /etc/trellis/agent.yaml, then: systemctl start trellis-agent (or /etc/init.d/trellis-agent start)"
  exit 0
fi
# An upgrade: prerm left the agent running on the old binary. Restart it only if it runs (drain,
# then the new version binds its listeners before it installs its rules; with the fail-open gate,
# new connections go directly meanwhile), and only if the new version accepts the configuration:
# otherwise the old agent keeps running, as it was.
if [ -d /run/systemd/system ]; then
  if systemctl --quiet is-active trellis-agent.service; then
    if /usr/bin/trellis-agent check --config /etc/trellis/agent.yaml >/dev/null; then
      deb-systemd-invoke try-restart trellis-agent.service \
        || echo "trellis: restarting trellis-agent failed: see journalctl -u trellis-agent" >&2
    else
      echo "trellis: /etc/trellis/agent.yaml is invalid for this version (above): trellis-agent was not restarted and still runs the previous version; fix the file, then: systemctl restart trellis-agent" >&2
    fi
  fi
  deb-systemd-invoke try-restart trellis-pilot.service >/dev/null || true
elif [ -x /etc/init.d/trellis-agent ]; then
  # try-restart checks the configuration with the new binary before it stops a running agent.
  sysv try-restart || echo "trellis: restarting trellis-agent failed (above; /var/log/trellis/agent.log)" >&2
fi
exit 0
POSTINST

cat >"$pkg/DEBIAN/prerm" <<'PRERM'
#!/bin/sh
set -e
# upgrade: nothing is stopped; the agent keeps capturing while the files are replaced and the new
# postinst restarts it. remove and deconfigure: stopping drains the agent and removes every capture
# rule it installed. Done directly, not through deb-systemd-invoke or invoke-rc.d: no policy
# (policy-rc.d) may keep a program whose binary is going away running with its rules.
case "$1" in
  remove | deconfigure)
    if [ -d /run/systemd/system ]; then
      systemctl stop trellis-agent.service trellis-pilot.service || true
    elif [ -x /etc/init.d/trellis-agent ]; then
      /etc/init.d/trellis-agent stop || true
    fi
    # Whatever a killed agent left behind (only Trellis's own chains and rules).
    /usr/bin/trellis-agent rules uninstall >/dev/null 2>&1 || true
    ;;
esac
exit 0
PRERM
cat >"$pkg/DEBIAN/postrm" <<'POSTRM'
#!/bin/sh
set -e
case "$1" in
  remove)
    if command -v update-rc.d >/dev/null; then update-rc.d trellis-agent remove >/dev/null || true; fi
    if command -v deb-systemd-helper >/dev/null; then deb-systemd-helper mask trellis-agent.service >/dev/null || true; fi
    rm -rf /run/trellis
    ;;
  purge)
    if command -v update-rc.d >/dev/null; then update-rc.d trellis-agent remove >/dev/null || true; fi
    if command -v deb-systemd-helper >/dev/null; then
      deb-systemd-helper purge trellis-agent.service >/dev/null || true
      deb-systemd-helper unmask trellis-agent.service >/dev/null || true
    fi
    rm -rf /var/lib/trellis /var/log/trellis /run/trellis
    rmdir /etc/trellis 2>/dev/null || true
    if getent passwd trellis >/dev/null; then userdel trellis >/dev/null || true; fi
    if getent group trellis >/dev/null; then groupdel trellis >/dev/null || true; fi
    ;;
esac
if [ -d /run/systemd/system ]; then systemctl daemon-reload >/dev/null 2>&1 || true; fi
exit 0
POSTRM
chmod 0755 "$pkg/DEBIAN/postinst" "$pkg/DEBIAN/prerm" "$pkg/DEBIAN/postrm"

install -d "$out"
deb="$out/trellis_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Z"$compress" --build "$pkg" "$deb" >/dev/null
echo "$deb"
