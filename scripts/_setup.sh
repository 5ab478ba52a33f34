# Shared set-up of scripts/test and scripts/demo, sourced from the repository
# root. Written for Debian 12, run as root on a fresh machine:
#  1. installs ActiveMQ Classic with apt-get when it is missing,
#  2. creates the virtual environment .venv, or reuses it, with the system
#     Python 3.11 or newer (set PYTHON to use another interpreter),
#  3. installs taskmesh in editable mode with its "test" extra,
#  4. rebuilds Twisted's plugin cache, so twistd finds taskmesh's plugins.
# As a non-root user, the apt-get steps are skipped.

ACTIVEMQ_JAR=/usr/share/activemq/bin/activemq.jar
VENV=.venv
apt_updated=no

log() {
    echo "scripts/test: $*" >&2
}

can_apt_install() {
    [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null
}

apt_install() {
    if [ "$apt_updated" = no ]; then
        apt-get update
        apt_updated=yes
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y "$@"
}

# 1. ActiveMQ
if [ ! -e "$ACTIVEMQ_JAR" ]; then
    if can_apt_install; then
        log "installing ActiveMQ with apt-get ($ACTIVEMQ_JAR is missing)"
        apt_install activemq
    else
        log "ActiveMQ is not installed ($ACTIVEMQ_JAR is missing) and apt-get needs root;" \
            "run 'apt-get update && apt-get install -y activemq' as root"
    fi
fi

# 2. Virtual environment
python=${PYTHON:-/usr/bin/python3}
if [ ! -x "$python" ]; then
    python=$(command -v python3) || {
        log "error: python3 not found; install python3 or set PYTHON"
        exit 2
    }
fi
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    log "error: $python is older than Python 3.11; set PYTHON to a newer interpreter"
    exit 2
fi

if ! "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
    # Debian ships the venv module's pip bootstrap in a separate package.
    if ! "$python" -c 'import ensurepip' 2>/dev/null && can_apt_install; then
        log "installing python3-venv with apt-get"
        apt_install python3-venv
    fi
    log "creating $VENV with $python"
    "$python" -m venv --clear "$VENV"
fi

# 3. taskmesh and its test dependencies
log "installing taskmesh[test] into $VENV"
# Debian's pip 23.0 in a new venv has no "wheel" package and falls back to
# "setup.py install" for stompest 2.3.0, which ships only a source
# distribution, and that install fails. A current pip builds it through
# PEP 517 instead.
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip setuptools wheel
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --use-pep517 \
    --editable '.[test]' --config-settings editable_mode=compat

# 4. Twisted plugin cache (twisted/plugins/dropin.cache)
"$VENV/bin/python" -c 'from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))'

