"""Default ports (defined in the client package, re-exported for the servers) and free ports for tests."""

from speechrl.client.ports import DEFAULT_PORTS

__all__ = ["DEFAULT_PORTS", "free_port", "port_answers", "port_holder"]


_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now, and that this process was never handed
    before (for tests and benchmarks).

    Never twice, because gRPC shares one subchannel per address among all of a process's channels: a
    channel still open to an earlier server on that port, now in reconnect backoff, makes every new
    channel to a new server there fail at once with "Connection refused". The kernel alone repeats a
    port within a few hundred calls, fewer than a test run makes.
    """
    import socket

    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def port_answers(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on host:port now."""
    import socket

    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((host, port)) == 0


def port_holder(port: int) -> str:
    """Who listens on TCP port, for an error message: "pid 123 (python -m speechrl ...)", or a vaguer
    phrase where the listener belongs to a process this user may not inspect."""
    import psutil

    try:
        listeners = [c for c in psutil.net_connections(kind="tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port]
    except psutil.AccessDenied:
        return "another process (not allowed to see which)"
    for connection in listeners:
        if connection.pid is None:
            continue
        try:
            command = " ".join(psutil.Process(connection.pid).cmdline())[:160]
        except psutil.Error:
            command = "?"
        return f"pid {connection.pid} ({command})"
    return "another process" if listeners else "nothing listening now (it may have just exited)"
