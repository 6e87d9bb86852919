# shellcheck shell=sh
# TheRelay Agent: the install, upgrade and removal steps shared by the .deb's maintainer
# scripts and packaging/install-pi.sh. POSIX sh, sourced (never run).
#
# packaging/build-deb pastes this file into postinst, prerm and postrm in place of the line
# "#THERELAY_SETUP_LIB#" (the way debhelper pastes its snippets at #DEBHELPER#): a postrm
# runs after dpkg has deleted the package's files, so it cannot source a file the package
# ships. install-pi.sh sources it from beside itself.
#
# TRPKG_ROOT (default empty) is prepended to every path, so the steps can be tried in a
# scratch directory; the maintainer scripts force it empty.

TR_USER=therelay-agent                         # = User= and Group= in the unit
TR_UNIT=therelay-agent.service
TR_PREFIX="${TRPKG_ROOT:-}/opt/therelay-agent"
TR_VENVS="$TR_PREFIX/venvs"                    # one directory per install, never renamed
TR_VENV="$TR_PREFIX/venv"                      # symlink to the current one (ExecStart uses it)
TR_STATE="${TRPKG_ROOT:-}/var/lib/therelay-agent"
TR_CONF_DIR="${TRPKG_ROOT:-}/etc/therelay-agent"
TR_CONFIG="$TR_CONF_DIR/config.yaml"
TR_UNIT_FILE="${TRPKG_ROOT:-}/lib/systemd/system/$TR_UNIT"
TR_BIN_LINK="${TRPKG_ROOT:-}/usr/bin/therelay-agent"
TR_PYTHON="${TR_PYTHON:-python3}"

tr_say() { echo "therelay-agent: $*"; }
tr_die() { echo "therelay-agent: error: $*" >&2; exit 1; }

# The system user and group the unit runs as; their home is the state directory.
tr_create_user() {
    getent group "$TR_USER" >/dev/null || groupadd --system "$TR_USER"
    getent passwd "$TR_USER" >/dev/null || useradd --system --gid "$TR_USER" \
        --home-dir /var/lib/therelay-agent --no-create-home --shell /usr/sbin/nologin \
        --comment "TheRelay Agent" "$TR_USER"
}

# State 0700 owned by the agent (token hashes, audit log); config 0750 root:agent, read-only
# for the agent, matching StateDirectoryMode= and ConfigurationDirectoryMode= in the unit.
tr_make_dirs() {
    install -d -m 0700 -o "$TR_USER" -g "$TR_USER" "$TR_STATE"
    install -d -m 0750 -o root -g "$TR_USER" "$TR_CONF_DIR"
    if [ -f "$TR_CONFIG" ]; then
        chown root:"$TR_USER" "$TR_CONFIG"
        chmod 0640 "$TR_CONFIG"
    fi
}

# Install a config file only when there is none (install-pi.sh; the .deb uses a conffile).
tr_install_config() {  # SOURCE
    [ -e "$TR_CONFIG" ] || install -m 0640 -o root -g "$TR_USER" "$1" "$TR_CONFIG"
}

# The wheelhouse of the .deb holds cp311 wheels, so it needs exactly 3.11 ("exact");
# installing from PyPI needs 3.11 or newer.
tr_check_python() {  # [exact]
    command -v "$TR_PYTHON" >/dev/null \
        || tr_die "$TR_PYTHON not found: install python3 (3.11) and python3-venv"
    if [ "${1:-}" = exact ]; then
        "$TR_PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
            || tr_die "the bundled wheels are for Python 3.11 (Debian 12); $TR_PYTHON is $("$TR_PYTHON" -V 2>&1)"
    else
        "$TR_PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
            || tr_die "the agent needs Python 3.11 or newer; $TR_PYTHON is $("$TR_PYTHON" -V 2>&1)"
    fi
    "$TR_PYTHON" -c 'import ensurepip, venv' 2>/dev/null \
        || tr_die "python3-venv is missing: apt-get install python3-venv"
}

