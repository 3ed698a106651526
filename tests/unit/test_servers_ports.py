"""Ports for the servers a cluster starts: free, and outside the range that outgoing
connections take theirs from."""

import socket

from shared.servers import _ephemeral_range, free_port


def test_free_ports_are_free_and_below_the_ephemeral_range():
    low, high = _ephemeral_range()
    assert 1024 <= low <= high
    ports = {free_port() for _ in range(20)}
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", port))  # free: this does not raise
        if low >= 11_000:
            assert 10_000 <= port < low
    assert len(ports) > 1  # chosen at random, not one fixed port
