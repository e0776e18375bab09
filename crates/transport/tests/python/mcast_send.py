#!/usr/bin/env python3
"""Seed-tutorial style multicast sender, kept on this host: IP_MULTICAST_IF 127.0.0.1, TTL 0.

usage: mcast_send.py GROUP PORT COUNT PREFIX
Sends COUNT datagrams "<PREFIX>-<i>" to GROUP:PORT, 10 ms apart.
"""
import socket
import sys
import time

group, port, count, prefix = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]

sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 0)
sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
for i in range(count):
    sock.sendto(f"{prefix}-{i}".encode(), (group, port))
    time.sleep(0.01)
