"""Serves GET / on 127.0.0.1:argv[1]: 200 while the file argv[2] does not exist, 503 once it
does."""

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


HTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
