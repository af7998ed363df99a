"""nginx as a stand-in tunnel in front of an appliance: it appends the client's address to
X-Forwarded-For and its scheme to X-Forwarded-Proto, as ngrok does, streams without buffering,
and cuts a response that is silent for `read_timeout` seconds (504), as tunnels and CDNs do."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

from tests.kit.helpers import free_port, wait_until

CONF = """
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://127.0.0.1:{upstream_port};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_buffering off;
            proxy_read_timeout {read_timeout}s;
        }}
    }}
}}
"""


class Nginx:
    def __init__(self, work: Path, upstream_port: int, read_timeout: float = 60) -> None:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        work.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        conf = work / "nginx.conf"
        conf.write_text(CONF.format(prefix=work, port=self.port, upstream_port=upstream_port,
                                    read_timeout=read_timeout))
        self.proc = subprocess.Popen([binary, "-p", str(work), "-c", str(conf), "-e",
                                      str(work / "error.log")], stderr=subprocess.DEVNULL)
        # A connect, not a request: the appliance behind may run on the caller's event loop.
        wait_until(self._listening, 10, "nginx to listen")

    def _listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            return False
        return True

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
