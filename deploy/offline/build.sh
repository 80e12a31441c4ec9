#!/usr/bin/env bash
# Build the offline stand-ins for the images docker-compose.yml pulls, on a
# machine that reaches a Debian mirror and a Python package index but no image
# registry:
#
#   local/debian:bookworm            mmdebstrap --variant=minbase, docker import
#   local/python:3.11                for PYTHON_IMAGE      (python:3.11-slim)
#   local/rabbitmq:3.10-management   for RABBITMQ_IMAGE    (rabbitmq:3.13-management)
#   local/redis:7                    for REDIS_IMAGE       (redis:7-alpine)
#   local/postgres:15                for POSTGRES_IMAGE    (postgres:16-alpine)
#
# Usage (root; DOCKER_HOST selects the engine):
#   deploy/offline/build.sh [debian] [python] [rabbitmq] [redis] [postgres]
# (default: all of them; the Debian base is made first when missing).
# Environment: DEBIAN_MIRROR (default: the mirror apt already uses),
# WORK (scratch directory, default: a new one under /tmp).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=${WORK:-$(mktemp -d /tmp/geoscrape-offline.XXXXXX)}
mkdir -p "$work"
log() { echo "offline: $(date +%T) $*"; }

mirror() {
  # The first deb.debian.org-style URI apt uses for Debian itself.
  local uri
  uri=$(grep -hE '^(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/*.sources \
          /etc/apt/sources.list.d/*.list 2>/dev/null \
        | grep -oE 'https?://[^ ]+/debian/?' | grep -v security | head -n1 || true)
  echo "${uri:-http://deb.debian.org/debian}"
}

targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(debian python rabbitmq redis postgres)
if ! docker image inspect local/debian:bookworm >/dev/null 2>&1; then
  log "mmdebstrap bookworm (minbase) from ${DEBIAN_MIRROR:=$(mirror)}"
  # mmdebstrap (apt, parallel downloads) took half the time of debootstrap here;
  # the package lists are kept so the stand-ins' `apt-get update` is cheap. As in
  # Debian's official images, dpkg skips fsync and docs (the options stay in the
  # image's /etc/dpkg/dpkg.cfg.d/, so the stand-ins' installs are quick too).
  mmdebstrap --quiet --variant=minbase --skip=cleanup/apt/lists \
      --dpkgopt=force-unsafe-io --dpkgopt='path-exclude=/usr/share/doc/*' \
      --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
      bookworm - "$DEBIAN_MIRROR" \
      2>"$work/mmdebstrap.log" \
    | docker import - local/debian:bookworm >/dev/null \
    || { tail -n 30 "$work/mmdebstrap.log"; exit 1; }
fi

# The Python stand-in gets the host's pip settings (minus local file:// indexes,
# which do not exist inside) and the CA bundle the host trusts.
ctx="$work/python"
rm -rf "$ctx" && cp -r "$here/python" "$ctx"
{
  echo "[global]"
  echo "timeout = 180"
  index=$(pip3 config get global.index-url 2>/dev/null || true)
  [ -n "$index" ] && [ "${index#file:}" = "$index" ] && echo "index-url = $index"
  true
} > "$ctx/pip.conf"
ca=${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}
cp "$ca" "$ctx/host-ca.crt"

build() {  # tag, context
  local started=$SECONDS
  # --network host: with the engine's `bridge: none` a build has no other route out.
  if docker build --network host -t "$1" "$2" >"$work/build-${1//[\/:]/_}.log" 2>&1; then
    log "built $1 in $((SECONDS - started)) s"
  else
    log "FAILED to build $1:"; tail -n 30 "$work/build-${1//[\/:]/_}.log"; return 1
  fi
}
pids=()
for target in "${targets[@]}"; do
  case $target in
    debian) ;;
    python) build local/python:3.11 "$ctx" & pids+=($!) ;;
    rabbitmq) build local/rabbitmq:3.10-management "$here/rabbitmq" & pids+=($!) ;;
    redis) build local/redis:7 "$here/redis" & pids+=($!) ;;
    postgres) build local/postgres:15 "$here/postgres" & pids+=($!) ;;
    *) echo "offline: unknown target $target" >&2; exit 2 ;;
  esac
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
[ -z "${WORK:-}" ] && rm -rf "$work"
exit $status
