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
verify, repeats an event id it has already seen, or answers another client. It follows the
platform's key chain from the profile's key and generation (docs/protocol.md §3.1), keeping
the key it reached in FILE.key, and holds a message signed by a newer key than it has reached
until the chain gets there.

Needs: pip install paho-mqtt cryptography   (Python 3.11+ for tomllib)
"""
import argparse
import json
import os
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
KEY_ROTATION_TAG = b"fleetcast/v1/key-rotation\0"
LATER = object()  # signed by a key generation the chain has not brought yet
HELD_AT_MOST = 1000


class Trust:
    """The platform key trusted, and its generation: the profile's, then the newest reached
    along the key chain, persisted before it is used (docs/protocol.md §3.1)."""

    def __init__(self, cfg, path):
        self.path = path
        self.root = [cfg.get("platform_key_gen", 0), cfg["platform_key"]]
        current = self.root
        if path.exists():
            saved = json.loads(path.read_text())
            if saved.get("root") == self.root:  # not a key reached from another profile
                current = saved["current"]
        self.use(*current)

    def use(self, gen, key_hex):
        self.gen, self.key_hex = gen, key_hex
        self.key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(key_hex))

    def follow(self, payload):
        """Walks a key chain message; True if it reached a newer key (then persisted)."""
        gen, key_hex = self.gen, self.key_hex
        try:
            for link in json.loads(payload)["links"]:
                if link.get("gen", 0) + 1 <= gen:
                    continue  # followed already
                key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(key_hex))
                key.verify(bytes.fromhex(link["sig"]), KEY_ROTATION_TAG + link["body"].encode())
                announced = json.loads(link["body"])
                if announced["generation"] != gen + 1:
                    raise ValueError("a link skips a generation")
                gen, key_hex = announced["generation"], announced["key"]
        except Exception as e:  # the whole chain is refused; nothing changes
            print(f"key chain refused: {e!r}", file=sys.stderr)
            return False
        if gen <= self.gen:
            return False
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as f:
            f.write(json.dumps({"root": self.root, "current": [gen, key_hex]}))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self.use(gen, key_hex)
        print(f"following the platform key chain to generation {gen}", file=sys.stderr)
        return True

    def verify(self, purpose, payload):
        """The body of a signed envelope; LATER if a newer key than the one reached signed it;
        None if it does not verify (or an older key, rotated away from, signed it)."""
        try:
            env = json.loads(payload)
            gen = env.get("gen", 0)
            if gen > self.gen:
                return LATER
            body = env["body"]
            if gen < self.gen:
                return None
            self.key.verify(bytes.fromhex(env["sig"]), TAGS[purpose] + body.encode())
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
    state = Path(args.state)
    trust = Trust(cfg, state.with_name(state.name + ".key"))
    keys_topic = f"{cfg['topic_prefix']}/platform/keys"
    held = []  # (topic, payload) signed by a key the chain has not brought yet
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
            # The answer topic first, with only the key chain: on the embedded broker the
            # platform then hands its answers to this connection itself (docs/integrators.md).
            c.subscribe([(keys_topic, 1), (cfg["response_topic"], 1)])
            c.subscribe([(cfg["events_topic"], 1), (cfg["progress_topic"], 1)])
        connected.set()

    def on_message(c, _userdata, msg):
        handle(msg.topic, msg.payload)

    def hold(topic, payload):
        if len(held) < HELD_AT_MOST:
            held.append((topic, payload))

    def handle(topic, payload):
        if topic == keys_topic:
            if payload and trust.follow(payload):
                again = held[:]
                held.clear()
                for t, p in again:
                    handle(t, p)
        elif topic == cfg["response_topic"]:
            batch = trust.verify("batch", payload)
            if batch is LATER:
                return hold(topic, payload)
            if batch is None or batch["client"] != client_id:
                print("dropped an answer that does not verify", file=sys.stderr)
                return
            show(sorted(batch["events"], key=lambda e: e["id"]))
            if not batch["more"]:
                caught_up.set()
            answered.set()
        elif topic == cfg["events_topic"]:
            event = trust.verify("event", payload)
            if event is LATER:
                hold(topic, payload)
            elif event is None:
                print("dropped an event that does not verify", file=sys.stderr)
            elif caught_up.is_set():
                show([event])
        else:
            progress = trust.verify("progress", payload)
            if progress is LATER:
                hold(topic, payload)
            elif progress is None or not topic.endswith(f"/{progress['release']}/progress"):
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
