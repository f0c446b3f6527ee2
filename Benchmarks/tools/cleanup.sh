# Sourced by a benchmark script after it sets `out` (its scratch directory): every process it
# starts goes into `pids` (`pids+=($!)`); on exit, failure included, they are stopped (TERM, then
# KILL) and "$out" is removed.
pids=()
cleanup() {
  for p in "${pids[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  sleep 0.3
  for p in "${pids[@]:-}"; do [ -n "$p" ] && kill -9 "$p" 2>/dev/null || true; done
  rm -rf "$out"
}
trap cleanup EXIT
