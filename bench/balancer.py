"""A local load balancer in front of several gateway instances: nginx (Debian's binary) with a
generated config in the work directory, round-robin per request over the instances, keep-alive
connections to them, no access log; one process (`master_process off`) so its CPU is one pid's."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from .env import HOST, Cores, free_port
from .servers import ServerProcess

NO_NGINX = "nginx not installed (Debian: apt-get install nginx-light or nginx)"

CONFIG = """
daemon off;
master_process off;
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {work}/body;
  proxy_temp_path {work}/proxy;
  fastcgi_temp_path {work}/fastcgi;
  uwsgi_temp_path {work}/uwsgi;
  scgi_temp_path {work}/scgi;
  upstream gateways {{
{servers}
    keepalive 128;
  }}
  server {{
    listen {host}:{port} backlog=4096;
    location / {{
      proxy_pass http://gateways;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_next_upstream off;
    }}
  }}
}}
"""


def nginx_path() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)


def nginx(cores: Cores, workdir: Path, backends: Sequence[ServerProcess], name: str) -> ServerProcess:
    """nginx on the load cores (it is part of the load side, like wrk), round-robin to `backends`;
    ready once a gateway's /readyz answers through it. `proxy_next_upstream off`: a request is
    never sent to a second instance, so a duplicate answer can only come from the gateway."""
    binary = nginx_path()
    assert binary is not None, NO_NGINX
    work = workdir / name
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    servers = "\n".join(f"    server {HOST}:{b.port};" for b in backends)
    conf = work / "nginx.conf"
    conf.write_text(CONFIG.format(work=work, servers=servers, host=HOST, port=port))
    argv = [binary, "-p", str(work), "-c", str(conf), "-e", str(work / "nginx-error.log")]
    on_load = Cores(cores.load, cores.load)
    return ServerProcess(name, argv, port, on_load, workdir)
