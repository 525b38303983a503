#!/bin/sh
# Install homeport from this checkout for the current user, with `homeport` on PATH.
#
#   sh scripts/install.sh            # venv in ~/.local/share/homeport/venv, link in ~/.local/bin
#   sh scripts/install.sh --run-server   # ... then exec `homeport server` (embedded defaults)
#
# Why a venv and a link, not `pip install --user`: Debian's python3 refuses user installs
# (PEP 668), and a venv keeps homeport's dependencies away from the system's. Runs as root
# without sudo (a minimal Debian has none): as root, the python3-venv package is installed
# with apt-get when `python3 -m venv` cannot work. Environment overrides:
#   HOMEPORT_VENV (venv directory), HOMEPORT_BIN (directory for the link), PYTHON (interpreter).
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
run_server=no
for arg in "$@"; do
  case "$arg" in
    --run-server) run_server=yes ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown argument $arg (try --help)" >&2; exit 2 ;;
  esac
done

py=${PYTHON:-python3}
venv=${HOMEPORT_VENV:-${XDG_DATA_HOME:-$HOME/.local/share}/homeport/venv}
bindir=${HOMEPORT_BIN:-$HOME/.local/bin}

if ! command -v "$py" >/dev/null 2>&1; then
  echo "install.sh: $py not found; install Python 3.11 or newer (Debian: apt-get install python3)" >&2
  exit 1
fi
if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "install.sh: homeport needs Python 3.11 or newer; $py is $("$py" -V 2>&1)" >&2
  exit 1
fi
if ! "$py" -c 'import ensurepip, venv' >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "install.sh: apt-get install python3-venv"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
  else
    echo "install.sh: $py cannot make a venv; as root run: apt-get install -y python3-venv" >&2
    exit 1
  fi
fi

[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check "$here"
mkdir -p "$bindir"
ln -sf "$venv/bin/homeport" "$bindir/homeport"
echo "installed: $bindir/homeport -> $venv/bin/homeport"

case ":$PATH:" in
  *":$bindir:"*) ;;
  *)
    echo "note: $bindir is not on your PATH; add it (new shells on Debian do this by themselves"
    echo "      once the directory exists):   export PATH=\"$bindir:\$PATH\""
    ;;
esac

if [ "$run_server" = yes ]; then
  exec "$bindir/homeport" server
fi
