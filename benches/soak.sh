#!/usr/bin/env bash
# A bounded soak of the example gateway (see benches/src/bin/soak.rs): 10 minutes of mixed
# traffic with upstream restarts and client aborts, printing the gateway's RSS, open
# descriptors and sockets every 10 s and a verdict (exit 1 if any of them keeps growing).
# Extra arguments go to the driver, e.g. `bash benches/soak.sh --secs 120`.
set -euo pipefail
cd "$(dirname "$0")/.."
ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)"
cargo build --release -p example-gateway --bin gateway -p gateway-benches --bin soak
exec target/release/soak --gateway target/release/gateway "$@"
