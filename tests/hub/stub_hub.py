"""A minimal Hugging Face Hub stand-in on 127.0.0.1: enough of the REST API for create_repo and
upload_folder (regular, non-LFS uploads), recording every file committed."""

from __future__ import annotations

import base64
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class StubHub:
    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.requests: list[str] = []
        self.cards_validated = 0
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _json(self, payload, status=200):
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def do_GET(self):
                hub.requests.append(f"GET {self.path}")
                if self.path.startswith("/api/whoami"):
                    return self._json({"type": "user", "name": "me", "orgs": [], "auth": {"accessToken": {"role": "write"}}})
                match = re.match(r"/api/models/([^/]+/[^/]+)(?:/revision/[^/?]+)?/?(?:\?.*)?$", self.path)
                if match and match.group(1) in hub.repos:
                    return self._json({"id": match.group(1), "sha": "0" * 40, "siblings": []})
                match = re.match(r"/api/models/([^/]+/[^/]+)/tree/", self.path)
                if match:
                    return self._json([])
                return self._json({"error": "not found"}, 404)

            def do_HEAD(self):
                hub.requests.append(f"HEAD {self.path}")
                self.send_response(404)
                self.end_headers()

            def do_POST(self):
                body = self._body()
                hub.requests.append(f"POST {self.path}")
                if self.path.startswith("/api/validate-yaml"):
                    hub.cards_validated += 1
                    return self._json({"errors": [], "warnings": []})
                if self.path == "/api/repos/create":
                    payload = json.loads(body)
                    repo = f"{payload.get('organization') or 'me'}/{payload['name']}"
                    hub.repos.setdefault(repo, {})
                    return self._json({"url": f"http://127.0.0.1/{repo}", "name": repo, "id": repo})
                match = re.match(r"/api/models/([^/]+/[^/]+)/preupload/", self.path)
                if match:
                    files = json.loads(body).get("files", [])
                    return self._json(
                        {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
                    )
                match = re.match(r"/api/models/([^/]+/[^/]+)/paths-info/", self.path)
                if match:
                    return self._json([])
                match = re.match(r"/api/models/([^/]+/[^/]+)/commit/", self.path)
                if match:
                    repo = hub.repos.setdefault(match.group(1), {})
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item.get("key") == "file":
                            repo[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    return self._json({"commitUrl": f"http://127.0.0.1/{match.group(1)}/commit/1", "commitOid": "1" * 40,
                                       "success": True, "commitMessage": "ok"})
                return self._json({"error": "not found"}, 404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "StubHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
