#!/usr/bin/env bash
# The gateway, nginx, HAProxy and a bare hyper proxy side by side, in one command (see
# README "Performance").
# Installs what is missing (Debian/Ubuntu), builds in release mode, and pins the driver,
# wrk and the origin to core 1 and each proxy to core 0. Extra arguments go to loadbench
# (`--help` lists them), e.g. `bash benches/loadbench.sh --rounds 3 --secs 3`.
set -euo pipefail
cd "$(dirname "$0")/.."

source benches/install.sh
install_missing nginx=nginx-light haproxy=haproxy wrk=wrk taskset=util-linux
# Thousands of idle connections need as many descriptors on both sides.
ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)"

cargo build --release -p example-gateway --bin gateway -p gateway-benches --bin loadbench --bin hyper-proxy --bin hand-gateway
exec taskset -c 1 target/release/loadbench --gateway target/release/gateway "$@"
