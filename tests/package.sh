#!/usr/bin/env bash
# The Debian package, end to end on this machine: build it (packaging/build-deb), install it
# with dpkg -i, check the unit with systemd-analyze verify, run `skyferry --version`, make a
# key with `skyferry keygen` and have `skyferryd --check-config` accept an installed config
# with it, open every man page with `man -l`, then remove the package and what the test
# made. Needs root, dpkg, cargo-deb, systemd (for systemd-analyze) and man-db; tests/run
# installs them.
#   tests/package.sh [release|dev]     (the binaries' profile; default release)
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${1:-release}

if dpkg-query -W -f='${Status}' skyferry 2>/dev/null | grep -q "install ok installed"; then
  echo "package test: a skyferry package is installed already; not touching it" >&2
  exit 1
fi
if [ -e /etc/skyferry ]; then
  echo "package test: /etc/skyferry exists already; not touching it" >&2
  exit 1
fi

deb=$(packaging/build-deb "$profile")
echo "== built $deb"
cleanup() {
  dpkg --purge skyferry >/dev/null 2>&1 || true
  rm -f /etc/skyferry/psk
  rmdir /etc/skyferry 2>/dev/null || true
}
trap cleanup EXIT
fail() { echo "package test FAILED: $*" >&2; exit 1; }

dpkg -i "$deb"
passed=0
check() { passed=$((passed + 1)); echo "ok: $*"; }

# Configs are conffiles under /etc/skyferry.
grep -qx /etc/skyferry/destination.toml /var/lib/dpkg/info/skyferry.conffiles \
  || fail "destination.toml is not a conffile"
check "configs are conffiles"

version=$(skyferry --version)
[[ $version == "skyferry "* ]] || fail "skyferry --version said: $version"
skyferryd --version | grep -q '^skyferryd ' || fail "skyferryd --version"
check "$version"

# A missing key names the command that makes it.
if out=$(skyferryd --check-config --config /etc/skyferry/destination.toml 2>&1); then
  fail "check-config passed without a key: $out"
fi
grep -q 'skyferry keygen --out /etc/skyferry/psk' <<<"$out" || fail "no keygen hint: $out"
check "a missing key says how to make it"

skyferry keygen --out /etc/skyferry/psk
out=$(skyferryd --check-config --config /etc/skyferry/destination.toml) \
  || fail "check-config refused the installed config: $out"
grep -q 'is valid' <<<"$out" || fail "check-config said: $out"
skyferryd --check-config --config /etc/skyferry/source.toml >/dev/null \
  || fail "check-config refused source.toml"
check "skyferryd --check-config accepts the installed configs with a fresh key"

# An invalid config is refused with the line.
bad=$(mktemp --suffix=.toml)
printf '[daemon]\npsk_file = "/etc/skyferry/psk"\nbogus = 1\n' >"$bad"
if out=$(skyferryd --check-config --config "$bad" 2>&1); then
  rm -f "$bad"; fail "check-config accepted an unknown key"
fi
rm -f "$bad"
grep -q 'bogus' <<<"$out" || fail "the error does not name the key: $out"
check "an invalid config is refused, naming what is wrong"

unit=/usr/lib/systemd/system/skyferryd.service
[ -f "$unit" ] || fail "no unit at $unit"
if ! out=$(systemd-analyze verify "$unit" 2>&1) || [ -n "$out" ]; then
  fail "systemd-analyze verify: $out"
fi
check "systemd-analyze verify $unit"

pages=(skyferry skyferryd skyferry-start skyferry-status skyferry-watch skyferry-abort
  skyferry-resolve skyferry-keygen skyferry-demo)
for p in "${pages[@]}"; do
  f=/usr/share/man/man1/$p.1.gz
  [ -f "$f" ] || fail "no man page $f"
  text=$(MANWIDTH=100 man -l -P cat "$f" 2>&1)
  grep -q '^SYNOPSIS' <<<"$text" || fail "man -l $f: $text"
done
MANWIDTH=100 man -l -P cat /usr/share/man/man1/skyferry-start.1.gz | grep -q -- '--wait' \
  || fail "skyferry-start(1) lacks --wait: not generated from the CLI?"
check "${#pages[@]} man pages open with man -l"

for f in /usr/share/bash-completion/completions/skyferry \
  /usr/share/zsh/vendor-completions/_skyferry \
  /usr/share/fish/vendor_completions.d/skyferry.fish; do
  grep -q 'keygen' "$f" || fail "completion $f lacks the subcommands"
done
bash -c 'source /usr/share/bash-completion/completions/skyferry && complete -p skyferry' \
  >/dev/null || fail "the bash completion does not load"
check "bash, zsh and fish completions"

dpkg --purge skyferry
[ ! -e /usr/bin/skyferry ] || fail "skyferry left behind by purge"
[ ! -e /etc/skyferry/destination.toml ] || fail "conffile left behind by purge"
check "the package purges"
cleanup
[ ! -e /etc/skyferry ] || fail "/etc/skyferry left behind"
trap - EXIT
echo "package: $passed passed, 0 failed"
