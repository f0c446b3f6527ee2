#!/usr/bin/env bash
# Installs the Trellis node agent (and, with --with-pilot, the control plane) on this machine:
# binaries, the `trellis` system user, /etc/trellis, /var/lib/trellis, /var/log/trellis, the
# systemd units or the SysV script (with /etc/logrotate.d/trellis-agent for its log), then enables
# and starts the agent.
#
#   sudo init/install.sh [--bin-dir DIR] [--prefix /usr/local] [--with-pilot] [--no-start]
#
# --bin-dir  where the built binaries are (default: .build-static/release, built here with the Swift
#            standard library linked in if missing)
# --no-start install and enable, but do not start (nothing is captured until it starts)
# Over a running agent (an upgrade) it is restarted on the new binary once the new binary accepts
# /etc/trellis/agent.yaml (drain, then start; with the fail-open gate no new connection fails), with
# or without --no-start. An existing configuration is never overwritten. Undo with
# init/uninstall.sh [--purge].
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

bin_dir=""
prefix=/usr/local
with_pilot=0
start=1
while [ $# -gt 0 ]; do
  case "$1" in
    --bin-dir) bin_dir=${2:?--bin-dir needs a folder}; shift 2 ;;
    --prefix) prefix=${2:?--prefix needs a folder}; shift 2 ;;
    --with-pilot) with_pilot=1; shift ;;
    --no-start) start=0; shift ;;
    -h | --help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option '$1' (try --help)" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "install.sh: run as root (sudo)" >&2; exit 1; }

binaries=(trellis-agent)
[ $with_pilot = 1 ] && binaries+=(trellis-pilot)
if [ -z "$bin_dir" ]; then
  bin_dir="$root/.build-static/release"
  for b in "${binaries[@]}"; do
    if [ ! -x "$bin_dir/$b" ]; then
      echo "== building $b (release, standard library linked in)"
      bash "$root/scripts/build-release.sh" "$b"
    fi
  done
fi
for b in "${binaries[@]}"; do
  [ -x "$bin_dir/$b" ] || { echo "install.sh: $bin_dir/$b is missing; build it or pass --bin-dir" >&2; exit 1; }
done

# An agent already running here (an upgrade) is restarted at the end, and only then.
systemd=0
[ -d /run/systemd/system ] && systemd=1
was_running=0
if [ $systemd = 1 ]; then
  systemctl --quiet is-active trellis-agent 2>/dev/null && was_running=1
elif [ -x /etc/init.d/trellis-agent ]; then
  /etc/init.d/trellis-agent status >/dev/null 2>&1 && was_running=1
fi

echo "== user and folders"
if ! getent passwd trellis >/dev/null; then
  useradd --system --user-group --home-dir /var/lib/trellis --no-create-home --shell /usr/sbin/nologin trellis
  echo "created system user trellis (uid $(id -u trellis))"
fi
install -d -m 0755 /etc/trellis
install -d -m 0750 -o trellis -g trellis /var/lib/trellis /var/log/trellis
if [ ! -e /etc/trellis/agent.yaml ]; then
  install -m 0640 -o root -g trellis "$root/init/agent.yaml" /etc/trellis/agent.yaml
  echo "wrote /etc/trellis/agent.yaml (edit pilot and services, then reload or start the agent)"
else
  echo "kept the existing /etc/trellis/agent.yaml"
fi
if [ $with_pilot = 1 ] && [ ! -e /etc/trellis/pilot.yaml ]; then
  install -m 0640 -o root -g trellis "$root/examples/pilot.yaml" /etc/trellis/pilot.yaml
  echo "wrote /etc/trellis/pilot.yaml (the SQLite store; docs/ha.md for several pilots on etcd)"
fi
if [ $with_pilot = 1 ] && [ ! -e /etc/trellis/mesh.yaml ]; then
  install -m 0640 -o root -g trellis "$root/examples/mesh.yaml" /etc/trellis/mesh.yaml
fi
# Checked by the new binary before it replaces anything: a running agent is left as it is.
"$bin_dir/trellis-agent" check --config /etc/trellis/agent.yaml >/dev/null \
  || { echo "install.sh: /etc/trellis/agent.yaml is invalid (see above); fix it and run again (nothing was replaced)" >&2; exit 1; }

echo "== binaries -> $prefix/bin"
install -d "$prefix/bin"
# Renamed into place: a running agent keeps its (old) file, and nothing ever runs a half-copied one.
for b in "${binaries[@]}"; do
  install -m 0755 "$bin_dir/$b" "$prefix/bin/.$b.new"
  mv -f "$prefix/bin/.$b.new" "$prefix/bin/$b"
done

units=(trellis-agent)
[ $with_pilot = 1 ] && units+=(trellis-pilot)
unit_dir=/etc/systemd/system
if [ $systemd = 1 ]; then
  echo "== systemd units -> $unit_dir"
  for u in "${units[@]}"; do
    sed "s#/usr/local/bin/#$prefix/bin/#g" "$root/systemd/$u.service" >"$unit_dir/$u.service"
  done
  systemctl daemon-reload
  for u in "${units[@]}"; do systemctl enable "$u"; done
  if [ $was_running = 1 ]; then
    echo "== restarting the running agent on the new binary (it drains first)"
    systemctl try-restart trellis-agent
    if [ $with_pilot = 1 ]; then systemctl try-restart trellis-pilot; fi
  fi
  if [ $start = 1 ]; then
    for u in "${units[@]}"; do systemctl start "$u"; done
    systemctl --no-pager status trellis-agent | head -n 5 || true
  fi
else
  echo "== no systemd running: SysV script -> /etc/init.d/trellis-agent"
  sed "s#^DAEMON=/usr/local/bin/#DAEMON=$prefix/bin/#" "$root/init/trellis-agent" >/etc/init.d/.trellis-agent.new
  chmod 0755 /etc/init.d/.trellis-agent.new
  mv -f /etc/init.d/.trellis-agent.new /etc/init.d/trellis-agent
  [ -e /etc/default/trellis-agent ] || install -m 0644 "$root/init/trellis-agent.default" /etc/default/trellis-agent
  # The agent's log is a file here: rotated daily (or past 100 MB), the agent told to reopen it.
  install -d /etc/logrotate.d
  install -m 0644 "$root/init/trellis-agent.logrotate" /etc/logrotate.d/trellis-agent
  if command -v update-rc.d >/dev/null; then update-rc.d trellis-agent defaults >/dev/null; fi
  if [ $with_pilot = 1 ]; then echo "note: trellis-pilot has a systemd unit only; start it by hand: trellis-pilot serve ..."; fi
  if [ $was_running = 1 ]; then
    echo "== restarting the running agent on the new binary (it drains first)"
    /etc/init.d/trellis-agent try-restart
  elif [ $start = 1 ]; then
    /etc/init.d/trellis-agent start
  fi
fi
[ $start = 1 ] || [ $was_running = 1 ] || echo "installed; start with: systemctl start trellis-agent (or /etc/init.d/trellis-agent start)"
echo "done: $prefix/bin/trellis-agent status shows what the agent does"
