#!/usr/bin/env bash
# Checks contrib/thunderline.service with systemd-analyze: `verify` must say nothing about the
# unit (an unknown key, a value it cannot parse and a missing binary are only warnings to it,
# so this script fails on any line about the unit, not only on its exit status), and its
# offline security review must rate its exposure at or below EXPOSURE_MAX, in tenths
# (systemd-analyze shows 0.0 for the safest, 10.0 for no protection; 20 here means 2.0).
#
# usage: contrib/check-systemd-unit.sh [BINARY]
#
# `verify` checks that ExecStart's binary exists, and /usr/local/bin/thunderline is where the
# unit is installed, not where a build is: the unit is checked from a copy whose ExecStart
# names BINARY instead (default target/release/thunderline or target/debug/thunderline,
# whichever exists, else /bin/true). Needs systemd-analyze (Debian: apt-get install systemd);
# systemd need not be running.
set -euo pipefail
binary=${1:-}
if [ -n "$binary" ]; then
  [ -x "$binary" ] && [ -f "$binary" ] || { echo "$binary is not an executable file" >&2; exit 1; }
  binary=$(realpath "$binary")
fi
cd "$(dirname "$0")/.."

UNIT=contrib/thunderline.service
NAME=$(basename "$UNIT")
INSTALLED_BINARY=/usr/local/bin/thunderline
EXPOSURE_MAX=${EXPOSURE_MAX:-20}

if ! command -v systemd-analyze >/dev/null 2>&1; then
  echo "systemd-analyze is missing (Debian: apt-get install -y systemd)" >&2
  exit 1
fi

if [ -z "$binary" ]; then
  for candidate in target/release/thunderline target/debug/thunderline /bin/true; do
    if [ -x "$candidate" ]; then binary=$(realpath "$candidate"); break; fi
  done
fi

grep -q "^ExecStart=$INSTALLED_BINARY " "$UNIT" || {
  echo "$UNIT: ExecStart no longer starts $INSTALLED_BINARY; update this script" >&2
  exit 1
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The same file name: systemd names the unit after it.
sed "s|^ExecStart=$INSTALLED_BINARY |ExecStart=$binary |" "$UNIT" > "$work/$NAME"

failed=0
status=0
out=$(systemd-analyze verify --man=no "$work/$NAME" 2>&1) || status=$?
# Lines about other units (its dependencies, as installed on this machine) are shown, not
# held against it.
about_unit=$(grep -F "$NAME" <<<"$out" || true)
if [ "$status" -ne 0 ] || [ -n "$about_unit" ]; then
  echo "systemd-analyze verify $UNIT (exit status $status):" >&2
  echo "${out//$work\//contrib/}" >&2
  failed=1
elif [ -n "$out" ]; then
  echo "systemd-analyze verify, about other units (not counted):"
  echo "$out"
fi

# The hardening, scored offline (systemd 250 and newer).
usage=$(systemd-analyze --help 2>&1 || true)
if grep -q -- '--offline' <<<"$usage"; then
  status=0
  out=$(systemd-analyze security --offline=yes --threshold="$EXPOSURE_MAX" --no-pager \
    "$work/$NAME" 2>&1) || status=$?
  if [ "$status" -ne 0 ]; then
    echo "${out//$work\//contrib/}" >&2
    echo "$UNIT: its exposure is above $((EXPOSURE_MAX / 10)).$((EXPOSURE_MAX % 10)) (exit status $status)" >&2
    failed=1
  else
    grep -F "Overall exposure level" <<<"$out" || true
  fi
else
  echo "systemd-analyze has no offline security review here (systemd < 250): skipped"
fi

if [ "$failed" -ne 0 ]; then
  exit 1
fi
echo "$UNIT: verified with ExecStart=$binary"
