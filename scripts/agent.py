#!/usr/bin/env python3
"""A minimal fleetcast machine agent, written from docs/protocol.md alone.

    scripts/agent.py MACHINE.toml --out DIR [--once] [--timeout SECONDS]

MACHINE.toml is what `fleetcast machine provision` prints. The agent keeps its counter, accepted
seqs, job and status outbox in the config's `data_dir`, follows its release topics, downloads
each artifact in verified chunks (§7), "installs" it by writing it to `DIR/<kind>/<artifact id>`
(and `DIR/<kind>/current.json`), and reports every step as acknowledged status events (§6.1).
`--once` exits 0 once the first release is installed and every event is acknowledged.

Needs paho-mqtt (2.x) and cryptography; BLAKE3 comes from scripts/chunk_tree.py (pure Python,
so it is slow on large artifacts: this is a reference to read and port, not a production agent).
"""

import argparse
import hmac
import json
import os
import queue
import random
import socket
import sys
import time
import tomllib
from pathlib import Path

import paho.mqtt.client as mqtt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

sys.path.insert(0, str(Path(__file__).resolve().parent))
import chunk_tree as ct  # noqa: E402  (the project's BLAKE3 compression function and chunk tree)

AGENT_VERSION = "agent.py 0.1"
MAX_ENVELOPE = 256 * 1024
WINDOW = 16                 # chunks in flight (§7.3)
MANIFEST_WINDOW = 32        # manifest parts per request (§7.3)
ATTEMPTS = 5                # download attempts (§6.1)
STATUS_TAG = "fleetcast/v1/status"
CHUNK_ERROR_TAG = b"fleetcast/v1/chunk-error\0"  # error frames to this machine are MAC'd (§7.2)
NO_PROGRESS_S = 30          # an attempt fails after this long without a verified chunk
ACK_RESEND_S = 10           # resend the outbox head after this long without an ack (§6.1)


def log(*args):
    print(time.strftime("%H:%M:%S"), *args, file=sys.stderr, flush=True)


def now_ms():
    return int(time.time() * 1000)


# --- BLAKE3: hash, keyed_hash (MACs) and derive_key (the MQTT password) are chunk_tree's ------------

def mqtt_password(secret):
    return ct.derive_key("fleetcast v1 mqtt password", secret)[:16].hex()


def mac_envelope(secret, tag, body):
    """A MAC'd envelope (§3): the body travels as a JSON string, MAC over TAG\\0 || body."""
    return mac_text(secret, tag, json.dumps(body, separators=(",", ":")))


def mac_text(secret, tag, text):
    """A MAC'd envelope of `text` exactly as given (a body already encoded)."""
    mac = ct.keyed_hash(secret, tag.encode() + b"\0" + text.encode())
    return {"body": text, "mac": mac.hex()}



def mac_ok(secret, tag, env):
    """Checks a MAC'd envelope over the body string exactly as received (never re-encoded)."""
    if not isinstance(env, dict) or not isinstance(env.get("body"), str) or not isinstance(env.get("mac"), str):
        return False
    want = ct.keyed_hash(secret, tag.encode() + b"\0" + env["body"].encode()).hex()
    return hmac.compare_digest(want, env["mac"].lower())  # §3: either case


def sig_ok(key_hex, tag, env):
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(key_hex)).verify(
            bytes.fromhex(env["sig"]), tag.encode() + b"\0" + env["body"].encode())
        return True
    except (InvalidSignature, ValueError):
        return False


# --- ids, versions (§1) ----------------------------------------------------------------------------

def is_id(s):
    return (isinstance(s, str) and 1 <= len(s) <= 64 and s not in (".", "..")
            and all(c.isascii() and (c.isalnum() or c in "._-") for c in s))


def is_artifact_id(s):
    return isinstance(s, str) and len(s) == 64 and all(c in "0123456789abcdef" for c in s)


def is_version(s):
    return isinstance(s, str) and 1 <= len(s) <= 64 and all(0x21 <= ord(c) <= 0x7e for c in s)


def version_key(v):
    """Sort key for §1's order: parts split on . - +; integers above text, numeric among themselves."""
    parts = v.replace("-", ".").replace("+", ".").split(".")
    key = []
    for p in parts:
        if p.isdigit() and p.isascii() and int(p) < 2 ** 64:
            key.append((1, int(p), b""))
        else:
            key.append((0, 0, p.encode()))
    return key  # list comparison: first difference decides, then the longer list is higher


def is_int(x, lo=0, hi=2 ** 64 - 1):
    return isinstance(x, int) and not isinstance(x, bool) and lo <= x <= hi


# --- chunk frames (§7.2) ---------------------------------------------------------------------------

