#!/usr/bin/env bash
# The sidecar container, built and run for real. No image can be pulled here, so the image is
# the Dockerfile's runtime stage on `FROM scratch` (Dockerfile.scratch) around a static
# binary built on the host. This script installs Docker from Debian's packages when missing,
# starts its own dockerd in a temporary directory and removes everything it made on exit.
# It checks that the container runs sidecast as PID 1 and as uid 10001, that its HEALTHCHECK
# turns healthy, that a client connects through it and receives a publication from the
# backend's gRPC call, and that `docker stop` drains the client with 1001 and exits 0.
# Then the pod: a pause container holding a network namespace, sidecast and the Next.js
# example (its standalone build, made beforehand by `npm run build` or its test) as two
# containers joining it, the app reaching the control API on localhost; the example's browser
# test runs inside that namespace (as `kubectl port-forward` would reach the pod) and
# restarts the sidecast container. Where Docker cannot run, it says so and skips (exit 0
# with SKIPPED on stderr).
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
say() { echo "tests/container: $*" >&2; }
skip() {
    say "SKIPPED: $*"
    exit 0
}
fail() {
    say "FAILED: $*"
    exit 1
}
# Every wait has a deadline: a broken container fails the test, never hangs it.
within() {
    local seconds=$1 what=$2
    shift 2
    local deadline=$((SECONDS + seconds))
    until "$@"; do
        ((SECONDS < deadline)) || fail "timed out after ${seconds}s waiting for $what"
        sleep 0.2
    done
}

[ "$(id -u)" = 0 ] || skip "dockerd needs root"
if ! command -v dockerd >/dev/null 2>&1; then
    say "installing docker.io"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io >/dev/null ||
        skip "docker.io could not be installed"
fi

work=$(mktemp -d /tmp/sidecast-container-XXXXXX)
export DOCKER_HOST="unix://$work/docker.sock"
dockerd_pid=""
cleanup() {
    set +e
    if [ -n "$dockerd_pid" ]; then
        docker rm -f sidecast-test pod-app pod-sidecast pod-pause >/dev/null 2>&1
        docker rmi -f sidecast-test:scratch sidecast-test:nextjs sidecast-test:pause >/dev/null 2>&1
        kill "$dockerd_pid" 2>/dev/null
        for _ in $(seq 1 100); do kill -0 "$dockerd_pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$dockerd_pid" 2>/dev/null
    fi
    # Whatever dockerd left mounted under its directories (overlay layers, netns files).
    grep -o " $work[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

# Its own engine: no bridge and no iptables (nothing of the host's network is touched).
dockerd --iptables=false --ip-forward=false --bridge=none \
    --data-root "$work/data" --exec-root "$work/exec" --pidfile "$work/dockerd.pid" \
    -H "$DOCKER_HOST" >"$work/dockerd.log" 2>&1 &
dockerd_pid=$!
deadline=$((SECONDS + 60))
until docker version >/dev/null 2>&1; do
    if ! kill -0 "$dockerd_pid" 2>/dev/null || ((SECONDS >= deadline)); then
        tail -20 "$work/dockerd.log" >&2
        skip "dockerd did not start (its log is above)"
    fi
    sleep 0.2
done
say "dockerd $(docker version -f '{{.Server.Version}}') is up"

# The static binary: the same sources as the Dockerfile's build stage.
RUSTFLAGS='-C target-feature=+crt-static' cargo build --release --locked --bin sidecast \
    --target x86_64-unknown-linux-gnu
mkdir -p "$work/context/tmp"
cp target/x86_64-unknown-linux-gnu/release/sidecast "$work/context/"
cp tests/container/Dockerfile.scratch "$work/context/Dockerfile"
DOCKER_BUILDKIT=0 docker build -q -t sidecast-test:scratch "$work/context" >/dev/null 2>"$work/build.log" ||
    { cat "$work/build.log" >&2; fail "docker build"; }

# Free loopback ports for the host network (dockerd runs without a bridge).
read -r ws grpc admin < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])')
docker run -d --name sidecast-test --network host \
    --health-interval 1s --health-start-period 0s \
    -e SIDECAST_WS_ADDR="127.0.0.1:$ws" -e SIDECAST_GRPC_ADDR="127.0.0.1:$grpc" \
    -e SIDECAST_ADMIN_ADDR="127.0.0.1:$admin" -e SIDECAST_TOKEN_HMAC_SECRET=sdk-test-secret \
    -e SIDECAST_DRAIN_WINDOW=200ms \
    sidecast-test:scratch >/dev/null

