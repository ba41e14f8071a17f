#!/usr/bin/env python3
"""Chunk chaining values, manifest and root of an artifact, exactly as docs/protocol.md §7.1
defines them, from nothing but the BLAKE3 compression function (no BLAKE3 library); and
BLAKE3's two other modes the protocol uses, keyed_hash (MACs, §3) and derive_key (MQTT
passwords, §2).

For agent authors whose BLAKE3 library has no way to hash a subtree at an offset or to get a
non-root chaining value, or who have no BLAKE3 library at all: this is the whole algorithm, in
plain Python, to port or to check against. It is slow (pure Python); use it on small inputs.

    scripts/chunk_tree.py FILE CHUNK_SIZE        # prints {"artifact", "chunk_cvs", "manifest"}
    scripts/chunk_tree.py --check VECTORS.json   # recomputes docs/test-vectors/chunks.json
    scripts/chunk_tree.py --check-keyed DIR      # recomputes DIR/macs.json and mqtt-passwords.json

Both check modes are run by tests (proto/tests/it: the vectors), so this file and the pages
cannot drift from the Rust implementation.
"""

import json
import sys

IV = [0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A,
      0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19]
PERMUTATION = [2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8]
CHUNK_START, CHUNK_END, PARENT, ROOT = 1, 2, 4, 8
# BLAKE3's mode flags: keyed_hash, and derive_key's two steps (context, then key material).
KEYED_HASH, DERIVE_KEY_CONTEXT, DERIVE_KEY_MATERIAL = 16, 32, 64
BLOCK_LEN, CHUNK_LEN = 64, 1024
MASK = 0xFFFFFFFF


def _rotr(x, n):
    return ((x >> n) | (x << (32 - n))) & MASK


def _g(s, a, b, c, d, mx, my):
    s[a] = (s[a] + s[b] + mx) & MASK
    s[d] = _rotr(s[d] ^ s[a], 16)
    s[c] = (s[c] + s[d]) & MASK
    s[b] = _rotr(s[b] ^ s[c], 12)
    s[a] = (s[a] + s[b] + my) & MASK
    s[d] = _rotr(s[d] ^ s[a], 8)
    s[c] = (s[c] + s[d]) & MASK
    s[b] = _rotr(s[b] ^ s[c], 7)


def compress(cv, block, counter, block_len, flags):
    """BLAKE3's compression function; returns the 8-word chaining value it outputs."""
    m = [int.from_bytes(block[4 * i:4 * i + 4], "little") for i in range(16)]
    s = list(cv) + IV[:4] + [counter & MASK, (counter >> 32) & MASK, block_len, flags]
    for r in range(7):
        _g(s, 0, 4, 8, 12, m[0], m[1])
        _g(s, 1, 5, 9, 13, m[2], m[3])
        _g(s, 2, 6, 10, 14, m[4], m[5])
        _g(s, 3, 7, 11, 15, m[6], m[7])
        _g(s, 0, 5, 10, 15, m[8], m[9])
        _g(s, 1, 6, 11, 12, m[10], m[11])
        _g(s, 2, 7, 8, 13, m[12], m[13])
        _g(s, 3, 4, 9, 14, m[14], m[15])
        if r < 6:
            m = [m[p] for p in PERMUTATION]
    return [s[i] ^ s[i + 8] for i in range(8)]


def to_bytes(words):
    return b"".join(w.to_bytes(4, "little") for w in words)


def from_bytes(cv):
    return [int.from_bytes(cv[4 * i:4 * i + 4], "little") for i in range(8)]


def blake3_chunk_cv(data, counter, root=False, key=IV, mode=0):
    """CV of one BLAKE3 chunk (0 to 1024 bytes) with chunk counter `counter`. `key` (8 words)
    and `mode` (a mode flag) are IV and 0 for the plain hash."""
    cv = key
    blocks = [data[i:i + BLOCK_LEN] for i in range(0, len(data), BLOCK_LEN)] or [b""]
    for n, block in enumerate(blocks):
        flags = mode | (CHUNK_START if n == 0 else 0)
        if n == len(blocks) - 1:
            flags |= CHUNK_END | (ROOT if root else 0)
        cv = compress(cv, block.ljust(BLOCK_LEN, b"\0"), counter, len(block), flags)
    return to_bytes(cv)


def parent_cv(left, right, root=False, key=IV, mode=0):
    """CV of a parent node: its two children's 32-byte CVs as one 64-byte block."""
    return to_bytes(compress(key, left + right, 0, BLOCK_LEN, mode | PARENT | (ROOT if root else 0)))


def left_len(n):
    """BLAKE3's tree is left-full: the left subtree holds the largest power of two below n."""
    p = 1
    while p * 2 < n:
        p *= 2
    return p


def merge(cvs, root=False, key=IV, mode=0):
    """Merges subtree CVs (left to right) as BLAKE3's tree does; only the top may be root."""
    if len(cvs) == 1:
        return cvs[0]
    k = left_len(len(cvs))
    return parent_cv(merge(cvs[:k], False, key, mode), merge(cvs[k:], False, key, mode), root, key, mode)


