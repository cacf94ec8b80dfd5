#!/usr/bin/env bash
# The test command (README): builds the workspace (plugins are cdylibs) and runs every test.
# Dev profile with line tables only and no incremental cache, which keeps a cold build on a
# 2-core machine to a few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_INCREMENTAL=0
cargo build --workspace --locked
cargo test --workspace --locked
