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
