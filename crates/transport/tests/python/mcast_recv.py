#!/usr/bin/env python3
"""Seed-tutorial style multicast receiver: join GROUP on 127.0.0.1, print COUNT payloads.

usage: mcast_recv.py GROUP PORT COUNT TIMEOUT_SECONDS
Prints READY once joined, then one line per datagram: "<source-ip> <payload>".
Exits 0 after COUNT datagrams, 1 on timeout.
"""
import socket
import struct
import sys

group, port, count, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])

sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
sock.bind(("", port))
mreq = struct.pack("4s4s", socket.inet_aton(group), socket.inet_aton("127.0.0.1"))
sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
sock.settimeout(timeout)
print("READY", flush=True)

got = 0
try:
    while got < count:
        data, (host, _port) = sock.recvfrom(65535)
        print(host, data.decode("utf-8", "replace"), flush=True)
        got += 1
except socket.timeout:
    print(f"TIMEOUT after {got} of {count}", flush=True)
    sys.exit(1)
