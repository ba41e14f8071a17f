#!/usr/bin/env bash
# The test command from the README: every unit and integration test of the workspace.
# Integration tests start their own rumqttd (and Mosquitto, when installed) on free loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    echo "note: mosquitto is not installed; the Mosquitto interop tests will fail." >&2
    echo "      install it with: sudo apt-get install -y mosquitto" >&2
fi
export PATH="$PATH:/usr/sbin"
cargo test --workspace --locked "$@"
