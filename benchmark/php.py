"""The PHP baseline: the brief's stack, written minimal, on the same machine, clients and Redis.

A short PHP page (parse the request, push one Redis entry per data object in one pipeline,
answer 202 with the postbacks' ids) served by Debian's nginx, php-fpm and phpredis, which
deploy/benchmark.sh installs when `--php-baseline` is asked for and they are missing. Two
pools: `equal` holds PHP-FPM to as many children as the service has gunicorn workers; `defaults`
is Debian's www pool as shipped (pm = dynamic, 5 children at most). nginx runs as Debian
configures it (a worker per core, keep-alive with clients).
"""

import glob
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from benchmark.service import Child, Healthz, free_port, spawn, stop_all, wait_for

POOLS = ("equal", "defaults")
INBOX_KEY = "benchmark:php:inbox"

# Debian's /etc/php/*/fpm/pool.d/www.conf, as shipped.
DEBIAN_POOL = {
    "pm": "dynamic",
    "pm.max_children": "5",
    "pm.start_servers": "2",
    "pm.min_spare_servers": "1",
    "pm.max_spare_servers": "3",
}

PAGE = """<?php
// The brief's ingest page, minimal: parse, one Redis entry per data object, pipelined, 202.
$request = json_decode(file_get_contents('php://input'), true);
header('Content-Type: application/json');
if (!is_array($request) || !is_array($request['endpoint'] ?? null) || !is_array($request['data'] ?? null)
    || !is_string($request['endpoint']['url'] ?? null)) {
    http_response_code(400);
    echo '{"error": "invalid request"}';
    exit;
}
$redis = new Redis();
// A persistent connection, authenticated once when it is opened.
$password = getenv('REDIS_PASSWORD');
$redis->pconnect(getenv('REDIS_HOST'), (int) getenv('REDIS_PORT'), 2.0, 'ingest', 0, 0,
    $password ? ['auth' => $password] : []);
$id = bin2hex(random_bytes(16));
$method = $request['endpoint']['method'] ?? 'GET';
$url = $request['endpoint']['url'];
$ids = [];
$pipe = $redis->multi(Redis::PIPELINE);
foreach (array_values($request['data']) as $index => $data) {
    $pipe->rPush('__INBOX__', json_encode([$id, $index, $method, $url, $data]));
    $ids[] = "$id-$index";
}
$pipe->exec();
http_response_code(202);
echo json_encode(['accepted' => count($ids), 'postbacks' => $ids]);
""".replace("__INBOX__", INBOX_KEY)


@dataclass(frozen=True)
class Redis:
    host: str
    port: int
    password: str

    @classmethod
    def from_url(cls, url: str) -> "Redis":
        parts = urlsplit(url)
        return cls(parts.hostname or "127.0.0.1", parts.port or 6379, parts.password or "")


def pools_named(asked: str | None) -> tuple[str, ...]:
    """The pools `--php-baseline` names (none unless asked)."""
    if asked is None:
        return ()
    return POOLS if asked == "both" else (asked,)


def pool_settings(pool: str, children: int) -> dict[str, str]:
    """PHP-FPM's process settings: `children` static children, or Debian's pool."""
    if pool == "defaults":
        return dict(DEBIAN_POOL)
    return {"pm": "static", "pm.max_children": str(children)}


def children_of(pool: str, web_workers: int) -> int:
    """PHP processes at most: as many as gunicorn's (equal), or Debian's pool's."""
    return int(pool_settings(pool, web_workers)["pm.max_children"])


def fpm_config(scratch: Path, pool: str, children: int, redis: Redis) -> str:
    lines = [
        "[global]",
        f"pid = {scratch / 'php-fpm.pid'}",
        f"error_log = {scratch / 'php-fpm.log'}",
        "daemonize = no",
        "[ingest]",
        f"listen = {scratch / 'php-fpm.sock'}",
        "listen.mode = 0666",
        "clear_env = yes",
        f"env[REDIS_HOST] = {redis.host}",
        f"env[REDIS_PORT] = {redis.port}",
        *([f"env[REDIS_PASSWORD] = {redis.password}"] if redis.password else []),  # FPM refuses an empty value
        *(f"{name} = {value}" for name, value in pool_settings(pool, children).items()),
    ]
    return "\n".join(lines) + "\n"


def nginx_config(scratch: Path, port: int, as_root: bool) -> str:
    """Debian's nginx.conf where it matters (a worker per core, keep-alive, sendfile), serving
    the page through PHP-FPM's socket."""
    return f"""{"user root;" if as_root else ""}
worker_processes auto;
pid {scratch / "nginx.pid"};
error_log {scratch / "nginx-error.log"} warn;
events {{ worker_connections 768; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 65;
    client_body_temp_path {scratch / "body"};
    fastcgi_temp_path {scratch / "fastcgi"};
    proxy_temp_path {scratch / "proxy"};
    uwsgi_temp_path {scratch / "uwsgi"};
    scgi_temp_path {scratch / "scgi"};
    server {{
        listen 127.0.0.1:{port};
        root {scratch / "www"};
        location = /healthz {{ return 200 "ok"; }}
        location ~ ^/(ingest\\.php|i)$ {{
            include /etc/nginx/fastcgi_params;
            fastcgi_param SCRIPT_FILENAME {scratch / "www" / "ingest.php"};
            fastcgi_pass unix:{scratch / "php-fpm.sock"};
        }}
    }}
}}
"""


def write_site(scratch: Path, pool: str, children: int, redis: Redis, port: int) -> None:
    """The page and both configurations, in `scratch`."""
    (scratch / "www").mkdir(parents=True, exist_ok=True)
    (scratch / "www" / "ingest.php").write_text(PAGE)
    (scratch / "php-fpm.conf").write_text(fpm_config(scratch, pool, children, redis))
    (scratch / "nginx.conf").write_text(nginx_config(scratch, port, os.geteuid() == 0))


def php_fpm_binary() -> str:
    found = sorted(glob.glob("/usr/sbin/php-fpm*"))
    if not found or shutil.which("nginx") is None:
        raise RuntimeError("nginx and php-fpm are not installed: run through deploy/benchmark.sh --php-baseline")
    return found[-1]


@contextmanager
def php_site(scratch: Path, pool: str, children: int, redis_url: str) -> Iterator[str]:
    """nginx and PHP-FPM serving the page; yields the site's base URL."""
    port = free_port()
    write_site(scratch, pool, children, Redis.from_url(redis_url), port)
    fpm = [php_fpm_binary(), "--nodaemonize", "--fpm-config", str(scratch / "php-fpm.conf")]
    if os.geteuid() == 0:
        fpm.append("--allow-to-run-as-root")
    nginx = ["nginx", "-p", str(scratch), "-c", str(scratch / "nginx.conf"), "-g", "daemon off;"]
    children_started: list[Child] = []
    try:
        children_started.append(spawn("php-fpm", fpm, dict(os.environ), scratch))
        socket = scratch / "php-fpm.sock"
        wait_for("php-fpm", socket.exists, 20, children_started)
        children_started.append(spawn("nginx", nginx, dict(os.environ), scratch))
        url = f"http://127.0.0.1:{port}"
        wait_for("nginx", Healthz(url), 20, children_started)
        yield url
    finally:
        stop_all(children_started)
