#!/usr/bin/env python3
"""Follow a fleetcast fleet as an integrator: every event and rollout progress, verified.

Usage:  scripts/integrator.py INTEGRATOR.toml [--state FILE] [--once] [--page N]

INTEGRATOR.toml is what `fleetcast integrator add NAME` prints. The script
1. connects with the integrator's read-only credentials,
2. asks the platform for every stored event after the last id it saw (kept in --state), page by
   page, so nothing persisted while it was away is missed (within the platform's request rate,
   asking again what goes unanswered),
3. then prints live events and progress as they come,
verifying the platform's Ed25519 signature on every message and dropping anything that does not
verify, repeats an event id it has already seen, or answers another client.

Needs: pip install paho-mqtt cryptography   (Python 3.11+ for tomllib)
"""
import argparse
import json
import sys
import threading
import time
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
    ap.add_argument("--page", type=int, default=500, help="events per request (at most 500)")
    args = ap.parse_args()
    cfg = tomllib.loads(Path(args.config).read_text())
    key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(cfg["platform_key"]))
    state = Path(args.state)
    last = int(state.read_text()) if state.exists() else 0
    url = urlparse(cfg["broker"])
    client_id = cfg["username"]
    caught_up = threading.Event()  # the stored events are all shown: live ones may follow
    answered = threading.Event()  # an answer came
    connected = threading.Event()  # (re)connected and subscribed: catch up (again)
    refused = []
    lock = threading.Lock()

    def show(events):
        """Prints the events not seen yet, then keeps the last id (once per batch: a page is 500)."""
        nonlocal last
        with lock:
            fresh = [e for e in events if e["id"] > last]  # not a replay or a live copy seen
            for e in fresh:
                print(json.dumps({"event": e}))
            sys.stdout.flush()
            if fresh:
                last = fresh[-1]["id"]
                state.write_text(str(last))

    def on_connect(c, _userdata, _flags, rc, _properties=None):
        if rc != 0:
            refused.append(f"broker refused the connection (code {rc}): check username/password")
        else:
            # Live events wait until the catch-up is done: shown first, they would move `last`
            # past stored events not fetched yet.
            caught_up.clear()
            # The answer topic alone first: on the embedded broker the platform then hands its
            # answers to this connection itself (docs/integrators.md).
            c.subscribe([(cfg["response_topic"], 1)])
            c.subscribe([(cfg["events_topic"], 1), (cfg["progress_topic"], 1)])
        connected.set()

    def on_message(c, _userdata, msg):
        if msg.topic == cfg["response_topic"]:
            batch = verify(key, "batch", msg.payload)
            if batch is None or batch["client"] != client_id:
                print("dropped an answer that does not verify", file=sys.stderr)
                return
            show(sorted(batch["events"], key=lambda e: e["id"]))
            if not batch["more"]:
                caught_up.set()
            answered.set()
        elif msg.topic == cfg["events_topic"]:
            event = verify(key, "event", msg.payload)
            if event is None:
                print("dropped an event that does not verify", file=sys.stderr)
            elif caught_up.is_set():
                show([event])
        else:
            progress = verify(key, "progress", msg.payload)
            if progress is None or not msg.topic.endswith(f"/{progress['release']}/progress"):
                print("dropped progress that does not verify", file=sys.stderr)
            else:
                print(json.dumps({"progress": progress}), flush=True)

    def catch_up(c):
        """Asks page by page until the platform says there is no more. The platform answers at
        most 5 requests a second (burst 20) and leaves one over that unanswered, so this keeps
        a budget a little under it, and asks again what is unanswered for 2 s (an answer that
        was only late is harmless: ids already shown are skipped). False after 30 s of silence."""
        silent, tokens, at = 0.0, 20.0, time.monotonic()
        while not caught_up.is_set():
            now = time.monotonic()
            tokens = min(20.0, tokens + (now - at) * 4.5)
            at = now
            if tokens < 1:
                time.sleep((1 - tokens) / 4.5)
                continue
            tokens -= 1
            answered.clear()
            c.publish(cfg["request_topic"], json.dumps({"since": last, "limit": args.page}), qos=1)
            if answered.wait(2):
                silent = 0.0
            else:
                silent += 2
                if silent >= 30:
                    return False
        return True

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
    c.username_pw_set(cfg["username"], cfg["password"])
    c.on_connect = on_connect
    c.on_message = on_message
    c.connect(url.hostname, url.port or 1883)
    c.loop_start()
    try:
        first = True
        while True:
            if not connected.wait(30 if first else None):
                sys.exit("could not connect to the broker within 30 s")
            first = False
            connected.clear()
            if refused:
                sys.exit(refused[0])
            # Live events are shown only after a catch-up, so one that got no answer is tried
            # again (following for ever) rather than left.
            while not catch_up(c):
                if args.once:
                    sys.exit("no answer from the platform within 30 s")
                print("no answer from the platform within 30 s; asking again", file=sys.stderr)
            if args.once:
                return
    except KeyboardInterrupt:
        pass
    finally:
        c.loop_stop()


if __name__ == "__main__":
    main()