# Build a complete new virtual environment beside the current one, install into it with
# "pip install ARGS...", then repoint the venv symlink with one rename. A failure removes
# the half-built directory and leaves the running install untouched. The new directory
# keeps its name for life because a venv's scripts hold its absolute path.
tr_install_venv() {  # PIP-INSTALL-ARGS...
    mkdir -p "$TR_VENVS"
    chmod 0755 "$TR_PREFIX" "$TR_VENVS"
    _tr_new="$TR_VENVS/$(date -u +%Y%m%dT%H%M%SZ)-$$"
    if ! { "$TR_PYTHON" -m venv "$_tr_new" \
           && "$_tr_new/bin/python" -m pip install --no-input --disable-pip-version-check \
                  --no-cache-dir --quiet "$@"; }; then
        rm -rf "$_tr_new"
        tr_die "installing the agent into a new virtual environment failed; nothing was changed"
    fi
    if [ -d "$TR_VENV" ] && [ ! -L "$TR_VENV" ]; then
        # a venv made by hand (docs/operations.md before the package): keep it aside
        mv "$TR_VENV" "$TR_VENVS/manual-$(date -u +%Y%m%dT%H%M%SZ)"
    fi
    ln -s "venvs/${_tr_new##*/}" "$TR_PREFIX/.venv.new"
    mv -T "$TR_PREFIX/.venv.new" "$TR_VENV"
}

# Delete every venv but the current one (after the service restarted on the new one).
tr_prune_venvs() {
    [ -d "$TR_VENVS" ] || return 0
    _tr_keep="$(readlink "$TR_VENV" 2>/dev/null || true)"
    for _tr_dir in "$TR_VENVS"/*; do
        [ -e "$_tr_dir" ] || continue
        [ "venvs/${_tr_dir##*/}" = "$_tr_keep" ] || rm -rf "$_tr_dir"
    done
}

tr_remove_venvs() {
    rm -rf "$TR_VENV" "$TR_VENVS" "$TR_PREFIX/.venv.new"
}

# deb-systemd-helper and deb-systemd-invoke work only inside a maintainer script; elsewhere
# (install-pi.sh) systemctl does the same, and without systemd (a chroot) the link is made
# by hand, as the unit's [Install] WantedBy=multi-user.target says.
_tr_in_dpkg() { [ -n "${DPKG_MAINTSCRIPT_PACKAGE:-}" ] && command -v deb-systemd-helper >/dev/null; }
TR_WANTS="${TRPKG_ROOT:-}/etc/systemd/system/multi-user.target.wants"

# Enable the unit the way debhelper's postinst does: a unit the admin disabled stays disabled.
tr_enable_unit() {
    if _tr_in_dpkg; then
        deb-systemd-helper unmask "$TR_UNIT" >/dev/null || true
        if deb-systemd-helper --quiet was-enabled "$TR_UNIT"; then
            deb-systemd-helper enable "$TR_UNIT" >/dev/null || true
        else
            deb-systemd-helper update-state "$TR_UNIT" >/dev/null || true
        fi
    elif command -v systemctl >/dev/null; then
        systemctl enable "$TR_UNIT" >/dev/null 2>&1 || true
    else
        install -d -m 0755 "$TR_WANTS"
        ln -sfn "/lib/systemd/system/$TR_UNIT" "$TR_WANTS/$TR_UNIT"
    fi
}

# start|restart|stop, only when systemd runs (not in a chroot, an image build or a container).
tr_service() {  # ACTION
    [ -d /run/systemd/system ] || return 0
    if [ "$1" != stop ]; then
        systemctl --system daemon-reload >/dev/null || true
    fi
    if _tr_in_dpkg && command -v deb-systemd-invoke >/dev/null; then
        deb-systemd-invoke "$1" "$TR_UNIT" >/dev/null || true
    else
        systemctl "$1" "$TR_UNIT" >/dev/null || true
    fi
}

# Forget the unit's enablement (links under /etc/systemd/system and helper state).
tr_purge_unit() {
    if _tr_in_dpkg; then
        deb-systemd-helper purge "$TR_UNIT" >/dev/null || true
        deb-systemd-helper unmask "$TR_UNIT" >/dev/null || true
    fi
    rm -f "$TR_WANTS/$TR_UNIT"
}

# Purge: configuration (with any password files beside it), state, and the user.
tr_purge_data() {
    rm -rf "$TR_CONF_DIR" "$TR_STATE"
    if getent passwd "$TR_USER" >/dev/null; then
        userdel "$TR_USER" >/dev/null 2>&1 || tr_say "could not delete user $TR_USER"
    fi
    if getent group "$TR_USER" >/dev/null; then
        groupdel "$TR_USER" >/dev/null 2>&1 || tr_say "could not delete group $TR_USER"
    fi
}
