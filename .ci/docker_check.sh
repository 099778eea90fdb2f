#!/usr/bin/env bash
# The container deployment, built and run for real (issue 13, "Deployment").
# As root on a Debian 12 machine that reaches Debian's mirror and PyPI but no
# image registry:
#   1. apt-get installs docker.io, debootstrap and docker-compose when missing;
#   2. starts dockerd when none answers (without iptables rules or IP forwarding,
#      so the host's firewall and the NAT lab are untouched; published ports go
#      through docker-proxy) and stops it again at the end;
#   3. builds a base image from Debian's packages (debootstrap minbase bookworm
#      with python3-venv, the machine's CA bundle and a pip.conf that trusts it),
#      once: it is kept as natbypass-base:bookworm (REBUILD_BASE=1 remakes it);
#   4. builds the project's Dockerfile with --build-arg BASE=natbypass-base:bookworm
#      (the Dockerfile's default stays python:3.11-slim);
#   5. builds a stand-in for the official redis:7 image (.ci/redis-standin.Dockerfile,
#      Debian's redis-server on the same base), once, as natbypass-ci-redis:7;
#   6. runs deploy/compose.yaml with both profiles (Redis, two mediators sharing
#      it, the example peer; host ports chosen by docker on 127.0.0.1) and
#      checks: a STUN Binding answered over UDP and over TCP, the signalling
#      greeting, GET /healthz 200 through the published metrics port (both
#      mediators), every container healthy by its HEALTHCHECK, the peer
#      registered (the mediator's metrics say 1 peer), both mediators on Redis,
#      a session across the mediators (`natbypass connect` registered at
#      mediator-b reaches the example peer registered at mediator, echoes
#      included), the processes not root, the peer's identity key kept in its
#      volume, SIGTERM stopping the mediator (a peer registered) within 10 s
#      with status 0;
#   7. removes the stack and its volumes.
# Prints how long each step took; exits non-zero when a check failed.
#   bash .ci/docker_check.sh            KEEP=1: leave the stack running
set -uo pipefail
cd "$(dirname "$0")/.."
SRC=$(pwd)
BASE_IMAGE=natbypass-base:bookworm
IMAGE=natbypass:ci
REDIS_IMAGE=natbypass-ci-redis:7
PROJECT=natbypass-ci
WORK=$(mktemp -d /tmp/natbypass-docker-XXXXXX)
FAILED=0
DOCKERD_PID=
START=$SECONDS