CHUNK, MANIFEST, ERROR = 0, 1, 2


def parse_frame(b):
    if len(b) < 48 or b[:3] != b"FCK" or b[3] != 1 or b[4] > 3:
        return None
    typ, art = b[4], b[8:40].hex()
    index, total = int.from_bytes(b[40:44], "big"), int.from_bytes(b[44:48], "big")
    if typ != ERROR and index >= total:
        return None
    return typ, art, index, total, b[48:]


# --- persistence -----------------------------------------------------------------------------------

def write_atomic(path, data):
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def load_json(path, default):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default


# --- the notice (§4) -------------------------------------------------------------------------------

def parse_notice(body):
    """The notice's fields, or raises ValueError: then it is "not a valid notice" (§3.1)."""
    n = json.loads(body)
    a, t, p = n.get("artifact"), n.get("target"), n.get("policy")
    ok = (isinstance(n, dict) and is_id(n.get("release")) and is_int(n.get("seq")) and is_id(n.get("kind"))
          and isinstance(n.get("version"), str) and isinstance(a, dict) and is_artifact_id(a.get("id"))
          and is_int(a.get("size")) and is_int(a.get("chunk_size"), 0, 2 ** 32 - 1)
          and isinstance(a.get("name"), str) and isinstance(t, dict) and isinstance(p, dict)
          and p.get("type") in ("immediate", "window", "idle", "download_only")
          and isinstance(n.get("rollback", False), bool) and is_int(n.get("issued_at_ms")))
    # §4: a target is exactly one key, "machine" or "group" (extra keys: not a valid notice).
    if not ok or len(t) != 1 or next(iter(t)) not in ("machine", "group") or not is_id(next(iter(t.values()))):
        raise ValueError("not a valid notice")
    return n


def hhmm(s):
    if not (isinstance(s, str) and len(s) == 5 and s[2] == ":" and (s[:2] + s[3:]).isdigit()):
        raise ValueError(f"bad time {s!r}")
    h, m = int(s[:2]), int(s[3:])
    if h > 23 or m > 59:
        raise ValueError(f"bad time {s!r}")
    return h * 60 + m


def refusal(n, installed):
    """Why a verified notice on its own topic is refused (§4), or None."""
    a, p = n["artifact"], n["policy"]
    if not is_version(n["version"]):
        return f"invalid version {n['version']!r}"
    c = a["chunk_size"]
    if c < 1024 or c > 1 << 20 or c & (c - 1) or a["size"] == 0:
        return f"invalid artifact layout: size {a['size']}, chunk size {c}"
    if p["type"] == "window":
        try:
            if hhmm(p.get("start")) == hhmm(p.get("end")):
                return "invalid window: start equals end"
        except ValueError as e:
            return f"invalid window: {e}"
        if not is_int(p.get("utc_offset_minutes", 0), -840, 840):
            return "invalid window: utc_offset_minutes"
    if installed and not n.get("rollback") and version_key(n["version"]) < version_key(installed):
        return f"downgrade from {installed} to {n['version']} without rollback"
    return None


# --- the agent -------------------------------------------------------------------------------------

