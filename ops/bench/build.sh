# Sourced by the benchmarks that run tandem processes, from the repository root: sets up and
# builds (unless TANDEM_BENCH_NO_BUILD=1), then picks the tandem binary they measure.
#
# The load tools (aor-load, admin-load) come from the build ./ops/test.sh makes, so the two
# share every artefact. The node comes from the release profile, which is how a production
# node is built (README, "Builds"): the dev profile's opt-level 2 and the standard library's
# debug checks compiled into our code cost it CPU no production node spends, and Kamailio,
# the reference, is Debian's optimised build. BENCH_TANDEM_BIN runs another binary instead,
# such as an earlier build for a before/after comparison in one sitting.
if [ "${TANDEM_BENCH_NO_BUILD:-0}" != 1 ]; then
  ./ops/setup.sh
  . ./ops/env.sh
  cargo build --workspace --all-targets
  cargo build --release -p tandem-node --bin tandem
else
  . ./ops/env.sh
fi
TANDEM_BIN="${BENCH_TANDEM_BIN:-$CARGO_TARGET_DIR/release/tandem}"
if [ ! -x "$TANDEM_BIN" ]; then
  echo "no tandem binary at $TANDEM_BIN: run without TANDEM_BENCH_NO_BUILD=1 to build it," \
    "or name one with BENCH_TANDEM_BIN" >&2
  exit 1
fi