def blake3(data, key=IV, mode=0):
    """The 32-byte BLAKE3 output of `data` (default mode: the plain hash)."""
    if len(data) <= CHUNK_LEN:
        return blake3_chunk_cv(data, 0, True, key, mode)
    leaves = [blake3_chunk_cv(data[i:i + CHUNK_LEN], i // CHUNK_LEN, False, key, mode)
              for i in range(0, len(data), CHUNK_LEN)]
    return merge(leaves, True, key, mode)


def keyed_hash(key, data):
    """BLAKE3 keyed_hash with a 32-byte key: the protocol's MAC (§3)."""
    return blake3(data, from_bytes(key), KEYED_HASH)


def derive_key(context, material):
    """BLAKE3 derive_key: the context string hashed in its mode gives the key under which the
    material is hashed in the next. The protocol's MQTT password is its first 16 bytes (§2)."""
    context_key = blake3(context.encode(), IV, DERIVE_KEY_CONTEXT)
    return blake3(material, from_bytes(context_key), DERIVE_KEY_MATERIAL)


def artifact_chunk_cv(data, index, chunk_size):
    """CV (non-root) of artifact chunk `index`: the subtree over its BLAKE3 chunks, which are
    numbered from index * chunk_size / 1024."""
    first = index * (chunk_size // CHUNK_LEN)
    leaves = [blake3_chunk_cv(data[i:i + CHUNK_LEN], first + i // CHUNK_LEN)
              for i in range(0, len(data), CHUNK_LEN)]
    return merge(leaves)


def chunk_tree(data, chunk_size):
    assert chunk_size >= CHUNK_LEN and chunk_size & (chunk_size - 1) == 0
    chunks = [data[i:i + chunk_size] for i in range(0, len(data), chunk_size)]
    cvs = [artifact_chunk_cv(c, i, chunk_size) for i, c in enumerate(chunks)]
    if len(cvs) == 1:
        # One chunk: the artifact id is the plain hash, i.e. the same subtree finalised as root.
        leaves = [blake3_chunk_cv(data[i:i + CHUNK_LEN], i // CHUNK_LEN, root=len(data) <= CHUNK_LEN)
                  for i in range(0, len(data), CHUNK_LEN)]
        artifact = leaves[0] if len(leaves) == 1 else merge(leaves, root=True)
    else:
        artifact = merge(cvs, root=True)
    return {"artifact": artifact.hex(), "chunk_cvs": [cv.hex() for cv in cvs],
            "manifest": b"".join(cvs).hex()}


def check(path):
    doc = json.load(open(path))
    failures = 0
    for v in doc["vectors"]:
        data = bytes(i % 251 for i in range(v["size"]))
        got = chunk_tree(data, v["chunk_size"])
        want = {"artifact": v["artifact"], "chunk_cvs": [c["cv"] for c in v["chunks"]],
                "manifest": v["manifest"]}
        for c in v["chunks"]:
            for leaf in c.get("leaves", []):
                start = leaf["counter"] * CHUNK_LEN
                cv = blake3_chunk_cv(data[start:start + CHUNK_LEN], leaf["counter"])
                if cv.hex() != leaf["cv"]:
                    print(f"{v['name']}: leaf {leaf['counter']} -> {cv.hex()}, vector says {leaf['cv']}")
                    failures += 1
        for p in v.get("parents", []):
            cv = parent_cv(bytes.fromhex(p["left"]), bytes.fromhex(p["right"]), p["root"])
            if cv.hex() != p["cv"]:
                print(f"{v['name']}: parent {p['left'][:8]}+{p['right'][:8]} -> {cv.hex()}, vector says {p['cv']}")
                failures += 1
        if got != want:
            print(f"{v['name']}: computed {got}, vector says {want}")
            failures += 1
    print(f"{len(doc['vectors'])} chunk vectors, {failures} failed")
    return failures == 0


def check_keyed(directory):
    """Recomputes the MAC and MQTT password vectors (macs.json, mqtt-passwords.json)."""
    failures, count = 0, 0
    macs = json.load(open(f"{directory}/macs.json"))
    secret = bytes.fromhex(macs["secret"])
    for v in macs["vectors"]:
        count += 1
        mac = keyed_hash(secret, v["tag"].encode() + v["body"].encode()).hex()
        if mac != v["mac"]:
            print(f"MAC of a {v['purpose']} body -> {mac}, vector says {v['mac']}")
            failures += 1
    for v in json.load(open(f"{directory}/mqtt-passwords.json"))["vectors"]:
        count += 1
        derived = derive_key("fleetcast v1 mqtt password", bytes.fromhex(v["secret"]))
        if derived.hex() != v["derived_key"] or derived[:16].hex() != v["password"]:
            print(f"password of {v['secret'][:8]}… -> {derived.hex()}, vector says {v['derived_key']}")
            failures += 1
    print(f"{count} keyed vectors, {failures} failed")
    return failures == 0


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--check":
        sys.exit(0 if check(sys.argv[2]) else 1)
    if len(sys.argv) == 3 and sys.argv[1] == "--check-keyed":
        sys.exit(0 if check_keyed(sys.argv[2]) else 1)
    if len(sys.argv) == 3:
        data = open(sys.argv[1], "rb").read()
        print(json.dumps(chunk_tree(data, int(sys.argv[2]))))
        return
    sys.exit(__doc__)


if __name__ == "__main__":
    main()
