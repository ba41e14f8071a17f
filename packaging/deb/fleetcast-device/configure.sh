    if [ -f /etc/fleetcast/device.toml ] && [ -n "$(find /etc/fleetcast/device.toml -perm /o=r)" ]; then
        echo "warning: /etc/fleetcast/device.toml holds the machine's key and is readable by every user;" >&2
        echo "         chown root:fleetcast /etc/fleetcast/device.toml && chmod 0640 /etc/fleetcast/device.toml" >&2
    fi
