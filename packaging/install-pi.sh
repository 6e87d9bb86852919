#!/bin/sh
# Install TheRelay Agent on a Raspberry Pi (Raspberry Pi OS 64-bit) or any Debian 12 machine
# without the .deb, in the same layout as the .deb: the agent in a venv under
# /opt/therelay-agent, the therelay-agent user, /var/lib/therelay-agent,
# /etc/therelay-agent/config.yaml, the systemd unit enabled (and started when systemd runs).
# Running it again upgrades (a new venv, then one atomic switch and a restart).
#
#   sudo packaging/install-pi.sh                      # build the agent from this source tree,
#                                                     # dependencies from PyPI
#   sudo packaging/install-pi.sh --wheel FILE.whl     # this agent wheel, dependencies from PyPI
#   sudo packaging/install-pi.sh --wheelhouse DIR     # offline: every wheel from DIR
#                                                     # (packaging/build-deb leaves one in
#                                                     # build/wheelhouse-<arch>/)
#   sudo packaging/install-pi.sh --uninstall [--purge]
#
# --uninstall keeps the configuration, the state (tokens, audit log) and the user;
# --purge deletes them too. The steps themselves are in lib/therelay-setup.sh, shared with
# the .deb's maintainer scripts.
set -eu

here="$(cd "$(dirname "$0")" && pwd)"
if [ -f "$here/lib/therelay-setup.sh" ]; then
    lib="$here/lib/therelay-setup.sh"       # in the source tree
else
    lib="$here/therelay-setup.sh"           # the copy installed in /opt/therelay-agent/lib
fi
TRPKG_ROOT=""
# shellcheck source=lib/therelay-setup.sh
. "$lib"

usage() { sed -n '8,15p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

mode=install wheelhouse="" wheel="" purge=""
while [ $# -gt 0 ]; do
    case "$1" in
        --wheelhouse) [ $# -ge 2 ] || usage; wheelhouse="$2"; shift 2 ;;
        --wheel) [ $# -ge 2 ] || usage; wheel="$2"; shift 2 ;;
        --uninstall) mode=uninstall; shift ;;
        --purge) purge=yes; shift ;;
        -h|--help) usage ;;
        *) echo "install-pi.sh: unknown argument: $1" >&2; usage ;;
    esac
done
[ -z "$wheelhouse" ] || [ -z "$wheel" ] || tr_die "give --wheelhouse or --wheel, not both"
[ -z "$purge" ] || [ "$mode" = uninstall ] || tr_die "--purge goes with --uninstall"
[ "$(id -u)" -eq 0 ] || tr_die "run it as root (sudo $0 ...)"

if dpkg-query -W -f='${Status}' therelay-agent 2>/dev/null | grep -q "ok installed"; then
    tr_die "the therelay-agent package is installed: upgrade it with the .deb or remove it" \
        "with apt-get; this script manages installs made without the package"
fi

# Debian packages the install needs; fetched with apt-get only when missing (so the
# wheelhouse install stays offline on a machine that has them).
ensure_system_packages() {
    missing=""
    for p in python3 python3-venv passwd; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" \
            || missing="$missing $p"
    done
    [ -z "$missing" ] && return 0
    tr_say "installing Debian packages:$missing"
    apt-get update -q
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
}

# No --wheel and no --wheelhouse: build the agent's wheel from the source tree around this
# script, in a copy (so no root-owned build files land in the checkout).
build_wheel() {
    src="$(cd "$here/.." && pwd)"
    [ -f "$src/pyproject.toml" ] && [ -d "$src/agent" ] \
        || tr_die "no source tree around $here: give --wheel FILE or --wheelhouse DIR"
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    mkdir "$tmp/src"
    cp "$src/pyproject.toml" "$src/README.md" "$tmp/src/"
    tar -C "$src" --exclude=__pycache__ --exclude='*.pyc' -cf - agent | tar -C "$tmp/src" -xf -
    tr_say "building the agent's wheel from $src"
    "$TR_PYTHON" -m venv "$tmp/build-venv"
    "$tmp/build-venv/bin/python" -m pip wheel --quiet --disable-pip-version-check --no-deps \
        -w "$tmp" "$tmp/src"
    wheel="$(ls "$tmp"/therelay_agent-*.whl)"
}

install_files() {
    src="$(cd "$here/.." && pwd)"
    for f in "$src/systemd/$TR_UNIT" "$here/config.yaml" "$src/config.example.yaml"; do
        [ -f "$f" ] || tr_die "$f is missing: run this script from the agent's source tree"
    done
    install -d -m 0755 "$TR_PREFIX" "$TR_PREFIX/lib" /usr/share/doc/therelay-agent
    # keep this script and its library, for "--uninstall" without the source tree
    install -m 0755 "$0" "$TR_PREFIX/lib/install-pi.sh"
    install -m 0644 "$lib" "$TR_PREFIX/lib/therelay-setup.sh"
    install -m 0644 "$src/systemd/$TR_UNIT" "$TR_UNIT_FILE"
    install -m 0644 "$src/config.example.yaml" /usr/share/doc/therelay-agent/
    [ ! -f "$src/docs/install.md" ] || install -m 0644 "$src/docs/install.md" /usr/share/doc/therelay-agent/
    [ ! -f "$src/README.md" ] || install -m 0644 "$src/README.md" "$TR_PREFIX/README.md"
    tr_install_config "$here/config.yaml"
    ln -sfn /opt/therelay-agent/venv/bin/therelay-agent "$TR_BIN_LINK"
}

do_install() {
    ensure_system_packages
    if [ -n "$wheelhouse" ]; then
        ls "$wheelhouse"/therelay_agent-*.whl >/dev/null 2>&1 \
            || tr_die "$wheelhouse has no therelay_agent wheel"
        tr_check_python exact
        # offline: nothing from the network, nothing from the machine's pip configuration
        set -- --isolated --no-index --find-links "$wheelhouse" therelay-agent
        export PIP_CONFIG_FILE=/dev/null
    else
        tr_check_python
        pins=""
        if [ -z "$wheel" ]; then
            build_wheel
            # from the source tree: its dependencies at the versions the tests ran with
            pins="$(cd "$here/.." && pwd)/constraints.txt"
        fi
        [ -f "$wheel" ] || tr_die "$wheel: no such file"
        if [ -n "$pins" ] && [ -f "$pins" ]; then set -- -c "$pins" "$wheel"; else set -- "$wheel"; fi
    fi
    tr_create_user
    tr_make_dirs
    install_files
    tr_say "installing the agent into a new virtual environment"
    tr_install_venv "$@"
    tr_enable_unit
    tr_service restart
    tr_prune_venvs
    tr_say "installed $("$TR_VENV/bin/therelay-agent" --version)"
    [ -d /run/systemd/system ] || tr_say "systemd is not running here: the service was enabled, not started"
}

do_uninstall() {
    tr_service stop
    tr_remove_venvs
    rm -rf "$TR_PREFIX" /usr/share/doc/therelay-agent
    rm -f "$TR_UNIT_FILE" "$TR_BIN_LINK"
    if [ -n "$purge" ]; then
        tr_purge_unit
        tr_purge_data
        tr_say "removed, with configuration, state and user"
    else
        tr_say "removed; kept $TR_CONF_DIR, $TR_STATE and the $TR_USER user (--purge deletes them)"
    fi
    [ ! -d /run/systemd/system ] || systemctl --system daemon-reload >/dev/null || true
}

if [ "$mode" = install ]; then do_install; else do_uninstall; fi
