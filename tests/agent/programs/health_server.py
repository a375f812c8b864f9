"""Serves GET / on 127.0.0.1:argv[1]: 200 while the file argv[2] does not exist, 503 once it
does; logs each request on stdout. Binds with SO_REUSEPORT: the test holds the port (bound, not
listening) so that it is never free between the test picking it and this program binding it."""

import socket
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

PORT = int(sys.argv[1])
SICK_FLAG = Path(sys.argv[2])


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status = 503 if SICK_FLAG.exists() else 200
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        print(format % args, flush=True)


class SharedPortServer(HTTPServer):
    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


SharedPortServer(("127.0.0.1", PORT), Handler).serve_forever()
