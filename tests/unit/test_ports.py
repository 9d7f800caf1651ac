"""free_port, the port every test server and benchmark listens on, never hands a process the same port
twice: gRPC shares a subchannel per address among a process's channels, so a channel left open to an
earlier server there would make a new server's first calls fail with "Connection refused"."""

from __future__ import annotations

import socket

from speechrl.services.ports import free_port


def test_a_process_is_never_handed_the_same_port_twice() -> None:
    ports = [free_port() for _ in range(3000)]  # the kernel alone repeated 276 of 3000
    assert len(set(ports)) == len(ports)


def test_the_port_is_free_to_listen_on() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", free_port()))
        server.listen()
