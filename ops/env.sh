# Sourced by the ops scripts: one build cache outside the clone, shared by every script, so
# a reused machine never compiles the C++ dependencies twice. An explicit CARGO_TARGET_DIR wins.
if [ -z "${CARGO_TARGET_DIR:-}" ]; then
  export CARGO_TARGET_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/tandem/target"
fi
mkdir -p "$CARGO_TARGET_DIR"
export TANDEM_BIN="$CARGO_TARGET_DIR/debug/tandem"