pid=$(docker inspect -f '{{.State.Pid}}' sidecast-test)
[ "$pid" -gt 0 ] || fail "the container is not running: $(docker logs sidecast-test 2>&1 | tail -5)"
# NSpid: the host's pid, then the pid inside the container's namespace.
nspid=$(awk '/^NSpid:/ {print $NF}' "/proc/$pid/status")
[ "$nspid" = 1 ] || fail "sidecast is pid $nspid in its container, not 1"
uid=$(awk '/^Uid:/ {print $2}' "/proc/$pid/status")
[ "$uid" = 10001 ] || fail "sidecast runs as uid $uid, not 10001"
[ "$(readlink "/proc/$pid/exe")" = /usr/local/bin/sidecast ] || fail "PID 1 is $(readlink "/proc/$pid/exe")"
say "sidecast is PID 1 of its container, as uid 10001"

healthy() { [ "$(docker inspect -f '{{.State.Health.Status}}' sidecast-test)" = healthy ]; }
within 30 "the HEALTHCHECK to turn healthy" healthy
say "HEALTHCHECK (sidecast health, exec form) is healthy"

# A client through the container's WebSocket port, a publication through its gRPC port, and
# `docker stop`: the client sees 1001 before the container exits.
node tests/container/client.mjs "ws://127.0.0.1:$ws/ws" "127.0.0.1:$grpc" sidecast-test
exited() { [ "$(docker inspect -f '{{.State.Status}}' sidecast-test)" = exited ]; }
within 20 "the container to exit" exited
code=$(docker inspect -f '{{.State.ExitCode}}' sidecast-test)
[ "$code" = 0 ] || fail "the container exited with $code: $(docker logs sidecast-test 2>&1 | tail -5)"
say "docker stop: the client was closed with 1001 and the container exited 0"

# The pod.
standalone=examples/nextjs/.next/standalone
[ -f "$standalone/examples/nextjs/server.js" ] && [ -d "$standalone/examples/nextjs/.next/static" ] ||
    fail "no standalone build of the Next.js example: run 'npm run build' in examples/nextjs first"
mkdir -p "$work/pause" "$work/nextjs/node" "$work/nextjs/tmp"
gcc -static -O2 -o "$work/pause/pause" tests/container/pause.c
cp tests/container/Dockerfile.pause "$work/pause/Dockerfile"
node_bin=$(readlink -f "$(command -v node)")
install -D "$node_bin" "$work/nextjs/node/usr/bin/node"
for lib in $(ldd "$node_bin" | grep -o '/[^ ]*'); do
    install -D "$lib" "$work/nextjs/node$lib"
done
cp -a "$standalone" "$work/nextjs/app"
cp tests/container/Dockerfile.nextjs "$work/nextjs/Dockerfile"
for image in pause nextjs; do
    DOCKER_BUILDKIT=0 docker build -q -t "sidecast-test:$image" "$work/$image" >/dev/null 2>"$work/build.log" ||
        { cat "$work/build.log" >&2; fail "docker build ($image)"; }
done

secret=pod-test-token-secret
docker run -d --name pod-pause --network none sidecast-test:pause >/dev/null
# sidecast as the image sets it up (WebSocket on 0.0.0.0:8080, control API on 127.0.0.1:50051
# inside the pod), the example's namespaces mounted as its configuration file.
docker run -d --name pod-sidecast --network container:pod-pause \
    -v "$root/examples/nextjs/sidecast.toml:/etc/sidecast/sidecast.toml:ro" \
    -e SIDECAST_TOKEN_HMAC_SECRET=$secret -e SIDECAST_DRAIN_WINDOW=500ms \
    sidecast-test:scratch --config /etc/sidecast/sidecast.toml >/dev/null
docker run -d --name pod-app --network container:pod-pause \
    -e SIDECAST_GRPC=127.0.0.1:50051 -e SIDECAST_WS_URL=ws://127.0.0.1:8080/ws \
    -e SIDECAST_TOKEN_SECRET=$secret -e SESSION_SECRET=pod-test-session-secret \
    sidecast-test:nextjs >/dev/null
within 30 "sidecast in the pod to turn healthy" eval '[ "$(docker inspect -f "{{.State.Health.Status}}" pod-sidecast)" = healthy ]'
say "the pod runs: pause, sidecast and the Next.js app share one network namespace"

pod_net="/proc/$(docker inspect -f '{{.State.Pid}}' pod-pause)/ns/net"
(cd examples/nextjs && nsenter --net="$pod_net" env NEXT_BUILT=1 \
    E2E_APP_URL=http://127.0.0.1:3000 E2E_SIDECAST_GRPC=127.0.0.1:50051 \
    E2E_SIDECAST_RESTART='["docker","restart","-t","10","pod-sidecast"]' \
    npm test) || {
    docker logs pod-app 2>&1 | tail -20 >&2
    docker logs pod-sidecast 2>&1 | tail -20 >&2
    fail "the browser test against the pod"
}
say "the browser test passed against the pod (screenshots in examples/nextjs/test-results/pod/)"
say "passed"