step() { echo; echo "=== docker-check: $* ($(date -u +%H:%M:%S))"; STEP_START=$SECONDS; }
took() { echo "=== docker-check: $1 took $((SECONDS - STEP_START)) s"; }
fail() { echo "docker-check: FAIL: $*" >&2; FAILED=1; }
die() { echo "docker-check: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (it installs packages and starts dockerd)"

compose() { "${COMPOSE[@]}" -p "$PROJECT" -f "$SRC/deploy/compose.yaml" "$@"; }

cleanup() {
  if [ "${KEEP:-0}" != 1 ] && [ -n "${COMPOSE:-}" ]; then
    compose --profile peer --profile cluster down -v --remove-orphans >/dev/null 2>&1
  fi
  if [ -n "$DOCKERD_PID" ] && [ "${KEEP:-0}" != 1 ]; then
    kill "$DOCKERD_PID" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.2; done
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

step "packages"
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null || missing+=(docker-compose)
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || die "apt-get install ${missing[*]} failed"
fi
if docker compose version >/dev/null 2>&1; then COMPOSE=(docker compose); else COMPOSE=(docker-compose); fi
echo "docker-check: $(docker --version); compose: $("${COMPOSE[@]}" version --short 2>/dev/null || "${COMPOSE[@]}" version | head -n1)"
took packages

step "dockerd"
if ! docker info >/dev/null 2>&1; then
  dockerd --iptables=false --ip6tables=false --ip-forward=false >"$WORK/dockerd.log" 2>&1 &
  DOCKERD_PID=$!
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
  docker info >/dev/null 2>&1 || { tail -n 20 "$WORK/dockerd.log" >&2; die "dockerd did not start"; }
  echo "docker-check: started dockerd (pid $DOCKERD_PID); it is stopped at the end"
fi
echo "docker-check: server $(docker version -f '{{.Server.Version}}'), storage $(docker info -f '{{.Driver}}')"
took dockerd

step "base image $BASE_IMAGE"
if [ "${REBUILD_BASE:-0}" = 1 ] || ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null)
  mirror=${mirror:-http://deb.debian.org/debian}
  rootfs="$WORK/rootfs"
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$rootfs" "$mirror" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -n 20 "$WORK/debootstrap.log" >&2; die "debootstrap failed"; }
  # The machine's CA bundle (it may hold a proxy's CA) and a pip that trusts it.
  cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
  printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$rootfs/etc/pip.conf"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' - "$BASE_IMAGE" >/dev/null || die "docker import failed"
  rm -rf "$rootfs"
else
  echo "docker-check: $BASE_IMAGE exists (REBUILD_BASE=1 remakes it)"
fi
took "base image"

step "image $IMAGE from the Dockerfile"
proxy_args=()
for v in HTTP_PROXY HTTPS_PROXY NO_PROXY http_proxy https_proxy no_proxy; do
  [ -n "${!v:-}" ] && proxy_args+=(--build-arg "$v")
done
docker build --network host --build-arg BASE="$BASE_IMAGE" "${proxy_args[@]}" -t "$IMAGE" "$SRC" \
  >"$WORK/build.log" 2>&1 || { tail -n 30 "$WORK/build.log" >&2; die "docker build failed"; }
echo "docker-check: $(docker image inspect -f '{{.Id}} {{.Size}} bytes, user {{.Config.User}}, entrypoint {{.Config.Entrypoint}} cmd {{.Config.Cmd}}' "$IMAGE")"
took image

step "Redis image $REDIS_IMAGE (stand-in for redis:7)"
if [ "${REBUILD_BASE:-0}" = 1 ] || ! docker image inspect "$REDIS_IMAGE" >/dev/null 2>&1; then
  docker build --network host --build-arg BASE="$BASE_IMAGE" "${proxy_args[@]}" -t "$REDIS_IMAGE" \
    -f "$SRC/.ci/redis-standin.Dockerfile" "$SRC/.ci" >"$WORK/redis-build.log" 2>&1 \
    || { tail -n 30 "$WORK/redis-build.log" >&2; die "building the Redis stand-in failed"; }
else
  echo "docker-check: $REDIS_IMAGE exists (REBUILD_BASE=1 remakes it)"
fi
echo "docker-check: $(docker run --rm --network none "$REDIS_IMAGE" redis-server --version)"
took "Redis image"

step "compose stack up"
export NATBYPASS_IMAGE=$IMAGE NATBYPASS_BASE=$BASE_IMAGE NATBYPASS_REDIS_IMAGE=$REDIS_IMAGE NATBYPASS_PUBLIC_IP=127.0.0.1
# Empty: docker picks free ports.
export NATBYPASS_STUN_PORT= NATBYPASS_SIGNAL_PORT= NATBYPASS_METRICS_PORT=
export NATBYPASS_B_STUN_PORT= NATBYPASS_B_SIGNAL_PORT= NATBYPASS_B_METRICS_PORT=
compose --profile peer --profile cluster up -d --no-build >"$WORK/up.log" 2>&1 || { cat "$WORK/up.log" >&2; die "compose up failed"; }
redis=$(compose ps -q redis)
mediator=$(compose ps -q mediator)
mediator_b=$(compose ps -q mediator-b)
peer=$(compose ps -q peer)
[ -n "$redis" ] && [ -n "$mediator" ] && [ -n "$mediator_b" ] && [ -n "$peer" ] || die "compose did not start all four services"
port() { docker port "$1" "$2" | grep -m1 -o '[0-9]*$'; }
stun_udp=$(port "$mediator" 3478/udp) stun_tcp=$(port "$mediator" 3478/tcp)
signal=$(port "$mediator" 7000/tcp) metrics=$(port "$mediator" 9100/tcp)
signal_b=$(port "$mediator_b" 7000/tcp) metrics_b=$(port "$mediator_b" 9100/tcp)
echo "docker-check: published on 127.0.0.1: STUN udp $stun_udp tcp $stun_tcp, signalling $signal, metrics $metrics;" \
  "mediator-b: signalling $signal_b, metrics $metrics_b"
took "compose up"

step "checks"
# The STUN codec from the source tree (standard library only), as .ci/readme.py does.
PYTHONPATH="$SRC" python3 - "$stun_udp" "$stun_tcp" "$signal" "$metrics" "$signal_b" "$metrics_b" <<'EOF' || fail "service checks (above)"
import json, os, socket, sys, time, urllib.request
from natbypass.stun.message import Message, MessageClass, Method, XorMappedAddress, decode

stun_udp, stun_tcp, signal, metrics, signal_b, metrics_b = (int(a) for a in sys.argv[1:])
HOST, DEADLINE = "127.0.0.1", time.monotonic() + 60
failed = []

def retry(what, attempt):
    while True:
        try:
            return attempt()
        except Exception as e:
            if time.monotonic() > DEADLINE:
                failed.append(f"{what}: {e!r}")
                return None
            time.sleep(0.5)

def binding(kind):
    request = Message(Method.BINDING, MessageClass.REQUEST, os.urandom(12))
    with socket.socket(socket.AF_INET, kind) as s:
        s.settimeout(2)
        if kind == socket.SOCK_DGRAM:
            s.sendto(request.encode(), (HOST, stun_udp))
            data = s.recv(2048)
        else:
            s.connect((HOST, stun_tcp))
            s.sendall(request.encode())
            data = b""
            while len(data) < 20 or len(data) < 20 + int.from_bytes(data[2:4], "big"):
                chunk = s.recv(2048)
                if not chunk:
                    raise ConnectionError("closed before a whole answer")
                data += chunk
    reply = decode(data)
    assert reply.transaction_id == request.transaction_id and reply.cls == MessageClass.SUCCESS, reply
    return reply.get(XorMappedAddress)

def greeting(port=signal):
    with socket.create_connection((HOST, port), timeout=2) as s:
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(4096)
            if not chunk:
                raise ConnectionError(f"closed after {data!r}")
            data += chunk
    hello = json.loads(data)
    assert hello.get("op") == "hello", hello
    return hello

def get(path, port=metrics):
    with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=3) as r:
        return r.status, r.read().decode()

def gauge(name, port=metrics):
    status, text = get("/metrics", port)
    line = next(l for l in text.splitlines() if l.startswith(name + " "))
    return line, float(line.split()[1])

def one_peer():
    line, value = gauge("natbypass_mediator_peers")
    assert value == 1.0, line
    return line

def on_redis(port):
    line, value = gauge("natbypass_mediator_cluster_available", port)
    assert value == 1.0, line
    return line

for what, attempt in [
    ("STUN Binding over UDP", lambda: binding(socket.SOCK_DGRAM)),
    ("STUN Binding over TCP", lambda: binding(socket.SOCK_STREAM)),
    ("signalling greeting", greeting),
    ("GET /healthz", lambda: get("/healthz")),
    ("mediator-b: signalling greeting", lambda: greeting(signal_b)),
    ("mediator-b: GET /healthz", lambda: get("/healthz", metrics_b)),
    ("the example peer registered", one_peer),
    ("mediator on Redis", lambda: on_redis(metrics)),
    ("mediator-b on Redis", lambda: on_redis(metrics_b)),
]:
    started = time.monotonic()
    result = retry(what, attempt)
    if result is not None:
        print(f"docker-check: ok: {what} ({(time.monotonic() - started) * 1000:.0f} ms): {result}")
if failed:
    print("\n".join(f"docker-check: FAIL: {f}" for f in failed), file=sys.stderr)
sys.exit(1 if failed else 0)
EOF

# A session across the two mediators: a peer registered at mediator-b (run in the
# example peer's container, a key of its own on the tmpfs) connects to "example",
# registered at mediator; the offer and the session travel through Redis.
t0=$EPOCHREALTIME
if docker exec "$peer" natbypass connect --mediator tcp:mediator-b:7000 --id ci-probe --peer example \
    --identity /tmp/ci-probe.pem --no-discovery --count 3 --interval 0.1 --json >"$WORK/connect.json" 2>"$WORK/connect.err"; then
  echo "docker-check: ok: a session across the mediators ($(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN {printf "%.1f", b - a}') s): $(tr -d '\n' <"$WORK/connect.json" | cut -c1-300)"
else
  fail "natbypass connect through mediator-b to the peer at mediator: $(tail -n 5 "$WORK/connect.err")"
fi
offers_remote=$(curl -sf "http://127.0.0.1:$metrics_b/metrics" 2>/dev/null | grep -m1 'remote' || true)
[ -n "$offers_remote" ] && echo "docker-check: mediator-b's metrics: $offers_remote"

for name in redis mediator mediator_b peer; do
  id=${!name}
  status=
  for _ in $(seq 90); do
    status=$(docker inspect -f '{{.State.Health.Status}}' "$id")
    [ "$status" = healthy ] && break
    sleep 1
  done
  if [ "$status" = healthy ]; then
    echo "docker-check: ok: $name healthy by its HEALTHCHECK: $(docker inspect -f '{{(index .State.Health.Log 0).Output}}' "$id" | tr -d '\n')"
  else
    fail "$name is $status: $(docker inspect -f '{{json .State.Health}}' "$id")"
  fi
  pid=$(docker inspect -f '{{.State.Pid}}' "$id")
  uid=$(awk '/^Uid:/ {print $2, $3, $4, $5}' "/proc/$pid/status")
  caps=$(awk '/^CapEff:/ {print $2}' "/proc/$pid/status")
  if [ -n "$uid" ] && ! grep -qw 0 <<<"$uid" && [ "$caps" = 0000000000000000 ]; then
    echo "docker-check: ok: $name runs as uid $uid (real, effective, saved, fs), no capabilities"
  else
    fail "$name runs as uid '$uid', capabilities $caps"
  fi
done
if docker run --rm --network none --entrypoint sh "$IMAGE" -c 'test -f /opt/natbypass/lib/python3*/site-packages/twisted/plugins/dropin.cache' 2>/dev/null; then
  echo "docker-check: ok: the image holds Twisted's plugin cache"
else
  fail "no dropin.cache in the image"
fi
identity=$(docker exec "$peer" stat -c '%a %U' /var/lib/natbypass/identity.pem 2>&1)
if [ "$identity" = "600 natbypass" ]; then
  echo "docker-check: ok: the peer's identity key is in its volume, mode 600, owned by natbypass"
else
  fail "the peer's identity key: $identity"
fi
for name in mediator mediator_b; do
  if docker logs "${!name}" 2>&1 | grep -q Traceback; then fail "a traceback in $name's log"; fi
done
took checks

step "SIGTERM (the example peer still registered)"
t0=$EPOCHREALTIME
# docker stop: SIGTERM, then SIGKILL (status 137) after 10 s.
docker stop -t 10 "$mediator" >/dev/null
code=$(docker inspect -f '{{.State.ExitCode}}' "$mediator")
elapsed=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN {printf "%.1f", b - a}')
echo "docker-check: the mediator exited with status ${code:-none} $elapsed s after SIGTERM"
if [ "${code:-}" != 0 ] || awk -v e="$elapsed" 'BEGIN {exit !(e >= 10)}'; then
  fail "SIGTERM: status ${code:-none} after $elapsed s (want 0 within 10 s)"
  docker logs --tail 20 "$mediator" >&2
fi
docker logs --tail 3 "$mediator" 2>&1 | sed 's/^/docker-check: mediator log: /'
took SIGTERM

echo
echo "docker-check: total $((SECONDS - START)) s"
if [ "$FAILED" = 0 ]; then echo "docker-check: all checks passed"; else echo "docker-check: some checks failed"; fi
exit "$FAILED"
