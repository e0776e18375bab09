#!/usr/bin/env python3
"""Seed-tutorial style broadcast sender: SO_BROADCAST, then sendto the broadcast address.

usage: bcast_send.py ADDR PORT COUNT PREFIX
ADDR is a broadcast address reached only on this host (127.255.255.255 on lo)
or inside a test's own network namespace.
"""
import socket
import sys
import time

addr, port, count, prefix = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]

sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
for i in range(count):
    sock.sendto(f"{prefix}-{i}".encode(), (addr, port))
    time.sleep(0.01)
