#!/usr/bin/env bash
# Build the operator image without a container engine, as three layer trees, then pack them into an
# OCI layout (orchardist.dev.image), cached by a key of every input. The Dockerfile runs this same
# script (`--stage DIR`) and copies the same trees, so both builds put in the same things:
#   base: hack/image/debian-packages.txt with their dependencies, unpacked by mmdebstrap (no shell)
#   deps: requirements/runtime.txt (hash-checked) into /usr/local/lib/python3.X/dist-packages
#   app:  the project wheel there too, a launcher /usr/local/bin/orchardist, and byte-code
#         compiled ahead (the root filesystem is read-only at run time).
# Usage: build-image.sh            build (or reuse) the layout; prints its path last
#        build-image.sh --stage D  only stage the three trees into D (the Dockerfile's build stage)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
[ -x "$root/.venv/bin/python" ] && [ "${1:-}" != --stage ] && py="$root/.venv/bin/python"
suite=bookworm
pkgs=$(grep -v '^#' "$root/hack/image/debian-packages.txt" | xargs | tr ' ' ,)
pyver=$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git -C "$root" log -1 --format=%ct 2>/dev/null || echo 0)}

stage_base() { # dir: Debian's packages, from the machine's own apt sources
  local sources=/etc/apt/sources.list.d/debian.sources
  [ -f "$sources" ] || sources=/etc/apt/sources.list
  rm -rf "$1"
  mmdebstrap --quiet --variant=extract --include="$pkgs" \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    "$suite" "$1" - <"$sources" >&2
  local have
  have=$(ls -d "$1"/usr/lib/python3.*/ | sed -E 's#.*/python(3\.[0-9]+)/#\1#' | head -1)
  [ "$have" = "$pyver" ] || { echo "base has Python $have, this build runs $pyver" >&2; exit 1; }
}

stage_deps() { # dir
  rm -rf "$1"
  "$py" -m pip install -q --no-compile --no-deps --only-binary=:all: --require-hashes \
    -r "$root/requirements/runtime.txt" --target "$1/usr/local/lib/python$pyver/dist-packages" >&2
  rm -rf "$1/usr/local/lib/python$pyver/dist-packages/bin"
}

stage_app() { # dir
  local wheels
  rm -rf "$1"; wheels=$(mktemp -d)
  "$py" -m pip wheel -q --no-deps --no-build-isolation --wheel-dir "$wheels" "$root" >&2
  "$py" -m pip install -q --no-compile --no-deps --no-index \
    --target "$1/usr/local/lib/python$pyver/dist-packages" "$wheels"/orchardist-*.whl >&2
  rm -rf "$wheels" "$1/usr/local/lib/python$pyver/dist-packages/bin"
  mkdir -p "$1/usr/local/bin"
  # Exec'd by the kernel through its first line: no shell involved.
  printf '#!/usr/bin/python%s\nimport sys\nfrom orchardist.cli import main\nsys.exit(main())\n' \
    "$pyver" >"$1/usr/local/bin/orchardist"
  chmod 0755 "$1/usr/local/bin/orchardist"
}

compile() { # dir...: .pyc valid whatever the files' times (unchecked-hash), paths as in the image
  local d
  for d in "$@"; do
    "$py" -m compileall -q -j 0 --invalidation-mode unchecked-hash -s "$d" -p / \
      "$d/usr/local/lib/python$pyver/dist-packages" >&2 || true
  done
}

if [ "${1:-}" = --stage ]; then
  out=$2; mkdir -p "$out"
  stage_base "$out/base"; stage_deps "$out/deps"; stage_app "$out/app"; compile "$out/deps" "$out/app"
  exit 0
fi

command -v mmdebstrap >/dev/null || { echo "mmdebstrap missing: run hack/install-system-deps.sh" >&2; exit 1; }
cache="${ORCHARDIST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/orchardist}/image"
sum() { sha256sum | cut -c1-16; }
base_key=$( (echo "$suite $pyver"; cat "$root/hack/image/debian-packages.txt" "$0") | sum)
deps_key=$( (echo "$pyver"; cat "$root/requirements/runtime.txt") | sum)
# The app's key is the content of what the wheel is built from (committed or not).
app_key=$(cd "$root" && (git ls-files -s -- pyproject.toml README.md operator agent crds charts examples;
  git diff HEAD -- pyproject.toml README.md operator agent crds charts examples) | sum)
revision=$(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)
git -C "$root" diff --quiet HEAD -- operator agent pyproject.toml 2>/dev/null || revision="$revision-dirty"
version=$(sed -nE 's/^__version__ = "(.*)"/\1/p' "$root/operator/orchardist/__init__.py")
layout="$cache/layout-$base_key-$deps_key-$app_key"
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9
if [ -f "$layout/index.json" ]; then
  echo "operator image cached: $layout" >&2; echo "$layout"; exit 0
fi
t0=$SECONDS
[ -d "$cache/base-$base_key" ] || { echo ">> staging the Debian base ($pkgs)" >&2; stage_base "$cache/base-$base_key.tmp" && mv "$cache/base-$base_key.tmp" "$cache/base-$base_key"; }
[ -d "$cache/deps-$deps_key" ] || { echo ">> staging the locked dependencies" >&2; stage_deps "$cache/deps-$deps_key.tmp" && compile "$cache/deps-$deps_key.tmp" && mv "$cache/deps-$deps_key.tmp" "$cache/deps-$deps_key"; }
echo ">> staging the project" >&2
stage_app "$cache/app.tmp"; compile "$cache/app.tmp"
rm -rf "$layout.tmp"
"$py" -m orchardist.dev.image pack --out "$layout.tmp" --version "$version" --revision "$revision" \
  "$cache/base-$base_key" "$cache/deps-$deps_key" "$cache/app.tmp" >&2
rm -rf "$cache/app.tmp"
mv "$layout.tmp" "$layout"
echo ">> operator image built in $((SECONDS - t0)) s: $layout" >&2
echo "$layout"
