#!/bin/sh
# Install egressd on a Debian 12 host as a Debian package and start it restricting USER.
#
#   packaging/install.sh --user USER [--create-user] [--preset NAME]... [--no-start] [--deb FILE]
#
# (as root). Steps, each said as it happens:
# 1. The package: FILE if given, else built from this checkout with packaging/build-deb
#    (the build tools it installs for that are removed again afterwards; the build
#    downloads egressd's vendored libraries from PyPI). `apt-get install` then brings its
#    dependencies from Debian (iptables, ipset, python3-systemd) and replaces an older
#    egressd (an upgrade: the restricted users stay restricted throughout).
# 2. USER (created with --create-user), named in the drop-in
#    /etc/egressd/conf.d/50-install.toml with the presets (--preset, repeatable, on top of
#    the default config's), never in the package's own conffiles. A drop-in there for
#    another user is kept, and this says so and fails before changing anything: it never
#    claims USER is restricted when it is not.
# 3. /var/lib/egressd/restricted seeded with USER's uid (the boot-time lockdown denies
#    it everything until egressd serves), egressd.service enabled and, unless --no-start,
#    started (enabled even with --no-start: it starts at the next boot).
#
# Remove it: `apt remove egressd` stops it (its rules stay: USER stays closed until the
# purge or a reboot); `apt purge egressd` also removes its rules, sets and /etc/egressd.
set -eu

usage() {
  echo "usage: $0 --user USER [--create-user] [--preset NAME]... [--no-start] [--deb FILE]" >&2
  exit 2
}
USER_NAME=""; CREATE=0; START=1; DEB=""; PRESETS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --user) [ $# -ge 2 ] || usage; USER_NAME=$2; shift 2 ;;
    --create-user) CREATE=1; shift ;;
    --preset) [ $# -ge 2 ] || usage; PRESETS="$PRESETS $2"; shift 2 ;;
    --no-start) START=0; shift ;;
    --deb) [ $# -ge 2 ] || usage; DEB=$2; shift 2 ;;
    *) usage ;;
  esac
done
[ -n "$USER_NAME" ] || usage
[ "$(id -u)" = 0 ] || { echo "install.sh: run as root" >&2; exit 1; }
say() { printf 'install.sh: %s\n' "$*"; }
for p in $PRESETS; do
  case "$p" in
    *[!a-z0-9-]* | -*) echo "install.sh: --preset $p: not a preset name" >&2; exit 2 ;;
  esac
done
case "$USER_NAME" in
  *[!A-Za-z0-9._-]* | -*) echo "install.sh: --user $USER_NAME: not a user name" >&2; exit 2 ;;
esac
SRC=$(cd "$(dirname "$0")/.." && pwd)
DROPIN=/etc/egressd/conf.d/50-install.toml
export DEBIAN_FRONTEND=noninteractive

# ---- 0. nothing changes when a drop-in there restricts somebody else
# The users the drop-in restricts now, if there is one.
current=""
if [ -e "$DROPIN" ]; then
  current=$(sed -n 's/^users = \[\(.*\)\]$/\1/p' "$DROPIN" | tr -d '" ' | tr ',' ' ')
fi
if [ -n "$current" ] && [ "$current" != "$USER_NAME" ]; then
  echo "install.sh: $DROPIN restricts '$current', not '$USER_NAME': left as it is," \
    "so $USER_NAME is NOT restricted by this run. To restrict $USER_NAME instead, remove" \
    "that file (or edit its users) and run this again." >&2
  exit 1
fi

