# botgate container image (docs/containers.md).
#
#   docker build -t botgate .
#   docker build --build-arg PIP_INDEX_URL=https://<your mirror>/simple -t botgate .   # a PyPI mirror
#
# Debian 12 (bookworm) slim with CPython 3.11, the version CI tests. Pin the base by digest in your
# own builds (`python:3.11-slim-bookworm@sha256:...`) for reproducible images.
FROM python:3.11-slim-bookworm

# A PyPI mirror's simple index, e.g. one inside China where the default index is slow. Empty = pip's
# default. Only the build sees it: it is not kept in the image's environment.
ARG PIP_INDEX_URL=""
# The mirror's host, only when it serves plain HTTP or a private CA (pip's --trusted-host).
ARG PIP_TRUSTED_HOST=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/venv/bin:$PATH

# Unprivileged user with a fixed numeric id, so Kubernetes' runAsNonRoot can check it and a host
# directory mounted as the state volume can be chowned to it (10001:10001).
RUN groupadd --system --gid 10001 botgate \
    && useradd --system --uid 10001 --gid botgate --home-dir /var/lib/botgate --no-create-home \
        --shell /usr/sbin/nologin botgate \
    && install -d -m 0700 -o botgate -g botgate /var/lib/botgate \
    && install -d -m 0755 /etc/botgate

WORKDIR /opt/botgate

# Dependencies first (their layer is reused while only the code changes): the pinned versions of
# requirements.txt, constrained by constraints.txt (the versions CI tested, transitive ones included).
COPY requirements.txt constraints.txt ./
RUN if [ -z "$PIP_INDEX_URL" ]; then unset PIP_INDEX_URL; fi \
    && if [ -z "$PIP_TRUSTED_HOST" ]; then unset PIP_TRUSTED_HOST; fi \
    && python -m venv /opt/venv \
    && pip install --no-cache-dir -r requirements.txt

COPY run.py ./
COPY gateway ./gateway
COPY handlers ./handlers
COPY templates ./templates
# The shipped config with its defaults; mount your own over it (read-only), or set BOTGATE_* variables.
COPY config.toml /etc/botgate/config.toml
# Byte-compile at build time: the root filesystem may be read-only at run time (Kubernetes manifests).
RUN python -m compileall -q /opt/botgate

# Inside a container the gateway listens on every interface (the container's own network namespace);
# publish the port on 127.0.0.1 or put a proxy in front (docs/containers.md). An environment variable
# wins over config.toml, so a mounted config with host = "127.0.0.1" still works here.
ENV BOTGATE_SERVER__HOST=0.0.0.0 \
    BOTGATE_SERVER__PORT=18789 \
    STATE_DIRECTORY=/var/lib/botgate

# The SQLite state file (sqlite:///botgate.sqlite3) and the admin login token live here: keep it on a
# volume so they survive a new container. With a Redis store only the login token is kept here.
VOLUME ["/var/lib/botgate"]
EXPOSE 18789

USER 10001:10001

# Ready = the store answers and every enabled channel is connected (503 while a channel connects or
# reconnects). Docker only marks the container unhealthy (compose's depends_on waits on it); an
# orchestrator that restarts on liveness should use /healthz instead (the Kubernetes manifests do).
# The slim image has no curl: the check is the image's own Python, straight to 127.0.0.1 (no proxy).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import http.client as h, os, sys; c = h.HTTPConnection('127.0.0.1', int(os.environ.get('BOTGATE_SERVER__PORT', '18789')), timeout=4); c.request('GET', '/readyz'); sys.exit(c.getresponse().status != 200)"]

# SIGTERM drains in-flight conversations ([dispatcher] drain_timeout, 20 s): give `docker stop` a
# longer --time (compose: stop_grace_period) than that.
STOPSIGNAL SIGTERM
CMD ["python", "run.py", "--config", "/etc/botgate/config.toml"]
