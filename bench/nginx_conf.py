"""nginx `proxy_pass` as a reference target: writes a self-contained config into a work
directory and prints its path. nginx runs in the foreground as ONE process (no master, one
worker loop), so callgrind counts all of its work and SIGTERM stops it; the upstream side is
a keep-alive pool (HTTP/1.1, `keepalive 64`), bodies are streamed in both directions (no
request or response buffering), like the Python proxies it is compared with.

usage: python bench/nginx_conf.py WORKDIR LISTEN_PORT UPSTREAM_PORT   -> prints the conf path
run:   nginx -e stderr -p WORKDIR -c CONF      (Debian: apt-get install -y nginx-light)
"""

from __future__ import annotations

import sys
from pathlib import Path

TEMPLATE = """\
daemon off;
master_process off;
worker_processes 1;
pid {work}/nginx.pid;
error_log stderr error;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {work}/client_body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    upstream origin {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=1024;
        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_buffering off;
            proxy_request_buffering off;
        }}
    }}
}}
"""


def write(work: Path, port: int, upstream_port: int) -> Path:
    work.mkdir(parents=True, exist_ok=True)
    conf = work / "nginx.conf"
    conf.write_text(TEMPLATE.format(work=work, port=port, upstream_port=upstream_port))
    return conf


if __name__ == "__main__":
    print(write(Path(sys.argv[1]).resolve(), int(sys.argv[2]), int(sys.argv[3])))
