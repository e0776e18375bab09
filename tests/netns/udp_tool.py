#!/usr/bin/env python3
"""UDP multicast helper for the Chorus namespace lab (tests/netns).

Runs inside one lab namespace (``ip netns exec NS python3 udp_tool.py ...``) and never anywhere
else: it only talks to the lab's groups on the interface it is given.

  recv    join GROUP on IFACE, count datagrams until COUNT arrived or TIMEOUT passed
  send    send COUNT numbered datagrams to GROUP through IFACE (TTL 1)
  capture join GROUP on IFACE and write the first COUNT datagrams to FILE (one hex line each)
  attack  send hostile traffic to GROUP built from a capture file, print a JSON summary

Every loop is bounded in count and time.
"""
import argparse
import ipaddress
import json
import random
import socket
import struct
import sys
import time


def parse_target(text):
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    return ipaddress.ip_address(host), int(port)


def member_socket(group, port, iface):
    """A UDP socket bound to PORT that has joined GROUP on IFACE (if GROUP is multicast)."""
    index = socket.if_nametoindex(iface)
    if group.version == 4:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("0.0.0.0", port))
        if group.is_multicast:
            mreqn = group.packed + socket.inet_aton("0.0.0.0") + struct.pack("@i", index)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreqn)
    else:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("::", port))
        mreq = group.packed + struct.pack("@I", index)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq)
    return sock


def sender_socket(group, iface):
    """A UDP socket that sends to GROUP through IFACE with TTL / hop limit 1."""
    index = socket.if_nametoindex(iface)
    if group.version == 4:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        mreqn = socket.inet_aton("0.0.0.0") + socket.inet_aton("0.0.0.0") + struct.pack("@i", index)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, mreqn)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    else:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 1)
    return sock


def receive(sock, count, timeout, source=None):
    """Up to COUNT datagrams (from address SOURCE only, if given) received within TIMEOUT s."""
    deadline = time.monotonic() + timeout
    frames = []
    while len(frames) < count:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        sock.settimeout(left)
        try:
            data, sender = sock.recvfrom(65535)
        except socket.timeout:
            break
        if source is None or ipaddress.ip_address(sender[0]) == ipaddress.ip_address(source):
            frames.append(data)
    return frames


def cmd_recv(args):
    group, port = parse_target(args.group)
    frames = receive(member_socket(group, port, args.iface), args.count, args.timeout)
    print(json.dumps({"received": len(frames)}))
    return 0 if len(frames) >= args.count else 1


def cmd_send(args):
    group, port = parse_target(args.group)
    sock = sender_socket(group, args.iface)
    for i in range(args.count):
        sock.sendto(b"probe %d" % i, (str(group), port))
        time.sleep(args.interval)
    print(json.dumps({"sent": args.count}))
    return 0


def cmd_capture(args):
    group, port = parse_target(args.group)
    frames = receive(member_socket(group, port, args.iface), args.count, args.timeout, args.source)
    with open(args.out, "w") as out:
        for frame in frames:
            out.write(frame.hex() + "\n")
    print(json.dumps({"captured": len(frames)}))
    return 0 if frames else 1


def bit_flipped(rng, frame):
    data = bytearray(frame)
    for _ in range(rng.randint(1, 3)):
        bit = rng.randrange(len(data) * 8)
        data[bit // 8] ^= 1 << (bit % 8)
    return bytes(data)


def cmd_attack(args):
    group, port = parse_target(args.group)
    sock = sender_socket(group, args.iface)
    rng = random.Random(args.seed)
    with open(args.capture) as capture:
        frames = [bytes.fromhex(line.strip()) for line in capture if line.strip()]
    foreign = []
    if args.foreign:
        with open(args.foreign) as capture:
            foreign = [bytes.fromhex(line.strip()) for line in capture if line.strip()]
    if not frames:
        print("attack: the capture file holds no frames", file=sys.stderr)
        return 1
    sent = {"random": 0, "truncated": 0, "bit_flipped": 0, "replayed": 0, "foreign_cluster": 0}
    deadline = time.monotonic() + args.max_seconds
    for i in range(args.count):
        if time.monotonic() > deadline:
            break
        frame = rng.choice(frames)
        kind = ["random", "truncated", "bit_flipped", "replayed", "foreign_cluster"][i % 5]
        if kind == "random":
            data = rng.randbytes(rng.randint(0, 1400))
        elif kind == "truncated":
            data = frame[: rng.randrange(len(frame))]
        elif kind == "bit_flipped":
            data = bit_flipped(rng, frame)
        elif kind == "replayed":
            data = frame
        elif foreign:
            data = rng.choice(foreign)
        else:
            continue
        sock.sendto(data, (str(group), port))
        sent[kind] += 1
        if args.interval:
            time.sleep(args.interval)
    print(json.dumps(sent))
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    recv = sub.add_parser("recv")
    recv.add_argument("--group", required=True, help="ADDR:PORT, [v6]:PORT")
    recv.add_argument("--iface", default="eth0")
    recv.add_argument("--count", type=int, default=1)
    recv.add_argument("--timeout", type=float, default=5.0)
    send = sub.add_parser("send")
    send.add_argument("--group", required=True)
    send.add_argument("--iface", default="eth0")
    send.add_argument("--count", type=int, default=1)
    send.add_argument("--interval", type=float, default=0.01)
    capture = sub.add_parser("capture")
    capture.add_argument("--group", required=True)
    capture.add_argument("--iface", default="eth0")
    capture.add_argument("--count", type=int, default=50)
    capture.add_argument("--timeout", type=float, default=10.0)
    capture.add_argument("--out", required=True)
    capture.add_argument("--from", dest="source", help="keep only datagrams from this address")
    attack = sub.add_parser("attack")
    attack.add_argument("--group", required=True)
    attack.add_argument("--iface", default="eth0")
    attack.add_argument("--capture", required=True, help="frames of this cluster (capture output)")
    attack.add_argument("--foreign", help="frames of another cluster (capture output)")
    attack.add_argument("--count", type=int, default=1000)
    attack.add_argument("--seed", type=int, default=1)
    attack.add_argument("--interval", type=float, default=0.0005)
    attack.add_argument("--max-seconds", type=float, default=30.0)
    args = parser.parse_args()
    handler = {"recv": cmd_recv, "send": cmd_send, "capture": cmd_capture, "attack": cmd_attack}[args.cmd]
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
