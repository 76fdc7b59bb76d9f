"""Small HTTP servers standing in for vLLM and the proxy in unit tests: a handler served on a port
of its own, and the chunked event stream a vLLM completion answers with."""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Iterator


class Streaming(http.server.BaseHTTPRequestHandler):
    """A handler that answers with a chunked event stream, as vLLM does."""

    protocol_version = "HTTP/1.1"

    def start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def end_stream(self) -> None:
        self.chunk(b"data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")

    def die(self) -> None:
        """The connection closed mid-stream, as by a process that is killed."""
        self.close_connection = True

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serving(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """`handler` served on 127.0.0.1, on a port of its own, until the block ends: its URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
