#!/usr/bin/env bash
# The Python dependency lock. uv.lock is the single resolution (universal: every platform the
# agent and the operator run on, every Python >= 3.11) of the runtime deps, the dev and bench
# extras and the build backend; requirements/*.txt are exports of it with hashes, so pip alone
# (CI, the Dockerfile, a Mac) installs exactly those versions and never needs uv.
# The engine runtimes' venvs (hack/install-runtimes.sh) are locked the same way, each on its own:
# hack/runtimes/NAME.in -> hack/runtimes/NAME.txt.
#   usage: hack/lock.sh write [uv lock args, e.g. --upgrade]   re-resolve and re-export
#          hack/lock.sh check                                   fail if a lock is stale
set -euo pipefail
cd "$(dirname "$0")/.."
UV=${UV:-.venv/bin/uv}

runtimes="mlx-lm vllm"

# name: the `uv export` selection it holds (runtime = what the operator image installs).
exports=(
  "runtime:--no-default-groups"
  "dev:--no-default-groups --extra dev"
  "bench:--no-default-groups --extra dev --extra bench"
  "build:--only-group build"
)

sha256() {  # macOS has shasum, Debian sha256sum
  if command -v sha256sum >/dev/null; then sha256sum; else shasum -a 256; fi | cut -d' ' -f1
}

# What the runtime locks were compiled from (each .in and overrides file), with checksums: `check`
# sees an edited input without the network, and the locks' own bytes (which name the cached
# runtime venvs) stay uv's output.
inputs() {
  local name f
  for name in $runtimes; do
    for f in "hack/runtimes/$name.in" "hack/runtimes/$name.overrides.txt"; do
      if [ -e "$f" ]; then echo "$(sha256 <"$f")  $f"; fi
    done
  done
}

runtime_lock() {  # NAME [uv args]: re-resolve NAME.in into NAME.txt, keeping the pins it holds
  local name=$1 args=()
  shift
  [ -e "hack/runtimes/$name.overrides.txt" ] && args+=(--override "hack/runtimes/$name.overrides.txt")
  "$UV" pip compile --quiet --universal --python-version 3.11 --generate-hashes \
    --custom-compile-command "make lock" "${args[@]}" "$@" "hack/runtimes/$name.in" \
    -o "hack/runtimes/$name.txt"
}

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
    for e in "${exports[@]}"; do  # rewritten only when changed: `make venv` reinstalls on a newer file
      f="requirements/${e%%:*}.txt"
      render "${e#*:}" >"$f.new"
      if cmp -s "$f.new" "$f"; then rm "$f.new"; else mv "$f.new" "$f"; fi
    done
    for r in $runtimes; do
      runtime_lock "$r" "$@"
    done
    inputs >hack/runtimes/inputs.sha256
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
    if [ "$(inputs)" != "$(cat hack/runtimes/inputs.sha256 2>/dev/null)" ]; then
      echo "hack/runtimes/*.txt were not compiled from the current hack/runtimes/*.in: run \`make lock\`" >&2
      stale=1
    fi
    exit "$stale"
    ;;
  *)
    echo "usage: $0 write [uv lock args] | check" >&2
    exit 2
    ;;
esac
