#!/usr/bin/env bash
# The step image, built on this machine from nothing (containers/README.md, "Build and run"):
#
#   containers/build.sh          # engine (installed and started if absent), base image, wheels, image
#   containers/build.sh engine   # only make sure a Docker engine answers (docker.io + docker-compose)
#   containers/build.sh check    # exit 0 if an engine answers, 3 if not: installs and starts nothing
#   containers/build.sh image    # the image, on an engine that already answers (what the tests build)
#   containers/build.sh stop     # stop the engine this script started (by PID), if it did
#
# Exit codes: 0 built, 1 a step failed (its error on stderr), 3 no Docker engine can run here.
# What it starts and measures lives in .containers/ (git-ignored): dockerd.pid, dockerd.log, build.json.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
STATE="$ROOT/.containers"
IMAGE="${GRAPPA_IMAGE:-grappa-pipeline:cpu}"
BASE_IMAGE="${GRAPPA_BASE_IMAGE:-python:3.11.7-slim-bookworm}"
LOCAL_BASE="grappa-base:bookworm-py3.11"  # made here when $BASE_IMAGE cannot be pulled
WHEELHOUSE="$ROOT/.cache/wheelhouse"
SOCKET="unix:///var/run/docker.sock"
HOST_CA="/etc/ssl/certs/ca-certificates.crt"
# Debian's client speaks BuildKit (RUN --mount, --secret); another `docker` on PATH may not.
DOCKER="$(command -v /usr/bin/docker || command -v docker || true)"
PYTHON="$(command -v python3)"

say() { echo "build.sh: $*" >&2; }
die() { say "$1"; exit "${2:-1}"; }
mkdir -p "$STATE"

engine_answers() { [ -n "$DOCKER" ] && "$DOCKER" -H "$SOCKET" info >/dev/null 2>&1; }

ensure_engine() {
    engine_answers && return 0
    if ! command -v dockerd >/dev/null; then
        [ "$(id -u)" = 0 ] || die "no Docker engine, and installing docker.io needs root" 3
        say "installing docker.io and docker-compose from the Debian mirror"
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io docker-compose; } \
            >"$STATE/apt.log" 2>&1 || die "apt-get install docker.io failed (see $STATE/apt.log)" 3
        DOCKER=/usr/bin/docker
    fi
    [ "$(id -u)" = 0 ] || die "dockerd is installed but not running, and starting it needs root" 3
    # No bridge and no iptables rules: containers get --network none or host (services on 127.0.0.1).
    say "starting dockerd (log: $STATE/dockerd.log)"
    setsid dockerd --host="$SOCKET" --bridge=none --iptables=false --ip-masq=false \
        --pidfile="$STATE/dockerd.daemon.pid" >"$STATE/dockerd.log" 2>&1 < /dev/null &
    echo $! >"$STATE/dockerd.pid"
    for _ in $(seq 60); do
        engine_answers && return 0
        kill -0 "$(cat "$STATE/dockerd.pid")" 2>/dev/null || break
        sleep 0.5
    done
    rm -f "$STATE/dockerd.pid"
    die "dockerd did not start: $(tail -n 1 "$STATE/dockerd.log")" 3
}

require_engine() {
    engine_answers || die "no Docker engine answers at $SOCKET ('containers/build.sh engine' installs and starts one)" 3
}

stop_engine() {
    [ -f "$STATE/dockerd.pid" ] || { say "no engine started by this script"; return 0; }
    local pid
    pid="$(cat "$STATE/dockerd.pid")"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    rm -f "$STATE/dockerd.pid"
    say "stopped dockerd (pid $pid)"
}

# The base image: the public one if present or pullable, else Debian 12 + Python 3.11 from the mirror.
ensure_base() {
    if "$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1 \
        || timeout 60 "$DOCKER" pull -q "$BASE_IMAGE" >/dev/null 2>&1; then
        echo "$BASE_IMAGE"; return 0
    fi
    if ! "$DOCKER" image inspect "$LOCAL_BASE" >/dev/null 2>&1; then
        say "$BASE_IMAGE cannot be pulled: making $LOCAL_BASE with debootstrap"
        command -v debootstrap >/dev/null || {
            [ "$(id -u)" = 0 ] || die "debootstrap is missing and installing it needs root"
            { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap; } \
                >>"$STATE/apt.log" 2>&1 || die "apt-get install debootstrap failed (see $STATE/apt.log)"
        }
        local mirror rootfs
        mirror="$(grep -rhoE 'https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d 2>/dev/null \
            | head -n 1 | tr -d ' ')"
        mirror="${mirror:-http://deb.debian.org/debian}"
        rootfs="$(mktemp -d)"
        debootstrap --variant=minbase --include=python3,python3-venv,libgomp1 bookworm "$rootfs" "$mirror" \
            >"$STATE/debootstrap.log" 2>&1 || { rm -rf "$rootfs"; die "debootstrap failed (see $STATE/debootstrap.log)"; }
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
        tar -C "$rootfs" -c . | "$DOCKER" import --change 'CMD ["/bin/bash"]' - "$LOCAL_BASE" >/dev/null
        rm -rf "$rootfs"
    fi
    echo "$LOCAL_BASE"
}

