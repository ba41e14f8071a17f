#!/usr/bin/env bash
# The test command from the README: every unit and integration test of the workspace.
# Integration tests start their own rumqttd and Mosquitto on free loopback ports; this script
# installs Mosquitto (Debian package) when it is missing and it can.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/sbin"

# Mosquitto for the external-broker tests; its clients, jq, xxd and openssl for the test that
# runs the mosquitto_sub commands of docs/integrators.md as written.
PACKAGES="mosquitto mosquitto-clients jq xxd openssl"
if ! command -v mosquitto >/dev/null 2>&1 || ! command -v mosquitto_sub >/dev/null 2>&1 ||
   ! command -v jq >/dev/null 2>&1 || ! command -v xxd >/dev/null 2>&1 ||
   ! command -v openssl >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo -n"
    echo "installing $PACKAGES (needed by the external-broker and integrator tests)..." >&2
    if ! { $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
           $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $PACKAGES >/dev/null; }; then
        echo "error: could not install them; install them yourself (apt-get install $PACKAGES) and rerun" >&2
        exit 1
    fi
fi
export FLEETCAST_REQUIRE_SHELL_TOOLS=1
# The integrator example (scripts/integrator.py) is run by a test: it needs paho-mqtt and
# cryptography from PyPI. With FLEETCAST_REQUIRE_PYTHON set, that test fails instead of skipping.
if ! python3 -c "import paho.mqtt.client, cryptography" >/dev/null 2>&1; then
    echo "installing paho-mqtt and cryptography (needed by the integrator example test)..." >&2
    python3 -m pip install --quiet --disable-pip-version-check paho-mqtt cryptography >&2 ||
        { echo "error: could not pip install paho-mqtt cryptography" >&2; exit 1; }
fi
export FLEETCAST_REQUIRE_PYTHON=1
# The tests start their own Mosquitto; a packaged service on 1883 is not used.
(command -v service >/dev/null 2>&1 && service mosquitto stop >/dev/null 2>&1) || true

LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
set +e
cargo test --workspace --locked "$@" 2>&1 | tee "$LOG"
status=${PIPESTATUS[0]}
set -e
# One closing line over every test binary (cargo prints one "test result" per binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "\ntotal: %d passed, %d failed\n", p, f }' "$LOG"
exit "$status"
