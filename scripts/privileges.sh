# shellcheck shell=bash disable=SC2154  # $root: set by the script that sources this file
# Sourced (not run) by scripts/bootstrap.sh, scripts/test.sh and scripts/demo.sh, after they set
# $root to the checkout. Who does what: the build and .venv belong to the user who runs the script
# (`owner`); only what needs root (apt-get, namespaces and iptables, the test runs) is elevated,
# through sudo with that user's PATH kept, so the Swift toolchain on the user's PATH and .venv/bin
# are still found (sudo alone resets PATH to its secure_path). As root, commands just run.

# The owner: you; run as root through sudo, SUDO_USER when that user owns the checkout; else root.
if [ "$(id -u)" != 0 ]; then
  owner=$(id -un)
elif [ -n "${SUDO_USER:-}" ] && [ "$SUDO_USER" != root ] && [ "$(stat -c %U "$root")" = "$SUDO_USER" ]; then
  owner=$SUDO_USER
else
  owner=root
fi
owner_uid=$(id -u "$owner")
owner_gid=$(id -g "$owner")
owner_home=$(getent passwd "$owner" | cut -d: -f6)
# Root working in another user's checkout: git (SwiftPM's package checkouts) would refuse it.
git_safe=(GIT_CONFIG_COUNT=1 GIT_CONFIG_KEY_0=safe.directory GIT_CONFIG_VALUE_0='*')
if [ "$(id -u)" = 0 ] && [ "$owner_uid" != 0 ]; then export "${git_safe[@]}"; fi

# need_sudo SCRIPT WHY: as root, nothing; else fail at once, saying what to do, unless sudo works.
need_sudo() {
  [ "$(id -u)" = 0 ] && return 0
  if ! command -v sudo >/dev/null 2>&1; then
    cat >&2 <<EOF
$1: $2, and you are not root and sudo is not installed. Either run it as root
(su -, then cd $root && bash scripts/$1.sh), or, as root, install sudo and allow yourself:
  apt-get install sudo && adduser $(id -un) sudo
then log in again and run: bash scripts/$1.sh
EOF
    exit 1
  fi
  sudo -v || {
    echo "$1: $2: sudo refused; ask for sudo rights (adduser $(id -un) sudo, as root) or run it as root" >&2
    exit 1
  }
}

# PATH for root's steps: yours (the toolchain, .venv/bin) plus the sbin directories root has.
root_path() {
  local p=$PATH d
  for d in /usr/local/sbin /usr/sbin /sbin; do
    case ":$p:" in *":$d:"*) ;; *) p="$p:$d" ;; esac
  done
  printf '%s' "$p"
}

# as_root COMMAND...: as root, keeping PATH (and the TRELLIS_*, RELEASE, CI and swiftly settings).
as_root() {
  if [ "$(id -u)" = 0 ]; then
    "$@"
    return
  fi
  local keep=("PATH=$(root_path)" "${git_safe[@]}") v
  for v in $(compgen -e); do
    case $v in TRELLIS_* | SWIFTLY_* | RELEASE | CI) keep+=("$v=${!v}") ;; esac
  done
  sudo env "${keep[@]}" "$@"
}

# as_owner COMMAND...: as the owner (from root through sudo: as SUDO_USER), PATH kept.
as_owner() {
  if [ "$(id -u)" = "$owner_uid" ]; then
    "$@"
  else
    runuser -u "$owner" -- env "HOME=$owner_home" "$@"
  fi
}

# find_swift SCRIPT: swift on PATH, or fail saying what to do. Run as root through sudo, PATH is
# sudo's secure_path: swift is then looked up in the login shell of the user who ran sudo, and
# root's, and its directory added to PATH.
find_swift() {
  command -v swift >/dev/null 2>&1 && return 0
  local who found=""
  if [ "$(id -u)" = 0 ]; then
    for who in ${SUDO_USER:-} root; do
      found=$(timeout 30 su -l "$who" -s /bin/bash -c 'command -v swift || bash -ic "command -v swift"' \
        </dev/null 2>/dev/null | tail -n 1) || true
      case $found in /*) [ -x "$found" ] && break ;; esac
      found=""
    done
  fi
  if [ -n "$found" ]; then
    PATH="$PATH:$(dirname "$found")"
    export PATH
    echo "$1: swift from $who's login PATH: $found"
    return 0
  fi
  echo "$1: swift is not on your PATH. Install the Swift toolchain (https://www.swift.org/install/linux/)," \
    "put its usr/bin on your PATH (e.g. in ~/.profile), log in again and run: bash scripts/$1.sh" >&2
  exit 1
}

# check_tools SCRIPT: swift as you; swift, envoy and python3 (with grpc) as root, as the test runs
# see them; and whether an unprivileged user (nobody) can run .venv's python3.
check_tools() {
  echo "$1: as $(id -un): swift $(command -v swift)"
  # shellcheck disable=SC2016  # expanded by root's shell
  as_root env PYTHONDONTWRITEBYTECODE=1 sh -c '
    for t in swift envoy python3; do
      command -v "$t" >/dev/null || { echo "$0: as root: $t is not on PATH=$PATH" >&2; exit 1; }
    done
    python3 -c "import grpc, grpc_health.v1.health_pb2" \
      || { echo "$0: as root: $(command -v python3) cannot import grpc: run scripts/bootstrap.sh" >&2; exit 1; }
    echo "$0: as root: swift $(command -v swift), envoy $(command -v envoy), python3 $(command -v python3) (grpc)"
  ' "$1"
  if ! as_root runuser -u nobody -- env PYTHONDONTWRITEBYTECODE=1 "$root/.venv/bin/python3" -c 'import grpc' \
    >/dev/null 2>&1; then
    echo "$1: warning: user nobody cannot run $root/.venv/bin/python3 (is a directory above it, such as your" \
      "home, not world-searchable?): tests that run Python fixtures as nobody would fail" >&2
  fi
}

# give_back: gives the owner back what root created in the checkout (test runs, a build as root).
give_back() {
  [ "$owner_uid" = 0 ] && return 0
  [ -n "$(find "$root" -xdev -uid 0 -print -quit 2>/dev/null)" ] || return 0
  echo "== giving $owner back the files root created in $root"
  as_root find "$root" -xdev -uid 0 -exec chown -h "$owner_uid:$owner_gid" {} + \
    || echo "warning: files owned by root are left in $root: sudo chown -R $owner: $root" >&2
}

# keep_sudo_alive / stop_sudo_keepalive: refresh sudo's timestamp during a long run, so that a
# password asked at the start is not asked again between the test runs (nothing as root).
sudo_keepalive=""
keep_sudo_alive() {
  [ "$(id -u)" = 0 ] && return 0
  (while kill -0 "$$" 2>/dev/null; do
    sudo -n -v 2>/dev/null || true
    sleep 60
  done) </dev/null >/dev/null 2>&1 &
  sudo_keepalive=$!
}
stop_sudo_keepalive() {
  if [ -n "$sudo_keepalive" ]; then kill "$sudo_keepalive" 2>/dev/null || true; fi
}
