"""A minimal Redis connection over a raw socket, for timing without redis-py or threads in the way.

The latency measurements (run.py, sections b and c) need to know when a PUBLISH reaches a subscriber to
within a few microseconds of Python overhead, while sending LPUSHes on a schedule from the same thread. So
both sockets are plain non-blocking sockets driven by one select() loop, and replies are parsed here.
"""
import select
import socket


def encode(*args):
    """One command in RESP (bytes). Arguments are bytes or str (UTF-8)."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if isinstance(a, str):
            a = a.encode()
        elif isinstance(a, int):
            a = b"%d" % a
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


class RespParser:
    """Incremental RESP2 parser: feed() bytes, then take complete replies from replies()."""

    def __init__(self):
        self.buf = bytearray()
        self.pos = 0

    def feed(self, data):
        self.buf += data

    def _line(self):
        end = self.buf.find(b"\r\n", self.pos)
        if end < 0:
            raise IndexError
        line = bytes(self.buf[self.pos:end])
        self.pos = end + 2
        return line

    def _one(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest
        if kind == b"-":
            return RedisError(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            if len(self.buf) < self.pos + n + 2:
                raise IndexError
            v = bytes(self.buf[self.pos:self.pos + n])
            self.pos += n + 2
            return v
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._one() for _ in range(n)]
        raise ValueError(f"bad RESP line {line[:40]!r}")

    def replies(self):
        """Yields every complete reply buffered so far."""
        while True:
            start = self.pos
            try:
                r = self._one()
            except IndexError:
                self.pos = start
                break
            yield r
        if self.pos:
            del self.buf[:self.pos]
            self.pos = 0


class RedisError(Exception):
    pass


class Conn:
    """A connection with a parser: blocking call() for setup, fileno()/read() for a select loop."""

    def __init__(self, host, port, db=0):
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.parser = RespParser()
        if db:
            self.call("SELECT", db)

    def fileno(self):
        return self.sock.fileno()

    def send(self, data):
        self.sock.sendall(data)

    def read(self):
        """Reads what is available (after select said so) and returns the complete replies."""
        data = self.sock.recv(1 << 20)
        if not data:
            raise ConnectionError("redis closed the connection")
        self.parser.feed(data)
        return list(self.parser.replies())

    def call(self, *args, timeout=10.0):
        self.send(encode(*args))
        while True:
            for r in self.parser.replies():
                if isinstance(r, RedisError):
                    raise r
                return r
            ready, _, _ = select.select([self.sock], [], [], timeout)
            if not ready:
                raise TimeoutError(f"no reply to {args[0]}")
            data = self.sock.recv(1 << 20)
            if not data:
                raise ConnectionError("redis closed the connection")
            self.parser.feed(data)

    def close(self):
        self.sock.close()