# An install by the install.sh before the package (a venv in /opt/egressd, units in
# /etc/systemd/system, links in /usr/local/sbin, an edited /etc/egressd/egressd.toml):
# removed, so the package's units and commands are the ones used, and its config moved
# aside, so dpkg does not find a modified conffile it never shipped. The old rules stay in
# the kernel until the package's egressd replaces them: USER stays restricted meanwhile.
if [ -x /opt/egressd/bin/egressd ] && [ -f /etc/systemd/system/egressd.service ]; then
  say "removing the earlier install (/opt/egressd, its units and links); its rules stay until the package's egressd replaces them"
  if [ -d /run/systemd/system ]; then
    systemctl disable --quiet --now egressd.service egressd-lockdown.service || true
  else
    systemctl disable --quiet egressd.service egressd-lockdown.service || true
  fi
  rm -f /etc/systemd/system/egressd.service /etc/systemd/system/egressd-lockdown.service \
    /usr/local/sbin/egressd /usr/local/sbin/egressd-lockdown
  rm -rf /opt/egressd /usr/share/doc/egressd
  if [ -e /etc/egressd ] && ! dpkg-query -W egressd >/dev/null 2>&1; then
    rm -rf /etc/egressd.pre-deb
    mv /etc/egressd /etc/egressd.pre-deb
    say "its configuration is in /etc/egressd.pre-deb now (the user is chosen again below)"
  fi
  [ ! -d /run/systemd/system ] || systemctl daemon-reload
fi

# ---- 1. the package
if [ -z "$DEB" ]; then
  BUILD_DEPS="debhelper dh-python dpkg-dev python3-pip"
  # Only what is not installed yet, and only those are removed after the build.
  # shellcheck disable=SC2086
  added=$(dpkg-query -W -f='${db:Status-Abbrev} ${Package}\n' $BUILD_DEPS 2>/dev/null |
    awk '$1 == "ii" { print $2 }' | sort)
  need=""
  for p in $BUILD_DEPS; do
    printf '%s\n' "$added" | grep -qx "$p" || need="$need $p"
  done
  before=$(mktemp); after=$(mktemp); out=$(mktemp -d)
  trap 'rm -rf "$before" "$after" "$out"' EXIT
  dpkg-query -W -f='${Package}\n' | sort >"$before"
  if [ -n "$need" ]; then
    say "installing the build tools:$need (removed again after the build)"
    apt-get update -qq
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $need >/dev/null
  fi
  say "building the package from $SRC (downloads pyroute2, dnspython, publicsuffixlist, prometheus-client from PyPI)"
  built=0
  "$SRC/packaging/build-deb" --out "$out" >"$out/path" || built=$?
  DEB=$(tail -n 1 "$out/path")
  dpkg-query -W -f='${Package}\n' | sort >"$after"
  new=$(comm -13 "$before" "$after" | tr '\n' ' ')
  if [ -n "$new" ]; then
    say "removing the build tools again: $new"
    # shellcheck disable=SC2086
    apt-get purge -y -qq $new >/dev/null
  fi
  [ "$built" = 0 ] || { echo "install.sh: packaging/build-deb failed (see above)" >&2; exit 1; }
