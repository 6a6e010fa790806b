#!/usr/bin/env bash
# The HTTP cache conformance suite (RFC 9111 cases, benches/src/conformance) against the
# gateway, nginx's proxy_cache and HAProxy's cache, in one command (see README "HTTP
# cache"). Installs nginx and HAProxy when missing (Debian/Ubuntu). Extra arguments go to
# cache-conformance (`--help` lists them), e.g. `bash benches/conformance.sh --targets gateway`.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
if ((${#need[@]})); then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo=sudo
    echo "installing ${need[*]}" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
export PATH="$PATH:/usr/sbin:/sbin"

cargo build --release -p example-gateway --bin gateway -p gateway-benches --bin cache-conformance
exec target/release/cache-conformance --gateway target/release/gateway "$@"
