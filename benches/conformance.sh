#!/usr/bin/env bash
# The HTTP cache conformance suite (RFC 9111 cases, benches/src/conformance) against the
# gateway, nginx's proxy_cache and HAProxy's cache, in one command (see README "HTTP
# cache"). Installs nginx and HAProxy when missing (Debian/Ubuntu). Extra arguments go to
# cache-conformance (`--help` lists them), e.g. `bash benches/conformance.sh --targets gateway`.
set -euo pipefail
cd "$(dirname "$0")/.."

source benches/install.sh
install_missing nginx=nginx-light haproxy=haproxy

cargo build --release -p example-gateway --bin gateway -p gateway-benches --bin cache-conformance
exec target/release/cache-conformance --gateway target/release/gateway "$@"
