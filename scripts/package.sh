#!/usr/bin/env bash
# Builds the Debian packages `fleetcast` (platform) and `fleetcast-device` (agent) into
# target/debian/ with dpkg-deb, from a staged tree per package (docs/packaging.md):
#
#   scripts/package.sh                       release build, then both packages
#   scripts/package.sh fleetcast-device      only that package (or `fleetcast`)
#
# Environment:
#   BIN_DIR=DIR        package the binaries already in DIR instead of building (the tests pass
#                      target/debug); they are stripped of debug info in the staged copy
#   OUT_DIR=DIR        where the .deb files go (default target/debian)
#   DEB_COMPRESSION=   xz (default), gzip, zstd or none (dpkg-deb -Z)
#   DEB_REVISION=1     Debian revision appended to the workspace version
#
# The file list of each package is in packaging/deb/<package>/ and below; everything under
# /etc is a conffile (kept on upgrade when the administrator changed it).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SRC=$ROOT/packaging/deb
OUT_DIR=${OUT_DIR:-$ROOT/target/debian}
COMPRESSION=${DEB_COMPRESSION:-xz}
REVISION=${DEB_REVISION:-1}

die() { echo "package.sh: $*" >&2; exit 1; }

command -v dpkg-deb >/dev/null && command -v dpkg >/dev/null ||
    die "dpkg-deb is not installed (it comes with dpkg, on Debian and Ubuntu)"

PACKAGES=("$@")
[ ${#PACKAGES[@]} -gt 0 ] || PACKAGES=(fleetcast fleetcast-device)
for p in "${PACKAGES[@]}"; do
    case "$p" in
        fleetcast | fleetcast-device) ;;
        *) die "unknown package $p (fleetcast or fleetcast-device)" ;;
    esac
done

# The workspace version, e.g. 0.1.0, from [workspace.package].
VERSION=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' Cargo.toml)
[ -n "$VERSION" ] || die "no version in [workspace.package] of Cargo.toml"
DEB_VERSION=$VERSION-$REVISION
ARCH=$(dpkg --print-architecture)

if [ -z "${BIN_DIR:-}" ]; then
    # Both packages in one build: built alone, shared dependencies unify features differently.
    CARGO_INCREMENTAL=0 cargo build --locked --release -p fleetcast-platform -p fleetcast-device
    BIN_DIR=$ROOT/target/release
fi

# libc6 (>= newest GLIBC_x.y symbol version the binary uses), libgcc-s1 for unwinding.
depends_of() {
    local bin=$1 glibc=""
    if command -v objdump >/dev/null; then
        glibc=$(objdump -T "$bin" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -1)
    fi
    echo "libc6 (>= ${glibc:-2.34}), libgcc-s1"
}

# Copies $1 into the staged tree as $2 with mode $3, creating the directories.
put() {
    install -D -m "$3" "$1" "$STAGE/$2"
}

build_one() {
    local pkg=$1 bin unit env_file
    case "$pkg" in
        fleetcast) bin=fleetcast env_file=platform.env data=/var/lib/fleetcast/platform ;;
        fleetcast-device) bin=fleetcast-device env_file=device.env data=/var/lib/fleetcast/device ;;
    esac
    unit=$pkg.service
    [ -x "$BIN_DIR/$bin" ] || die "$BIN_DIR/$bin is missing (build it, or unset BIN_DIR)"
    STAGE=$OUT_DIR/stage/$pkg
    rm -rf "$STAGE"
    mkdir -p "$STAGE/DEBIAN"

    # The binary, without debug info (symbols stay, for backtraces).
    install -d "$STAGE/usr/bin"
    if command -v objcopy >/dev/null; then
        objcopy --strip-debug "$BIN_DIR/$bin" "$STAGE/usr/bin/$bin"
        chmod 0755 "$STAGE/usr/bin/$bin"
    else
        install -m 0755 "$BIN_DIR/$bin" "$STAGE/usr/bin/$bin"
    fi
    put "$SRC/$pkg/$unit" "usr/lib/systemd/system/$unit" 0644
    put "$SRC/$pkg/$env_file" "etc/fleetcast/$env_file" 0644
    local doc=usr/share/doc/$pkg
    put "$ROOT/docs/packaging.md" "$doc/packaging.md" 0644
    put "$SRC/$pkg/README.Debian" "$doc/README.Debian" 0644
    put "$SRC/copyright" "$doc/copyright" 0644
    if [ "$pkg" = fleetcast-device ]; then
        put "$SRC/$pkg/device.toml.example" "$doc/examples/device.toml" 0644
        put "$SRC/$pkg/installer-override.conf" "$doc/examples/installer-override.conf" 0644
        # What a field engineer follows on the machine, and the vending application's side of
        # the sale lock (docs/device.md).
        put "$ROOT/docs/device.md" "$doc/device.md" 0644
        put "$ROOT/docs/examples/sale_lock.c" "$doc/examples/sale_lock.c" 0644
        put "$ROOT/docs/examples/sale_lock.py" "$doc/examples/sale_lock.py" 0644
    fi

    # Everything under /etc is a conffile.
    (cd "$STAGE" && find etc -type f | sort | sed 's|^|/|') >"$STAGE/DEBIAN/conffiles"
    local configure
    configure=$(cat "$SRC/$pkg/configure.sh")
    for script in postinst prerm postrm; do
        awk -v pkg="$pkg" -v unit="$unit" -v data="$data" -v configure="$configure" '
            { gsub(/@PKG@/, pkg); gsub(/@UNIT@/, unit); gsub(/@DATA@/, data) }
            /^[ \t]*@CONFIGURE@[ \t]*$/ { print configure; next }
            { print }' "$SRC/$script" >"$STAGE/DEBIAN/$script"
        chmod 0755 "$STAGE/DEBIAN/$script"
        sh -n "$STAGE/DEBIAN/$script" || die "$script of $pkg is not valid sh"
    done
    local size
    size=$(du -sk --exclude=DEBIAN "$STAGE" | cut -f1)
    sed -e "s/@VERSION@/$DEB_VERSION/" -e "s/@ARCH@/$ARCH/" -e "s/@SIZE@/$size/" \
        -e "s/@DEPENDS@/$(depends_of "$STAGE/usr/bin/$bin")/" \
        "$SRC/$pkg/control.in" >"$STAGE/DEBIAN/control"
    (cd "$STAGE" && find . -path ./DEBIAN -prune -o -type f -print | sed 's|^\./||' | sort |
        xargs md5sum) >"$STAGE/DEBIAN/md5sums"
    chmod 0644 "$STAGE/DEBIAN/control" "$STAGE/DEBIAN/conffiles" "$STAGE/DEBIAN/md5sums"

    local deb=$OUT_DIR/${pkg}_${DEB_VERSION}_${ARCH}.deb
    dpkg-deb --root-owner-group -Z"$COMPRESSION" --build "$STAGE" "$deb" >/dev/null
    rm -rf "$STAGE"
    echo "$deb"
}

mkdir -p "$OUT_DIR"
for p in "${PACKAGES[@]}"; do
    build_one "$p"
done
rmdir "$OUT_DIR/stage" 2>/dev/null || true