fi
[ -f "$DEB" ] || { echo "install.sh: no package file $DEB" >&2; exit 1; }
case "$DEB" in /*) ;; *) DEB=$(pwd)/$DEB ;; esac
old=$(dpkg-query -W -f='${db:Status-Abbrev} ${Version}' egressd 2>/dev/null || true)
say "installing $(basename "$DEB")${old:+ (installed now: $old)} and its dependencies from Debian"
# A failed update is not fatal: the dependencies may be installed already (an upgrade).
apt-get update -qq || say "warning: apt-get update failed; trying with the package lists there are"
apt-get install -y -qq "$DEB" >/dev/null

# ---- 2. the user, in a drop-in
if ! id -u "$USER_NAME" >/dev/null 2>&1; then
  if [ "$CREATE" = 1 ]; then
    # No subordinate uid/gid range (Debian's useradd gives every new user 65536 of them):
    # with uidmap installed, `unshare --map-auto` would let the user run processes as
    # those uids, which the owner match on the user's own uid does not see.
    useradd --create-home --shell /bin/bash -K SUB_UID_COUNT=0 -K SUB_GID_COUNT=0 "$USER_NAME"
    say "created user $USER_NAME, without subordinate uids/gids (/etc/subuid, /etc/subgid)"
  else
    echo "install.sh: no user '$USER_NAME' (add --create-user to create it)" >&2; exit 1
  fi
fi
USER_UID=$(id -u "$USER_NAME")
[ "$USER_UID" != 0 ] || { echo "install.sh: refusing to restrict root" >&2; exit 1; }
for f in /etc/subuid /etc/subgid; do
  range=$(awk -F: -v u="$USER_NAME" -v n="$USER_UID" '($1 == u || $1 == n) && $3 > 0 { print $2 "+" $3 }' "$f" 2>/dev/null | tr '\n' ' ')
  [ -z "$range" ] || say "warning: $USER_NAME has subordinate ids in $f ($range):" \
    "egressd restricts those uids too; remove the range if $USER_NAME does not need it"
done

# The presets of the default config, those an earlier run chose (a rerun to upgrade keeps
# them: dropping an agent's preset would lock the agent out), plus those asked for now (a
# drop-in's key replaces the config's, it does not add to it). To drop a preset, edit the
# drop-in and `egressd reload`.
list=""; seen=" "
for p in $(sed -n 's/^presets = \[\(.*\)\]$/\1/p' /etc/egressd/egressd.toml "$DROPIN" 2>/dev/null |
  tr -d '"' | tr ',' ' ') $PRESETS; do
  case "$seen" in *" $p "*) continue ;; esac
  seen="$seen$p "
  list="${list:+$list, }\"$p\""
done
install -d -m 0755 /etc/egressd/conf.d
{
  echo "# Written by packaging/install.sh: the user egressd restricts, and the presets of its"
  echo "# allowlist (/usr/share/egressd/presets). A drop-in, so the package's own"
  echo "# /etc/egressd/egressd.toml stays as shipped and upgrades never ask about it."
  echo "[profiles.agent]"
  echo "users = [\"$USER_NAME\"]"
  [ -z "$list" ] || echo "presets = [$list]"
} >"$DROPIN.tmp"
chmod 0644 "$DROPIN.tmp"
mv -f "$DROPIN.tmp" "$DROPIN"
say "$DROPIN: restricts $USER_NAME${list:+, presets $list}"
if ! egressd check-config --config /etc/egressd/egressd.toml; then
  echo "install.sh: the configuration above is not valid; egressd not started" >&2
  exit 1
fi

# ---- 3. boot lockdown, enable, start
# The uids the boot-time lockdown denies everything until egressd serves. egressd rewrites
# it after every successful install or reload; seeded here so the very next boot is closed
# too. An existing file is egressd's and is kept.
STATE_DIR=/var/lib/egressd
if [ ! -e "$STATE_DIR/restricted" ]; then
  install -d -m 0755 "$STATE_DIR"
  printf '# Written by install.sh; egressd rewrites it with the uids it restricts.\n%s\n' \
    "$USER_UID" >"$STATE_DIR/restricted.tmp"
  chmod 0644 "$STATE_DIR/restricted.tmp"
  mv -f "$STATE_DIR/restricted.tmp" "$STATE_DIR/restricted"
  say "$STATE_DIR/restricted: uid $USER_UID is denied everything at boot until egressd serves"
fi
# Works without a running systemd too (a chroot, an image build). The package's purge
# removes the link again (deb-systemd-helper knows it from the unit's [Install]).
systemctl enable --quiet egressd.service
say "egressd.service enabled"
[ "$START" = 1 ] || { say "installed and enabled; not started (--no-start): it starts at the next boot"; exit 0; }

if [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  systemctl restart egressd.service
  systemctl is-active --quiet egressd.service
  say "egressd is running; $USER_NAME is restricted. Follow it with: journalctl -u egressd -f"
else
  # No systemd as PID 1 (a container): run it in the background, events to a log file.
  setsid /usr/sbin/egressd run --config /etc/egressd/egressd.toml --log json \
    >>/var/log/egressd.log 2>&1 </dev/null &
  echo $! >/run/egressd.pid
  sleep 2
  kill -0 "$(cat /run/egressd.pid)" || { tail -n 20 /var/log/egressd.log >&2; exit 1; }
  say "systemd is not running here; egressd runs as pid $(cat /run/egressd.pid)" \
    "($USER_NAME is restricted), log in /var/log/egressd.log"
fi