# The lock's wheels, which `make setup` downloaded for the venv (`make wheels`, a no-op when they
# match the lock), served on loopback to the build: the image installs the venv's very files.
fill_wheelhouse() {
    make -C "$ROOT" -s wheels >&2
}

# A fixed port keeps the wheelhouse URL, a build argument, the same from build to build, so Docker
# reuses the installed layer until the lock changes; a random one only when that port is taken.
wheelhouse_port() {
    "$PYTHON" - "${GRAPPA_WHEELHOUSE_PORT:-38765}" <<'PY'
import socket, sys
s = socket.socket()
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
PY
}

git_fact() { git -C "$ROOT" "$@" 2>/dev/null || true; }

build_image() {
    local base port server started status=0
    base="$(ensure_base)"
    fill_wheelhouse
    port="$(wheelhouse_port)"
    "$PYTHON" -m http.server "$port" --bind 127.0.0.1 --directory "$WHEELHOUSE" >"$STATE/wheelhouse.log" 2>&1 &
    server=$!
    trap 'kill "$server" 2>/dev/null || true' EXIT
    say "building $IMAGE on $base"
    local previous commit dirty=""
    commit="$(git_fact rev-parse HEAD)"
    if [ -n "$commit" ]; then  # the same facts lineage.git_tags reads from a checkout
        dirty="$(git_fact status --porcelain --untracked-files=no -- grappa | grep -q . && echo true || echo false)"
    fi
    previous="$("$DOCKER" image inspect -f '{{.Id}}' "$IMAGE" 2>/dev/null || true)"
    local secret=()  # the host's CA bundle, for a build that goes to PyPI itself (no WHEELHOUSE)
    [ -f "$HOST_CA" ] && secret=(--secret "id=hostca,src=$HOST_CA")
    started="$(date +%s)"
    DOCKER_BUILDKIT=1 "$DOCKER" build --network host --progress plain \
        -f "$ROOT/containers/Dockerfile.cpu" -t "$IMAGE" \
        --build-arg BASE_IMAGE="$base" --build-arg WHEELHOUSE="http://127.0.0.1:$port/" \
        --build-arg GIT_COMMIT="$commit" --build-arg GIT_BRANCH="$(git_fact branch --show-current)" \
        --build-arg GIT_DIRTY="$dirty" \
        "${secret[@]}" \
        "$ROOT" >"$STATE/build.log" 2>&1 || status=$?
    kill "$server" 2>/dev/null || true
    trap - EXIT
    [ "$status" = 0 ] || die "docker build failed: $(grep -m 1 -E 'ERROR|error:' "$STATE/build.log" || tail -n 1 "$STATE/build.log") (see $STATE/build.log)"
    local seconds size
    seconds=$(( $(date +%s) - started ))
    # The image this one replaces and the build steps nothing refers to any more: 7 GB each.
    if [ -n "$previous" ] && [ "$previous" != "$("$DOCKER" image inspect -f '{{.Id}}' "$IMAGE")" ]; then
        "$DOCKER" image rm "$previous" >/dev/null 2>&1 || true
    fi
    "$DOCKER" builder prune -f >/dev/null 2>&1 || true
    size="$("$DOCKER" image inspect -f '{{.Size}}' "$IMAGE")"
    printf '{"image": "%s", "base": "%s", "build_s": %d, "size_bytes": %d}\n' "$IMAGE" "$base" "$seconds" "$size" \
        | tee "$STATE/build.json"
}

case "${1:-build}" in
    build) ensure_engine; build_image ;;
    engine) ensure_engine ;;
    check) require_engine ;;
    image) require_engine; build_image ;;
    stop) stop_engine ;;
    *) die "usage: containers/build.sh [build|engine|check|image|stop]" 2 ;;
esac
