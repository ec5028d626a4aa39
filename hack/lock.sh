#!/usr/bin/env bash
# The Python dependency lock. uv.lock is the single resolution (universal: every platform the
# agent and the operator run on, every Python >= 3.11) of the runtime deps, the dev and bench
# extras and the build backend; requirements/*.txt are exports of it with hashes, so pip alone
# (CI, the Dockerfile, a Mac) installs exactly those versions and never needs uv.
# The engine runtimes' venvs (hack/install-runtimes.sh) are locked the same way, each on its own:
# hack/runtimes/NAME.in -> hack/runtimes/NAME.txt.
#   usage: hack/lock.sh write [uv lock args, e.g. --upgrade]   re-resolve and re-export
#          hack/lock.sh check                                   fail if either is stale
set -euo pipefail
cd "$(dirname "$0")/.."
UV=${UV:-.venv/bin/uv}

# name: the `uv export` selection it holds (runtime = what the operator image installs).
exports=(
  "runtime:--no-default-groups"
  "dev:--no-default-groups --extra dev"
  "bench:--no-default-groups --extra dev --extra bench"
  "build:--only-group build"
)

runtime_lock() {  # NAME OUT [uv args]: re-resolves NAME.in into OUT, keeping the pins NAME.txt holds
  local name=$1 out=$2 args=()
  shift 2
  [ -e "hack/runtimes/$name.overrides.txt" ] && args+=(--override "hack/runtimes/$name.overrides.txt")
  [ -e "hack/runtimes/$name.txt" ] && [ "$out" != "hack/runtimes/$name.txt" ] && cp "hack/runtimes/$name.txt" "$out"
  "$UV" pip compile --quiet --universal --python-version 3.11 --generate-hashes \
    --custom-compile-command "make lock" "${args[@]}" "$@" "hack/runtimes/$name.in" -o "$out"
}

runtimes="mlx-lm vllm"

render() {  # $1: the selection; prints the requirements file
  echo "# Generated from uv.lock by \`make lock\` (hack/lock.sh); do not edit. Install with"
  echo "#   pip install --require-hashes -r <this file>"
  # shellcheck disable=SC2086  # the selection is a list of flags
  "$UV" export --frozen --quiet --no-header --no-emit-project $1
}

case "${1:-}" in
  write)
    shift
    "$UV" lock "$@"
    mkdir -p requirements
    for e in "${exports[@]}"; do
      render "${e#*:}" >"requirements/${e%%:*}.txt"
    done
    for r in $runtimes; do
      runtime_lock "$r" "hack/runtimes/$r.txt" "$@"
    done
    ;;
  check)
    "$UV" lock --check
    stale=0
    for e in "${exports[@]}"; do
      f="requirements/${e%%:*}.txt"
      if ! render "${e#*:}" | diff -q - "$f" >/dev/null 2>&1; then
        echo "$f does not match uv.lock: run \`make lock\`" >&2
        stale=1
      fi
    done
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    for r in $runtimes; do
      if ! runtime_lock "$r" "$tmp/$r.txt" || ! diff -q "$tmp/$r.txt" "hack/runtimes/$r.txt" >/dev/null; then
        echo "hack/runtimes/$r.txt does not match hack/runtimes/$r.in: run \`make lock\`" >&2
        stale=1
      fi
    done
    exit "$stale"
    ;;
  *)
    echo "usage: $0 write [uv lock args] | check" >&2
    exit 2
    ;;
esac
