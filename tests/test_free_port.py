"""The test suite's port picker: live servers must not lose their port to an outgoing
connection between the pick and the bind (the kernel gives those ports from its ephemeral
range, and so does `bind(("127.0.0.1", 0))`)."""

from __future__ import annotations

import socket

from tests.pgserver import ephemeral_range, free_port


def test_ports_are_free_below_the_ephemeral_range_and_never_repeated() -> None:
    low, _ = ephemeral_range()
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)
    for port in ports:
        assert 1024 <= port < low
        with socket.socket() as sock:  # still free: a server can bind it
            sock.bind(("127.0.0.1", port))


def test_an_outgoing_connection_never_takes_a_picked_port() -> None:
    low, _ = ephemeral_range()
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        address = server.getsockname()
        clients = []
        try:
            for _ in range(50):
                client = socket.create_connection(address)
                clients.append(client)
                assert client.getsockname()[1] >= low  # outgoing ports are ephemeral ones
            assert free_port() < low
        finally:
            for client in clients:
                client.close()
