#!/usr/bin/env bash
# Removes what init/install.sh installed: stops the agent (it drains, then removes its capture
# rules), removes any Trellis rule still left, the units, the SysV script and the binaries.
# Configuration, state and logs (and the logrotate file for them) are kept unless --purge, which
# also removes the `trellis` user.
#
#   sudo init/uninstall.sh [--prefix /usr/local] [--purge]
set -euo pipefail

prefix=/usr/local
purge=0
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) prefix=${2:?--prefix needs a folder}; shift 2 ;;
    --purge) purge=1; shift ;;
    -h | --help) sed -n '2,7p' "$0"; exit 0 ;;
    *) echo "uninstall.sh: unknown option '$1' (try --help)" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "uninstall.sh: run as root (sudo)" >&2; exit 1; }

echo "== stopping"
if [ -d /run/systemd/system ]; then
  for u in trellis-agent trellis-pilot; do
    if [ -e "/etc/systemd/system/$u.service" ]; then
      systemctl disable --now "$u" || true
      rm -f "/etc/systemd/system/$u.service"
    fi
  done
  systemctl daemon-reload || true
else
  rm -f /etc/systemd/system/trellis-agent.service /etc/systemd/system/trellis-pilot.service
fi
if [ -e /etc/init.d/trellis-agent ]; then
  /etc/init.d/trellis-agent stop || true
  if command -v update-rc.d >/dev/null; then update-rc.d -f trellis-agent remove >/dev/null || true; fi
  rm -f /etc/init.d/trellis-agent
fi
# Whatever a crashed or killed agent left (only Trellis's own chains and rules are touched).
if [ -x "$prefix/bin/trellis-agent" ]; then
  "$prefix/bin/trellis-agent" rules uninstall || echo "uninstall.sh: removing leftover rules failed (see above)" >&2
fi
rm -f "$prefix/bin/trellis-agent" "$prefix/bin/trellis-pilot"
rm -rf /run/trellis

if [ $purge = 1 ]; then
  echo "== purging configuration, state, logs and the trellis user"
  rm -rf /etc/trellis /var/lib/trellis /var/log/trellis /etc/default/trellis-agent /etc/logrotate.d/trellis-agent
  if getent passwd trellis >/dev/null; then userdel trellis; fi
  if getent group trellis >/dev/null; then groupdel trellis; fi
else
  echo "kept /etc/trellis, /var/lib/trellis, /var/log/trellis and the trellis user (--purge removes them)"
fi
echo "done"
