#!/usr/bin/env python3
"""The SafeKit demo application: a tiny record store over HTTP.

Usage: demo_app.py DATA_DIR PORT

- POST /records with a one-line body appends it to DATA_DIR/records.txt and
  answers "ok <hostname>" only once the line is on disk (fsync): a record the
  client saw acknowledged is durable on this node.
- GET /records returns every record, one per line.
- GET /whoami returns the hostname of the node serving the request.

Requests are served one at a time, so appends never interleave.
"""
import http.server
import os
import socket
import sys

DATA_DIR = sys.argv[1]
PORT = int(sys.argv[2])
RECORDS = os.path.join(DATA_DIR, "records.txt")
HOST = socket.gethostname()


class Handler(http.server.BaseHTTPRequestHandler):
    def reply(self, code, body):
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/whoami":
            self.reply(200, HOST + "\n")
        elif self.path == "/records":
            try:
                with open(RECORDS) as records:
                    self.reply(200, records.read())
            except FileNotFoundError:
                self.reply(200, "")
        else:
            self.reply(404, "not found\n")

    def do_POST(self):
        if self.path != "/records":
            self.reply(404, "not found\n")
            return
        length = int(self.headers.get("Content-Length", "0"))
        record = self.rfile.read(length).decode().strip()
        if not record or "\n" in record:
            self.reply(400, "one non-empty line per record\n")
            return
        with open(RECORDS, "a") as records:
            records.write(record + "\n")
            records.flush()
            os.fsync(records.fileno())
        self.reply(200, "ok " + HOST + "\n")

    def log_message(self, *args):
        pass


class Server(http.server.HTTPServer):
    allow_reuse_address = True


if __name__ == "__main__":
    os.makedirs(DATA_DIR, exist_ok=True)
    print("demo application on %s: port %d, records in %s" % (HOST, PORT, RECORDS), flush=True)
    Server(("0.0.0.0", PORT), Handler).serve_forever()
