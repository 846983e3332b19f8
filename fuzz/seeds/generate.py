#!/usr/bin/env python3
"""Writes the committed seed corpus, fuzz/seeds/<target>/: real frames, commands, pipeline
files and tokens in the shapes the decoders accept, plus a few near misses.

Run from anywhere: python3 fuzz/seeds/generate.py (standard library only; the MessagePack
encoder below covers what the seeds use)."""

import base64
import hashlib
import hmac
import json
import os
import shutil
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
ZONE = "0190f5a0-0000-7000-8000-000000000001"
ID = "0190f5a0-0000-7000-8000-0000000000aa"
SECRET = bytes([7] * 32)  # token_verify.rs: SECRET
MINTED_AT = 1_800_000_000  # token_verify.rs: MINTED_AT


def compact(value):
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def msgpack(v):
    if v is None:
        return b"\xc0"
    if v is True:
        return b"\xc3"
    if v is False:
        return b"\xc2"
    if isinstance(v, int):
        if 0 <= v < 128:
            return bytes([v])
        if -32 <= v < 0:
            return struct.pack("b", v)
        return b"\xd3" + struct.pack(">q", v)
    if isinstance(v, float):
        return b"\xcb" + struct.pack(">d", v)
    if isinstance(v, str):
        b = v.encode()
        if len(b) < 32:
            return bytes([0xA0 | len(b)]) + b
        return b"\xd9" + bytes([len(b)]) + b
    if isinstance(v, list):
        return bytes([0x90 | len(v)]) + b"".join(msgpack(x) for x in v)
    if isinstance(v, dict):
        return bytes([0x80 | len(v)]) + b"".join(msgpack(k) + msgpack(x) for k, x in v.items())
    raise TypeError(v)


def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def token(agent, perms, ttl):
    claims = {"agent_id": agent, "zone_id": ZONE, "perms": perms, "exp": MINTED_AT + ttl}
    body = b64(compact(claims).encode())
    sig = b64(hmac.new(SECRET, body.encode(), hashlib.sha256).digest())
    return f"{body}.{sig}"


PAYLOADS = {
    "agent_move": {"position": {"x": 1.5, "y": -2, "z": 0}, "sent_at": 1733222400000},
    "agent_interact": {"target_agent_id": "bob", "kind": "wave", "data": {"emote": "hi", "n": [1, 2]}},
    "consume_resource": {"resource_type": "wood", "amount": 3},
    "broadcast_event": {"event_type": "storm.started", "payload": {"intensity": 0.7}},
    "get_zone_state": {},
}

TOPIC = f"zone:{ZONE}"
FRAMES = [
    ["1", "1", TOPIC, "phx_join", {"agent_id": "alice", "token": token("alice", 1, 3600)}],
    ["1", "2", TOPIC, "phx_join", {"agent_id": "alice", "token": token("alice", 15, 60), "since": 41}],
    [None, "3", "phoenix", "heartbeat", {}],
    ["1", "4", TOPIC, "phx_leave", {}],
] + [["1", str(5 + i), TOPIC, event, payload] for i, (event, payload) in enumerate(PAYLOADS.items())]
NEAR_MISSES = [
    '["1","2","zone:x","phx_join"]',
    '[null,7,"t","e",{}]',
    '[1,"7","t","e",{}]',
    '[null,"7","t","e",null]',
    '{"topic":"t"}',
    '["1","2","t","e",{"a":[1,{"b":null}],"c":1e400}]',
]

BROKER = [
    {"id": ID, "zone_id": ZONE, "agent_id": "npc-7", "type": "agent_move",
     "payload": PAYLOADS["agent_move"]},
    {"id": ID, "zone_id": ZONE, "agent_id": "npc-7", "type": "agent_interact",
     "payload": PAYLOADS["agent_interact"]},
    {"id": ID, "zone_id": ZONE, "type": "consume_resource", "payload": PAYLOADS["consume_resource"]},
    {"id": ID, "zone_id": ZONE, "type": "broadcast_event", "payload": PAYLOADS["broadcast_event"]},
    {"id": ID, "zone_id": ZONE, "type": "tick"},
    {"id": ID, "zone_id": ZONE, "type": "tick", "payload": None},
    {"id": ID, "zone_id": ZONE, "type": "join"},
    {"zone_id": ZONE, "type": "agent_move", "payload": {}},
]


def write(target, name, data):
    os.makedirs(os.path.join(HERE, target), exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(HERE, target, name), "wb") as f:
        f.write(data)


def main():
    for entry in os.listdir(HERE):
        if os.path.isdir(os.path.join(HERE, entry)):
            shutil.rmtree(os.path.join(HERE, entry))
    frames = [compact(f) for f in FRAMES] + NEAR_MISSES
    for i, text in enumerate(frames):
        write("phoenix_frame", f"frame-{i}", text)
        write("socket_command", f"frame-{i}", b"\x00" + text.encode())
    for i, (event, payload) in enumerate(PAYLOADS.items()):
        write("socket_command", f"event-{event}", bytes([2 * i + 1]) + compact(payload).encode())
    write("socket_command", "event-other", b"\x0bphx_join\n{}")
    for i, command in enumerate(BROKER):
        # Selector 0: no content type / the first MessagePack type, no message id.
        write("broker_json", f"command-{i}", b"\x00" + compact(command).encode())
        write("broker_msgpack", f"command-{i}", b"\x00" + msgpack(command))
    # Selector 2: the message id stands in for the missing id.
    tick = {"zone_id": ZONE, "type": "tick"}
    write("broker_json", "message-id", b"\x02" + compact(tick).encode())
    write("broker_msgpack", "message-id", b"\x02" + msgpack(tick))
    write("broker_msgpack", "as-array", b"\x00" + msgpack([ID, ZONE, "npc-1", "tick", None]))
    for name in sorted(os.listdir(os.path.join(ROOT, "pipelines"))):
        if name.endswith(".toml"):
            with open(os.path.join(ROOT, "pipelines", name), "rb") as f:
                write("pipeline_file", name, f.read())
    write("pipeline_file", "small.toml",
          '[processors]\nmax_demand = 4\nmin_demand = 2\n[processors.retry]\nmax_attempts = "unlimited"\n'
          '[zones]\nbroadcast_rate_limit = { allowed = 5, interval_ms = 100 }\n')
    # token_verify: mode 0 (a token at MINTED_AT + 0), mode 1 (mint and mutate), mode 2 (a body).
    for i, (agent, perms, ttl) in enumerate([("alice", 1, 3600), ("npc-\u00e9", 15, 1), ("", 0, 315360000)]):
        write("token_verify", f"token-{i}", b"\x00\x00\x00" + token(agent, perms, ttl).encode())
    write("token_verify", "expired", b"\x00\x10\x0e" + token("alice", 1, 60).encode())
    write("token_verify", "mint", b"\x01\x01\x05alice" + bytes(range(16)) + b"\x01\x00\x10\x00\x03\x01\x02\x03")
    claims = {"agent_id": "a", "zone_id": ZONE, "perms": 8, "exp": MINTED_AT + 10}
    write("token_verify", "body", b"\x02\x00\x00" + compact(claims).encode())


if __name__ == "__main__":
    main()
