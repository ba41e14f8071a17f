#!/usr/bin/env python3
"""Follow a fleetcast fleet as an integrator: every event and rollout progress, verified.

Usage:  scripts/integrator.py INTEGRATOR.toml [--state FILE] [--once]

INTEGRATOR.toml is what `fleetcast integrator add NAME` prints. The script
1. connects with the integrator's read-only credentials,
2. asks the platform for every stored event after the last id it saw (kept in --state), page by
   page, so nothing persisted while it was away is missed,
3. then prints live events and progress as they come,
verifying the platform's Ed25519 signature on every message and dropping anything that does not
verify, repeats an event id it has already seen, or answers another client.

Needs: pip install paho-mqtt cryptography   (Python 3.11+ for tomllib)
"""
import argparse
import json
import sys
import threading
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

TAGS = {
    "event": b"fleetcast/v1/event\0",
    "progress": b"fleetcast/v1/progress\0",
    "batch": b"fleetcast/v1/event-batch\0",
}


def verify(key, purpose, payload):
    """The body of a signed envelope, or None if it does not verify."""
    try:
        env = json.loads(payload)
        body = env["body"]
        key.verify(bytes.fromhex(env["sig"]), TAGS[purpose] + body.encode())
        return json.loads(body)
    except Exception:
        return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--state", default="integrator.state", help="file keeping the last event id")
    ap.add_argument("--once", action="store_true", help="catch up, print, and exit")
    args = ap.parse_args()
    cfg = tomllib.loads(Path(args.config).read_text())
    key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(cfg["platform_key"]))
    state = Path(args.state)
    last = int(state.read_text()) if state.exists() else 0
    url = urlparse(cfg["broker"])
    client_id = cfg["username"]
    caught_up = threading.Event()
    lock = threading.Lock()

    def show(event):
        nonlocal last
        with lock:
            if event["id"] <= last:
                return  # seen already (a replay, or the live copy of a fetched event)
            last = event["id"]
            state.write_text(str(last))
        print(json.dumps({"event": event}), flush=True)

    def ask(c):
        c.publish(cfg["request_topic"], json.dumps({"since": last, "limit": 500}), qos=1)

    def on_connect(c, _userdata, _flags, rc, _properties=None):
        if rc != 0:
            sys.exit(f"broker refused the connection (code {rc}): check username/password")
        c.subscribe([(cfg["response_topic"], 1), (cfg["events_topic"], 1), (cfg["progress_topic"], 1)])
        ask(c)

    def on_message(c, _userdata, msg):
        if msg.topic == cfg["response_topic"]:
            batch = verify(key, "batch", msg.payload)
            if batch is None or batch["client"] != client_id:
                print("dropped an answer that does not verify", file=sys.stderr)
                return
            for e in batch["events"]:
                show(e)
            if batch["more"]:
                ask(c)
            else:
                caught_up.set()
        elif msg.topic == cfg["events_topic"]:
            event = verify(key, "event", msg.payload)
            if event is None:
                print("dropped an event that does not verify", file=sys.stderr)
            elif caught_up.is_set():
                show(event)
        else:
            progress = verify(key, "progress", msg.payload)
            if progress is None or not msg.topic.endswith(f"/{progress['release']}/progress"):
                print("dropped progress that does not verify", file=sys.stderr)
            else:
                print(json.dumps({"progress": progress}), flush=True)

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
    c.username_pw_set(cfg["username"], cfg["password"])
    c.on_connect = on_connect
    c.on_message = on_message
    c.connect(url.hostname, url.port or 1883)
    if args.once:
        c.loop_start()
        ok = caught_up.wait(30)
        c.loop_stop()
        sys.exit(0 if ok else "no answer from the platform within 30 s")
    c.loop_forever()


if __name__ == "__main__":
    main()
