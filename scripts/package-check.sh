#!/usr/bin/env bash
# Checks a package built by scripts/package.sh and extracts it into a scratch root (no real
# install: `dpkg -x`, no maintainer scripts run):
#
#   scripts/package-check.sh target/debian/fleetcast-device_0.1.0-1_amd64.deb ROOT
#
# Checks the control fields, the file layout (binary, unit, conffiles, docs), that the
# conffiles are exactly the files under /etc, the md5sums, that the maintainer scripts are valid
# sh, the unit's essential settings, and runs `systemd-analyze verify` on the unit when that
# command exists (with ExecStart pointing into ROOT, since the binary is not in /usr/bin).
# The integration tests run it (device/tests/it/package.rs, platform/tests/it/package.rs).
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 PACKAGE.deb ROOT" >&2; exit 2; }
DEB=$1
ROOT=$2
fail() { echo "package-check: $(basename "$DEB"): $*" >&2; exit 1; }

PKG=$(dpkg-deb -f "$DEB" Package)
case "$PKG" in
    fleetcast) BIN=fleetcast ENV=platform.env DATA=fleetcast/platform ;;
    fleetcast-device) BIN=fleetcast-device ENV=device.env DATA=fleetcast/device ;;
    *) fail "unknown package $PKG" ;;
esac
UNIT=$PKG.service

for field in Version Architecture Maintainer Installed-Size Depends Description; do
    [ -n "$(dpkg-deb -f "$DEB" "$field")" ] || fail "control field $field is empty"
done
dpkg-deb -f "$DEB" Depends | grep -q 'libc6 (>= ' || fail "Depends does not name libc6"
dpkg-deb -f "$DEB" Depends | grep -qw adduser || fail "Depends lacks adduser (postinst uses it)"

mkdir -p "$ROOT"
dpkg -x "$DEB" "$ROOT"
CTRL=$(mktemp -d)
trap 'rm -rf "$CTRL"' EXIT
dpkg-deb -e "$DEB" "$CTRL"

# The layout.
EXPECTED="etc/fleetcast/$ENV
usr/bin/$BIN
usr/lib/systemd/system/$UNIT
usr/share/doc/$PKG/README.Debian
usr/share/doc/$PKG/copyright
usr/share/doc/$PKG/packaging.md"
if [ "$PKG" = fleetcast-device ]; then
    EXPECTED="$EXPECTED
usr/share/doc/$PKG/device.md
usr/share/doc/$PKG/examples/device.toml
usr/share/doc/$PKG/examples/installer-override.conf
usr/share/doc/$PKG/examples/sale_lock.c
usr/share/doc/$PKG/examples/sale_lock.py"
fi
ACTUAL=$(cd "$ROOT" && find . -type f -o -type l | sed 's|^\./||' | sort)
[ "$ACTUAL" = "$(sort <<<"$EXPECTED")" ] ||
    fail "files differ from the expected layout:$(diff <(sort <<<"$EXPECTED") <(echo "$ACTUAL") | sed 's/^/\n  /' | tr -d '\n')"
[ -x "$ROOT/usr/bin/$BIN" ] || fail "/usr/bin/$BIN is not executable"
"$ROOT/usr/bin/$BIN" --version >/dev/null || fail "/usr/bin/$BIN --version failed"

# Conffiles: every file under /etc, nothing else (dpkg keeps an administrator's changes to
# them on upgrade, and asks before replacing one).
[ "$(sort "$CTRL/conffiles")" = "$(cd "$ROOT" && find etc -type f | sed 's|^|/|' | sort)" ] ||
    fail "conffiles ($(tr '\n' ' ' <"$CTRL/conffiles")) are not exactly the files under /etc"
(cd "$ROOT" && md5sum --quiet -c "$CTRL/md5sums") || fail "md5sums do not match the files"
for script in postinst prerm postrm; do
    [ -x "$CTRL/$script" ] || fail "$script is missing or not executable"
    sh -n "$CTRL/$script" || fail "$script is not valid sh"
    grep -q "$UNIT" "$CTRL/$script" || fail "$script does not handle $UNIT"
done
grep -q 'adduser --system' "$CTRL/postinst" || fail "postinst does not create the system user"

# The unit's essentials (the rest is checked by systemd-analyze below).
unit=$ROOT/usr/lib/systemd/system/$UNIT
for line in "User=fleetcast" "Group=fleetcast" "Restart=on-failure" "KillSignal=SIGINT" \
    "StateDirectory=$DATA" "NoNewPrivileges=yes" "ProtectSystem=strict" \
    "ReadWritePaths=/var/lib/$DATA" "ProtectHome=yes" "PrivateTmp=yes" \
    "WantedBy=multi-user.target"; do
    grep -qx "$line" "$unit" || fail "$UNIT lacks $line"
done
grep -q "^ExecStart=/usr/bin/$BIN " "$unit" || fail "$UNIT does not start /usr/bin/$BIN"
grep -q "^EnvironmentFile=-/etc/fleetcast/$ENV\$" "$unit" || fail "$UNIT does not read /etc/fleetcast/$ENV"

if command -v systemd-analyze >/dev/null; then
    # The unit as installed, except that its binary is in the scratch root.
    sed "s|/usr/bin/$BIN|$ROOT/usr/bin/$BIN|" "$unit" >"$CTRL/$UNIT"
    if ! out=$(systemd-analyze verify "$CTRL/$UNIT" 2>&1); then
        fail "systemd-analyze verify failed: $out"
    fi
    # It reports unknown keys and bad values as warnings, with status 0.
    if grep -F "$UNIT" <<<"$out"; then
        fail "systemd-analyze verify warns about $UNIT"
    fi
    echo "systemd-analyze verify: $UNIT ok"
else
    echo "skipped: systemd-analyze verify ($UNIT): systemd-analyze is not installed"
fi
echo "package-check: $PKG ok"