class Agent:
    def __init__(self, cfg, out, once):
        self.cfg, self.out, self.once = cfg, Path(out), once
        self.me = cfg["machine"]
        self.secret = bytes.fromhex(cfg["secret"])
        self.p = cfg.get("topic_prefix", "fleet").rstrip("/")  # §2: no trailing /
        self.data = Path(cfg["data_dir"])
        (self.data / "staging").mkdir(parents=True, exist_ok=True)
        root = {"key": cfg["platform_key"], "gen": cfg.get("platform_key_gen", 0)}
        self.st = load_json(self.data / "agent.json", {})
        if self.st.get("root") != root:  # a new config (or none yet): start from its key
            self.st["root"], self.st["current"] = root, dict(root)
        self.st.setdefault("kinds", {})
        self.st.setdefault("cmd_seq", 0)
        self.st.setdefault("seen", [])  # hashes of unverified notices already reported
        # The groups the platform named in a `groups` command (§5) win over the config's.
        self.groups = list(self.st.get("groups", cfg.get("groups", [])))
        # Counter (§2): never reused; reserved 10,000 at a time, so a crash skips but never repeats.
        self.ctr = self.st.get("ctr_reserved") or int(time.time() * 1e6)
        self.st["ctr_reserved"] = self.ctr
        self.outbox = load_json(self.data / "outbox.json", [])
        # Events MAC'd with another secret (the config was rotated or corrected, §6.1) never
        # verify again, and the head would hold every later event back: MAC them again with
        # this secret, each body (and so its counter) unchanged.
        stale = [e for e in self.outbox if not mac_ok(self.secret, STATUS_TAG, e["env"])]
        for e in stale:
            e["env"] = mac_text(self.secret, STATUS_TAG, e["env"]["body"])
        if stale:
            log(f"{len(stale)} queued status event(s) were MAC'd with another secret: MAC'd again")
            write_atomic(self.data / "outbox.json", json.dumps(self.outbox).encode())
        self.save()
        self.q = queue.Queue()
        self.connected = False
        self.inflight_at = None      # when the outbox head was last sent (None: nothing in flight)
        self.unacked_since = None
        self.next_state_at = None
        self.dls = {}                # kind -> its running Download
        self.unverified_times = {}   # rate limit of unverified-notice reports (§3.1)
        self.installed_once = False

    # persistence
    def save(self):
        write_atomic(self.data / "agent.json", json.dumps(self.st, indent=1).encode())

    def next_ctr(self):
        if self.ctr >= self.st["ctr_reserved"]:
            self.st["ctr_reserved"] = self.ctr + 10_000
            self.save()
        self.ctr += 1
        return self.ctr - 1

    def kind(self, k):
        return self.st["kinds"].setdefault(k, {"seq": 0})

    def t(self, rest):
        return f"{self.p}/{rest}"

    # MQTT plumbing: paho's thread only queues; everything else happens in run()'s thread
    def connect(self):
        url = self.cfg.get("broker", "mqtt://127.0.0.1:1883")
        scheme, _, hostport = url.partition("://")
        host, _, port = hostport.rstrip("/").rpartition(":")
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.me, clean_session=True,
                        protocol=mqtt.MQTTv311)
        c.username_pw_set(self.me, mqtt_password(self.secret))
        c.will_set(self.t(f"machines/{self.me}/online"), b"false", qos=1, retain=True)
        if scheme == "mqtts":
            c.tls_set(ca_certs=self.cfg.get("ca_file"))
        c.on_socket_open = lambda cl, ud, sock: sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c.on_connect = lambda cl, ud, flags, rc, props: self.q.put(("connect", rc))
        c.on_disconnect = lambda cl, ud, flags, rc, props: self.q.put(("disconnect", rc))
        c.on_message = lambda cl, ud, msg: self.q.put(("message", msg))
        c.reconnect_delay_set(1, 5)
        c.connect_async(host, int(port or (8883 if scheme == "mqtts" else 1883)), keepalive=30)
        c.loop_start()
        self.c = c

    def on_connect(self, rc):
        if rc.is_failure:
            log(f"WARNING: broker refused the connection: {rc} (code {rc.value})"
                + (": credentials refused (revoked? wrong secret?)" if rc.value in (4, 5) else ""))
            return
        self.connected = True
        log("connected")
        me = f"machines/{self.me}"
        filters = [("platform/keys", 1), (f"{me}/status/ack", 1), (f"{me}/command", 1)]
        filters += [(f"{me}/chunks", 0), (f"{me}/release/+", 1)]
        filters += [(f"groups/{g}/release/+", 1) for g in self.groups]
        filters += [(f"artifacts/{a}/chunks", 0) for a in {d.id for d in self.dls.values()}]
        # One filter per SUBSCRIBE: the key chain first (§3.1), the release topics after the
        # ack topic (their retained notices come at once, §2).
        for f, qos in filters:
            self.c.subscribe(self.t(f), qos)
        self.c.publish(self.t(f"{me}/online"), b"true", qos=0, retain=True)
        self.publish_state()
        self.next_state_at = time.time() + random.uniform(20, 40)
        self.inflight_at = None
        self.pump()
        for d in self.dls.values():
            if d.attempt == 0:
                self.attempt(d)
            else:
                self.request(d, again=True)

    # state (§6.2) ---------------------------------------------------------------------------------
    def publish_state(self):
        kinds = {}
        for k, ks in self.st["kinds"].items():
            e = {key: ks[key] for key in ("version", "artifact", "release", "phase") if ks.get(key)}
            if ks.get("seq"):
                e["seq"] = ks["seq"]
            if e:
                kinds[k] = e
        body = {"machine": self.me, "ctr": self.next_ctr(), "at_ms": now_ms(), "agent_version": AGENT_VERSION,
                "groups": self.groups, "busy": False, "key_gen": self.st["current"]["gen"], "kinds": kinds}
        if self.connected:
            env = mac_envelope(self.secret, "fleetcast/v1/state", body)
            self.c.publish(self.t(f"machines/{self.me}/state"), json.dumps(env), qos=0, retain=True)

    # status events and the outbox (§6.1) ------------------------------------------------------------
    def report(self, kind, phase, notice=None, **extra):
        body = {"machine": self.me, "ctr": self.next_ctr(), "at_ms": now_ms()}
        if notice:
            body["release"] = notice["release"]
        body.update(kind=kind, version=notice["version"] if notice else "", phase=phase)
        body.update({k: v for k, v in extra.items() if v is not None})
        body.setdefault("attempt", 1)
        log(f"report {kind} {phase}", {k: v for k, v in extra.items() if v is not None})
        self.outbox.append({"ctr": body["ctr"], "env": mac_envelope(self.secret, STATUS_TAG, body)})
        write_atomic(self.data / "outbox.json", json.dumps(self.outbox).encode())  # durable before sent
        if notice and phase != "rejected":
            ks = self.kind(kind)
            ks["release"], ks["phase"] = notice["release"], phase
            ks["last"] = {"notice": notice, "phase": phase, **extra}
            self.save()
            self.publish_state()
        self.pump()

    def pump(self):
        """Sends the outbox head (one event, or a batch of up to 64 and 64 KiB) if nothing is in
        flight, or again after ACK_RESEND_S without an ack."""
        if not self.connected or not self.outbox:
            return
        if self.inflight_at is not None and time.time() - self.inflight_at < ACK_RESEND_S:
            return
        if self.inflight_at is not None:
            log(f"no status ack for {ACK_RESEND_S} s: sending from the outbox head again")
            if time.time() - self.unacked_since > 60:
                log(f"ERROR: no status acknowledgement for {time.time() - self.unacked_since:.0f} s:"
                    " wrong secret or revoked?")
        batch, size = [], 2
        for e in self.outbox[:64]:
            size += len(json.dumps(e["env"])) + 1
            if batch and size > 64 * 1024:
                break
            batch.append(e["env"])
        payload = json.dumps(batch[0] if len(batch) == 1 else batch)
        self.c.publish(self.t(f"machines/{self.me}/status"), payload, qos=1)
        log(f"sent {len(batch)} status event(s), ctr {self.outbox[0]['ctr']}..")
        self.inflight_at = time.time()
        self.unacked_since = self.unacked_since or self.inflight_at

    def on_ack(self, payload):
        try:
            env = json.loads(payload)
            if not mac_ok(self.secret, "fleetcast/v1/status-ack", env):
                return log("ignored a status ack whose MAC does not verify")
            ack = json.loads(env["body"])
        except (ValueError, AttributeError):
            return log("ignored a malformed status ack")
        if ack.get("machine") != self.me or not is_int(ack.get("ctr")):
            return
        before = len(self.outbox)
        self.outbox = [e for e in self.outbox if e["ctr"] > ack["ctr"]]
        if len(self.outbox) < before:  # it acknowledged something: send what is left at once
            write_atomic(self.data / "outbox.json", json.dumps(self.outbox).encode())
            self.inflight_at, self.unacked_since = None, None
            self.pump()

    # signed messages: which key (§3.1) --------------------------------------------------------------
    def check_signed(self, env, tag):
        """'ok', 'ignore' (gen ahead of ours) or an error text."""
        if not isinstance(env, dict) or not isinstance(env.get("body"), str):
            return "not an envelope"
        sig, gen = env.get("sig"), env.get("gen", 0)
        if not is_int(gen, 0, 2 ** 32 - 1):  # §3.1: a u32
            return "bad gen"
        cur = self.st["current"]
        if gen > cur["gen"]:  # before anything else about the message (§3.1)
            return "ignore"
        if not (isinstance(sig, str) and len(sig) == 128 and all(c in "0123456789abcdefABCDEF" for c in sig)):
            return "sig is not 128 hex digits"
        if gen < cur["gen"]:
            return f"signed by key generation {gen}, below the trusted {cur['gen']}"
        return "ok" if sig_ok(cur["key"], tag, env) else "bad signature"

    def on_keys(self, payload):
        if not payload:
            return
        try:
            if len(payload) > MAX_ENVELOPE:
                raise ValueError("over 256 KiB")
            g, key = self.st["current"]["gen"], self.st["current"]["key"]
            for link in json.loads(payload)["links"]:
                if link.get("gen", 0) + 1 <= g:
                    continue
                if not sig_ok(key, "fleetcast/v1/key-rotation", link):
                    raise ValueError("a link's signature does not verify")
                a = json.loads(link["body"])
                if a.get("generation") != g + 1 or not is_artifact_id(a.get("key")):
                    raise ValueError("links out of order")
                g, key = a["generation"], a["key"]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            return log(f"WARNING: refused the key chain: {e}")
        if g > self.st["current"]["gen"]:
            self.st["current"] = {"key": key, "gen": g}
            self.save()  # durable before anything is checked with it
            log(f"now trusting platform key generation {g}")
            self.publish_state()

    # release notices (§3.1, §4) ---------------------------------------------------------------------
    def on_notice(self, topic, payload):
        if not payload:
            return log(f"notice cleared on {topic}")
        kind = topic.rsplit("/", 1)[1]
        if not is_id(kind):  # §1: dropped. Reporting it would be an event the platform never acks
            return log(f"dropped a message on {topic}: its kind is not an id")
        n, why = None, None
        try:
            if len(payload) > MAX_ENVELOPE:
                raise ValueError("envelope over 256 KiB")
            env = json.loads(payload)
            why = self.check_signed(env, "fleetcast/v1/release")
            if why == "ignore":
                return log(f"ignored a notice signed by a key generation not reached yet on {topic}")
            if why == "ok":
                why, n = None, parse_notice(env["body"])
                tgt = n["target"]
                where = f"machines/{tgt['machine']}" if "machine" in tgt else f"groups/{tgt['group']}"
                own = self.t(f"{where}/release/{n['kind']}")
                if own != topic:
                    why = f"release {n['release']} belongs on {own}, not on this topic"
        except (ValueError, TypeError, AttributeError) as e:
            why = str(e) or "not a valid notice"
        if why:
            return self.report_unverified(topic, kind, payload, why)
        ks = self.kind(kind)
        if n["seq"] <= ks["seq"] or n["seq"] == ks.get("rejected_seq"):
            return  # already accepted (retained copy) or already refused
        bad = refusal(n, ks.get("version"))
        if bad:
            ks["rejected_seq"] = n["seq"]
            self.save()
            shown = n if is_version(n["version"]) else {**n, "version": ""}  # or the event is refused
            return self.report(kind, "rejected", shown, error=f"notice refused: {bad}")
        ks["seq"] = n["seq"]
        a = n["artifact"]
        if n["version"] == ks.get("version") and a["id"] == ks.get("artifact"):
            self.save()
            return self.report(kind, "installed", n, detail="already installed")
        if kind in self.dls:  # a newer notice replaces a download in progress (§4)
            self.stop_download(kind)
        ks["job"] = {"notice": n, "step": "downloading", "activated": False}
        self.save()  # the accepted seq and its job, together
        self.report(kind, "notified", n)
        self.start_download(n)

    def report_unverified(self, topic, kind, payload, why):
        h = ct.blake3(payload).hex()
        now = time.time()
        recent = [t for t in self.unverified_times.values() if 0 <= now - t < 60]
        if h in self.st["seen"] or 0 <= now - self.unverified_times.get(topic, -1e9) < 60 or len(recent) >= 4:
            return log(f"unverified notice on {topic} not reported: {why}")
        self.unverified_times[topic] = now
        self.st["seen"] = (self.st["seen"] + [h])[-32:]
        self.save()
        self.report(kind, "rejected", None, error=f"notice refused: {why}", detail=f"unverified notice on {topic}")

    # commands (§5) ----------------------------------------------------------------------------------
    def on_command(self, payload):
        try:
            env = json.loads(payload)
            why = self.check_signed(env, "fleetcast/v1/command")
            if why != "ok":
                return log(f"command refused: {why}")
            cmd = json.loads(env["body"])
        except (ValueError, TypeError, AttributeError):
            return log("command refused: malformed")
        if cmd.get("machine") != self.me or not is_int(cmd.get("seq")) or cmd["seq"] <= self.st["cmd_seq"]:
            return log("command refused: not for this machine, or an old seq")
        self.st["cmd_seq"] = cmd["seq"]
        self.save()
        action, rel = cmd.get("action"), cmd.get("release")
        if action == "groups":
            named = cmd.get("groups")
            if not isinstance(named, list) or not all(isinstance(g, str) for g in named):
                return log("command refused: groups is not a list of group ids")
            left = [g for g in self.groups if g not in named]
            joined = [g for g in named if g not in self.groups]
            self.groups = self.st["groups"] = list(named)
            self.save()
            log(f"the platform says this machine is in groups {named}")
            if self.connected:
                for g in left:
                    self.c.unsubscribe(self.t(f"groups/{g}/release/+"))
                for g in joined:
                    self.c.subscribe(self.t(f"groups/{g}/release/+"), 1)
            self.publish_state()
            return
        if action == "report":
            self.publish_state()
            for k, ks in self.st["kinds"].items():
                if ks.get("last"):
                    last = dict(ks["last"])
                    self.report(k, last.pop("phase"), last.pop("notice"), **last)
            return
        for k, ks in self.st["kinds"].items():
            job = ks.get("job")
            if not job or job["notice"]["release"] != rel:
                continue
            if action == "activate":
                job["activated"] = True
                self.save()
                if job["step"] == "deferred":
                    self.install(k)
            elif action == "cancel" and job["step"] != "installing":
                if k in self.dls:
                    self.stop_download(k)
                ks["job"] = None
                self.save()
                self.report(k, "cancelled", job["notice"])

    # downloads (§7) ---------------------------------------------------------------------------------
    def start_download(self, n):
        d = Download(n, self.data / "staging")
        self.dls[n["kind"]] = d
        if self.connected:
            self.c.subscribe(self.t(f"artifacts/{d.id}/chunks"), 0)  # before the first request
            self.attempt(d)

    def stop_download(self, kind):
        d = self.dls.pop(kind)
        d.file.close()
        if d.id not in {o.id for o in self.dls.values()} and self.connected:
            self.c.unsubscribe(self.t(f"artifacts/{d.id}/chunks"))

    def attempt(self, d, error=None):
        """Starts the next download attempt, or gives up after ATTEMPTS (§6.1)."""
        d.error = error or d.error
        if d.attempt >= ATTEMPTS:
            self.stop_download(d.kind)
            self.kind(d.kind)["job"] = None
            self.save()
            return self.report(d.kind, "download_failed", d.notice, attempt=d.attempt, error=d.error)
        d.attempt += 1
        d.retry_at, d.requested, d.stall = None, {}, 2.0
        d.last_progress = d.last_activity = d.last_report = time.time()
        d.reported_bytes = d.bytes()
        self.report(d.kind, "downloading", d.notice, progress={"bytes": d.bytes(), "total": d.size},
                    attempt=d.attempt)
        self.request(d, again=True)

    def request(self, d, again=False):
        """Fills the window of chunks in flight; with `again` (a new attempt, a stall, a reconnect)
        also asks for the manifest if it is not verified and for every chunk still outstanding."""
        body = {"machine": self.me, "ctr": 0, "artifact": d.id}
        if again and d.cvs is None and d.n > 1:
            self.ask_manifest(d, body)
        new = []
        if d.cvs is not None or d.n == 1 or not d.requested:  # before the manifest: one window only
            for i in range(d.n):
                if len(d.requested) >= WINDOW:
                    break
                if i not in d.have and i not in d.held and i not in d.requested:
                    d.requested[i] = time.time()
                    new.append(i)
        wanted = sorted(i for i in d.requested if i not in d.held) if again else new
        ranges = []
        for i in wanted:
            if ranges and ranges[-1][1] == i:
                ranges[-1][1] = i + 1
            else:
                ranges.append([i, i + 1])
        if ranges or "manifest" in body:
            self.send_request(d, body, ranges)

    def ask_manifest(self, d, body):
        """The manifest whole, or from its first missing part at most 32 parts (§7.3)."""
        body["manifest"] = True
        if d.parts > MANIFEST_WINDOW:
            first = min(p for p in range(d.parts) if p not in d.manifest)
            d.manifest_end = min(first + MANIFEST_WINDOW, d.parts)
            body["manifest_parts"] = [first, d.manifest_end]

    def send_request(self, d, body, ranges):
        body.update(ctr=self.next_ctr(), chunks=ranges)
        env = mac_envelope(self.secret, "fleetcast/v1/chunks-get", body)
        self.c.publish(self.t(f"machines/{self.me}/chunks/get"), json.dumps(env), qos=0)
        d.last_activity = time.time()

    def on_frame(self, topic, payload):
        f = parse_frame(payload)
        if f is None:
            return
        typ, art, index, total, data = f
        if typ == ERROR:  # only on our own topic: anyone may publish on the artifact topic
            # ... and only MAC'd with our secret (§7.2): it ends the attempt, so one anyone could
            # publish on a broker without ACLs must not count.
            if topic == self.t(f"machines/{self.me}/chunks") and len(payload) >= 48 + 32:
                frame, mac = payload[:-32], payload[-32:]
                if not hmac.compare_digest(ct.keyed_hash(self.secret, CHUNK_ERROR_TAG + frame), mac):
                    return
                reason = frame[48:].decode(errors="replace")
                for d in [d for d in self.dls.values() if d.id == art and d.retry_at is None]:
                    log(f"error frame: {reason}")
                    self.attempt(d, error=reason)
            return
        for d in list(self.dls.values()):
            if d.id != art or d.retry_at is not None:
                continue
            if typ == MANIFEST and d.n > 1 and d.cvs is None and total == d.parts:
                if len(data) == min(d.C, 32 * d.n - index * d.C):
                    d.manifest.setdefault(index, data)
                self.manifest_progress(d)
            elif typ == CHUNK and total == d.n and len(data) == d.chunk_len(index) and index not in d.have:
                if d.cvs is None and d.n > 1:
                    if len(d.held) < WINDOW:
                        d.held.setdefault(index, data)  # checked once the manifest verifies
                else:
                    self.take_chunk(d, index, data)
            if d.kind in self.dls and len(d.have) == d.n:
                self.finish_download(d)
            elif d.kind in self.dls and len(d.requested) <= WINDOW // 2:
                self.request(d)

    def manifest_progress(self, d):
        if len(d.manifest) < d.parts:
            if d.parts > MANIFEST_WINDOW and all(p in d.manifest for p in range(d.manifest_end)):
                body = {"machine": self.me, "ctr": 0, "artifact": d.id}
                self.ask_manifest(d, body)  # the next window of parts
                self.send_request(d, body, [])
            return
        m = b"".join(d.manifest[p] for p in range(d.parts))
        cvs = [m[i:i + 32] for i in range(0, len(m), 32)]
        if ct.merge(cvs, root=True).hex() != d.id:
            log("manifest does not verify: asking again")
            d.manifest, d.held, d.requested = {}, {}, {}
            return self.request(d, again=True)
        d.cvs, held, d.held = cvs, d.held, {}
        for i, data in sorted(held.items()):
            self.take_chunk(d, i, data)

    def take_chunk(self, d, i, data):
        ok = (ct.blake3(data).hex() == d.id) if d.n == 1 else ct.artifact_chunk_cv(data, i, d.C) == d.cvs[i]
        d.requested.pop(i, None)  # a bad chunk is asked for again alone
        if not ok:
            return log(f"chunk {i} does not verify: dropped")
        d.file.seek(i * d.C)
        d.file.write(data)
        d.have.add(i)
        now = time.time()
        if now - d.last_progress < d.stall / 2:
            if now - d.fast_since >= 2 * d.stall and d.stall > 2:
                d.stall, d.fast_since = d.stall / 2, now  # chunks come fast again
        else:
            d.fast_since = now
        d.last_progress = d.last_activity = now
        b = d.bytes()
        if b < d.size and now - d.last_report >= 5 and b - d.reported_bytes >= d.size / 10:
            d.last_report, d.reported_bytes = now, b
            self.report(d.kind, "downloading", d.notice, progress={"bytes": b, "total": d.size}, attempt=d.attempt)

    def tick_download(self, d):
        now = time.time()
        if d.retry_at is not None:
            if now >= d.retry_at:
                self.attempt(d)
        elif now - d.last_progress > NO_PROGRESS_S:
            d.error = f"no progress for {NO_PROGRESS_S} s"
            if d.attempt >= ATTEMPTS:
                return self.attempt(d)
            d.retry_at = now + 10 * 2 ** (d.attempt - 1) * random.uniform(0.5, 1.5)
            log(f"download attempt {d.attempt} stalled; next in {d.retry_at - now:.0f} s")
        elif now - d.last_activity > d.stall:
            self.request(d, again=True)  # ask again for everything outstanding
            d.stall = min(d.stall * 2, 16.0)

    def finish_download(self, d):
        d.file.flush()
        os.fsync(d.file.fileno())
        self.stop_download(d.kind)
        (self.data / "artifacts").mkdir(exist_ok=True)
        os.replace(d.path, self.data / "artifacts" / d.id)
        ks = self.kind(d.kind)
        ks["job"]["step"] = "downloaded"
        self.save()
        self.report(d.kind, "downloaded", d.notice)
        self.maybe_install(d.kind)

    # installs -------------------------------------------------------------------------------------
    def maybe_install(self, kind):
        job = self.kind(kind)["job"]
        p = job["notice"]["policy"]
        why = None
        if p["type"] == "download_only" and not job["activated"]:
            why = "waiting for activate"
        elif p["type"] == "window" and not job["activated"]:
            off = p.get("utc_offset_minutes", self.cfg.get("utc_offset_minutes", 0))
            t = (time.time() // 60 + off) % 1440
            s, e = hhmm(p["start"]), hhmm(p["end"])
            if not (s <= t < e if s < e else t >= s or t < e):
                why = f"waiting for window {p['start']}-{p['end']}"
        if why is None:
            return self.install(kind)
        if job["step"] != "deferred":
            job["step"] = "deferred"
            self.save()
            self.report(kind, "deferred", job["notice"], detail=why)

    def install(self, kind):
        ks = self.kind(kind)
        job = ks["job"]
        n = job["notice"]
        aid = n["artifact"]["id"]
        if job["step"] != "installing":
            job["step"] = "installing"
            self.save()
            self.report(kind, "installing", n)
        dest = self.out / kind
        dest.mkdir(parents=True, exist_ok=True)
        write_atomic(dest / aid, (self.data / "artifacts" / aid).read_bytes())  # idempotent
        write_atomic(dest / "current.json", json.dumps({"version": n["version"], "artifact": aid,
                                                        "release": n["release"]}).encode())
        ks.update(version=n["version"], artifact=aid, job=None)
        self.save()
        self.report(kind, "installed", n)
        print(json.dumps({"installed": {"kind": kind, "version": n["version"], "release": n["release"],
                                        "artifact": aid, "path": str(dest / aid)}}), flush=True)
        self.installed_once = True

    # the loop ---------------------------------------------------------------------------------------
    def handle(self, ev):
        what, arg = ev
        if what == "connect":
            return self.on_connect(arg)
        if what == "disconnect":
            self.connected = False
            return log(f"disconnected: {arg}")
        topic, payload = arg.topic, arg.payload
        me = self.t(f"machines/{self.me}")
        if topic == self.t("platform/keys"):
            self.on_keys(payload)
        elif topic.startswith(f"{me}/release/") or any(
                topic.startswith(self.t(f"groups/{g}/release/")) for g in self.groups):
            self.on_notice(topic, payload)
        elif topic == f"{me}/command":
            self.on_command(payload)
        elif topic == f"{me}/status/ack":
            self.on_ack(payload)
        elif topic == f"{me}/chunks" or (topic.startswith(self.t("artifacts/")) and topic.endswith("/chunks")):
            self.on_frame(topic, payload)

    def tick(self):
        for d in list(self.dls.values()):
            self.tick_download(d)
        for k, ks in self.st["kinds"].items():  # windows that open, idle (never busy here)
            if ks.get("job") and ks["job"]["step"] == "deferred":
                self.maybe_install(k)
        self.pump()
        if self.connected and self.next_state_at and time.time() >= self.next_state_at:
            self.publish_state()  # repeated: a broker may drop states (§6.2)
            self.next_state_at = time.time() + random.uniform(300, 600)

    def resume(self):
        """Jobs persisted by an earlier run go on where they were (§4)."""
        for k, ks in self.st["kinds"].items():
            job = ks.get("job")
            if not job:
                continue
            if job["step"] == "downloading":
                self.start_download(job["notice"])
            elif job["step"] == "installing":
                self.install(k)
            else:
                self.maybe_install(k)

    def run(self, timeout):
        self.connect()
        self.resume()
        deadline = time.time() + timeout if timeout else None
        try:
            while True:
                if self.once and self.installed_once and not self.outbox:
                    log("installed, and every report acknowledged")
                    return 0
                if deadline and time.time() > deadline:
                    log(f"ERROR: timed out after {timeout} s")
                    return 1
                try:
                    self.handle(self.q.get(timeout=0.2))
                except queue.Empty:
                    pass
                self.tick()
        finally:
            if self.connected:  # a clean shutdown: `false` on online, then DISCONNECT (§2)
                self.c.publish(self.t(f"machines/{self.me}/online"), b"false", qos=0, retain=True).wait_for_publish(2)
                self.c.disconnect()
            self.c.loop_stop()


class Download:
    """One artifact download: the manifest, verified chunks written to a staging file."""

    def __init__(self, notice, staging):
        a = notice["artifact"]
        self.notice, self.kind, self.id = notice, notice["kind"], a["id"]
        self.size, self.C = a["size"], a["chunk_size"]
        self.n = -(-self.size // self.C)
        self.parts = -(-32 * self.n // self.C)
        self.manifest, self.cvs, self.held, self.have, self.requested = {}, None, {}, set(), {}
        self.manifest_end = 0
        self.attempt, self.error, self.retry_at, self.stall, self.fast_since = 0, None, None, 2.0, 0.0
        self.path = staging / f"{self.id}.part"
        self.file = open(self.path, "w+b")
        self.file.truncate(self.size)

    def chunk_len(self, i):
        return min(self.C, self.size - i * self.C)

    def bytes(self):
        return sum(self.chunk_len(i) for i in self.have)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="the machine's TOML config (`fleetcast machine provision`)")
    ap.add_argument("--out", required=True, help="where installed artifacts are written")
    ap.add_argument("--once", action="store_true", help="exit 0 after the first install is acknowledged")
    ap.add_argument("--timeout", type=float, default=0, help="give up (exit 1) after this many seconds")
    args = ap.parse_args()
    with open(args.config, "rb") as f:
        cfg = tomllib.load(f)
    sys.exit(Agent(cfg, args.out, args.once).run(args.timeout))


if __name__ == "__main__":
    main()
