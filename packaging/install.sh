#!/bin/sh
# Install egressd from this checkout on a Debian/Ubuntu host and start it restricting USER.
#
#   packaging/install.sh --user agent [--create-user] [--no-start]     (as root)
#
# Installs the Debian packages it needs, a venv in /opt/egressd, /usr/local/sbin/egressd,
# /usr/local/sbin/egressd-lockdown, /etc/egressd (kept if it exists), the systemd units
# (enabled), seeds /var/lib/egressd/restricted with USER's uid (for the boot-time lockdown),
# and starts the service (not with --no-start: then it starts at the next boot).
set -eu

usage() { echo "usage: $0 --user USER [--create-user] [--no-start]" >&2; exit 2; }
USER_NAME=""; CREATE=0; START=1
while [ $# -gt 0 ]; do
  case "$1" in
    --user) [ $# -ge 2 ] || usage; USER_NAME=$2; shift 2 ;;
    --create-user) CREATE=1; shift ;;
    --no-start) START=0; shift ;;
    *) usage ;;
  esac
done
[ -n "$USER_NAME" ] || usage
[ "$(id -u)" = 0 ] || { echo "install.sh: run as root" >&2; exit 1; }
SRC=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=/opt/egressd

if ! id -u "$USER_NAME" >/dev/null 2>&1; then
  if [ "$CREATE" = 1 ]; then
    # No subordinate uid/gid range (Debian's useradd gives every new user 65536 of them):
    # with uidmap installed, `unshare --map-auto` would let the user run processes as
    # those uids, which the owner match on the user's own uid does not see.
    useradd --create-home --shell /bin/bash -K SUB_UID_COUNT=0 -K SUB_GID_COUNT=0 "$USER_NAME"
    echo "install.sh: created user $USER_NAME, without subordinate uids/gids (/etc/subuid, /etc/subgid)"
  else
    echo "install.sh: no user '$USER_NAME' (add --create-user to create it)" >&2; exit 1
  fi
fi
USER_UID=$(id -u "$USER_NAME")
[ "$USER_UID" != 0 ] || { echo "install.sh: refusing to restrict root" >&2; exit 1; }
for f in /etc/subuid /etc/subgid; do
  range=$(awk -F: -v u="$USER_NAME" -v n="$USER_UID" '($1 == u || $1 == n) && $3 > 0 { print $2 "+" $3 }' "$f" 2>/dev/null | tr '\n' ' ')
  [ -z "$range" ] || echo "install.sh: warning: $USER_NAME has subordinate ids in $f ($range):" \
    "egressd restricts those uids too; remove the range if $USER_NAME does not need it"
done

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq iptables ipset conntrack python3 python3-venv python3-dev \
  gcc pkg-config libsystemd-dev >/dev/null

python3 -m venv "$PREFIX"
"$PREFIX/bin/pip" install -q --upgrade pip
"$PREFIX/bin/pip" install -q "$SRC[systemd]"
ln -sf "$PREFIX/bin/egressd" /usr/local/sbin/egressd
# Plain sh + iptables, so it works even when the venv does not (see the unit).
install -m 0755 "$SRC/packaging/egressd-lockdown" /usr/local/sbin/egressd-lockdown

# The uids the boot-time lockdown denies everything until egressd serves. egressd rewrites
# it after every successful install or reload; seeded here, before anything starts, so the
# very next boot is closed too. An existing file is egressd's and is kept.
STATE_DIR=/var/lib/egressd
if [ ! -e "$STATE_DIR/restricted" ]; then
  install -d -m 0755 "$STATE_DIR"
  printf '# Written by install.sh; egressd rewrites it with the uids it restricts.\n%s\n' \
    "$USER_UID" >"$STATE_DIR/restricted.tmp"
  chmod 0644 "$STATE_DIR/restricted.tmp"
  mv -f "$STATE_DIR/restricted.tmp" "$STATE_DIR/restricted"
  echo "install.sh: $STATE_DIR/restricted: uid $USER_UID is denied everything at boot until egressd serves"
fi

if [ ! -e /etc/egressd/egressd.toml ]; then
  mkdir -p /etc/egressd
  cp -r "$SRC/etc/egressd/." /etc/egressd/
  sed -i "s/^users = \[\"agent\"\]/users = [\"$USER_NAME\"]/" /etc/egressd/egressd.toml
else
  echo "install.sh: keeping the existing /etc/egressd/egressd.toml"
fi
egressd check-config --config /etc/egressd/egressd.toml

install -m 0644 "$SRC/systemd/egressd.service" /etc/systemd/system/egressd.service
install -m 0644 "$SRC/systemd/egressd-lockdown.service" \
  /etc/systemd/system/egressd-lockdown.service
# The unit's Documentation= points here.
install -D -m 0644 "$SRC/README.md" /usr/share/doc/egressd/README.md
install -D -m 0644 -t /usr/share/doc/egressd/docs "$SRC"/docs/*.md
# Enabled even with --no-start (this works offline too, e.g. in a chroot or an image
# build), so the next boot locks the user down before any network or login, and then
# starts egressd.
if command -v systemctl >/dev/null 2>&1; then
  [ ! -d /run/systemd/system ] || systemctl daemon-reload
  systemctl enable --quiet egressd-lockdown.service egressd.service
fi
[ "$START" = 1 ] || { echo "install.sh: installed and enabled; not started (--no-start)"; exit 0; }

if [ -d /run/systemd/system ]; then
  systemctl restart egressd.service
  systemctl is-active --quiet egressd.service
  echo "install.sh: egressd is running; $USER_NAME is restricted. Follow it with: journalctl -u egressd -f"
else
  # No systemd as PID 1 (a container): run it in the background, events to a log file.
  setsid /usr/local/sbin/egressd run --config /etc/egressd/egressd.toml --log json \
    >>/var/log/egressd.log 2>&1 < /dev/null &
  echo $! > /run/egressd.pid
  sleep 2
  kill -0 "$(cat /run/egressd.pid)" || { tail -n 20 /var/log/egressd.log >&2; exit 1; }
  echo "install.sh: systemd is not running here; egressd runs as pid $(cat /run/egressd.pid), log in /var/log/egressd.log"
fi
