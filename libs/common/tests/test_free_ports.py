"""Free ports for test servers come from outside the kernel's ephemeral range, where no
outgoing connection can take one before its server binds it."""

from __future__ import annotations

import socket

from gridstream.common.embedded import _listen_ports, free_ports


def ephemeral() -> range:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
        lo, hi = (int(x) for x in fh.read().split())
    return range(lo, hi + 1)


def test_a_block_of_free_ports_is_outside_the_ephemeral_range_and_bindable():
    eph = ephemeral()
    for n in (1, 7):
        base = free_ports(n)
        for port in range(base, base + n):
            assert port not in eph
            assert port in _listen_ports()
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", port))


def test_a_taken_port_is_not_handed_out():
    taken = []
    try:
        for _ in range(50):
            s = socket.socket()
            base = free_ports(1)
            s.bind(("127.0.0.1", base))
            s.listen()
            taken.append(s)
        held = {s.getsockname()[1] for s in taken}
        for _ in range(200):
            assert free_ports(1) not in held
    finally:
        for s in taken:
            s.close()
