# shellcheck shell=bash
# Source this from the repository root on the offline GPU machine:
#
#     source scripts/device_setup.sh && python3 -m ...
#
# It installs the wheels carried in .whl/ (bitsandbytes, airllm, ...) into /tmp/site
# without touching the network or the system site-packages, and puts /tmp/site and the
# repository root first on PYTHONPATH. On any failure it prints why to stderr and
# returns (or exits, when executed instead of sourced) with a non-zero status, so a
# `source scripts/device_setup.sh && ...` chain stops right there.
#
# Knobs: QSTREAM_SITE (default /tmp/site), QSTREAM_WHEELS (default .whl),
#        QSTREAM_SETUP_CHECK=1 to also import bitsandbytes and airllm afterwards.

_qstream_setup() {
    local site="${QSTREAM_SITE:-/tmp/site}"
    local wheels="${QSTREAM_WHEELS:-.whl}"
    local -a whls

    shopt -s nullglob
    whls=("$wheels"/*.whl)
    shopt -u nullglob
    if [ "${#whls[@]}" -eq 0 ]; then
        echo "device_setup.sh: FATAL: no wheels found in '$wheels' (cwd: $PWD); was .whl carried?" >&2
        return 1
    fi

    echo "device_setup.sh: installing ${#whls[@]} wheel(s) from $wheels into $site" >&2
    if ! python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target "$site" "${whls[@]}"; then
        echo "device_setup.sh: FATAL: pip install of ${whls[*]} into $site failed" >&2
        return 1
    fi

    # The airllm 4.0.0 wheel also ships a top-level `tests` package; left in $site it would
    # shadow this repository's tests/ on PYTHONPATH. Drop it when airllm's RECORD owns it.
    if [ -d "$site/tests" ] && grep -qs '^tests/__init__.py,' "$site"/airllm-*.dist-info/RECORD; then
        rm -rf "$site/tests"
    fi

    export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"

    if [ "${QSTREAM_SETUP_CHECK:-0}" = "1" ]; then
        if ! python3 -c "import bitsandbytes, airllm; print('bitsandbytes', bitsandbytes.__version__, bitsandbytes.__file__)" >&2; then
            echo "device_setup.sh: FATAL: installed wheels do not import" >&2
            return 1
        fi
    fi
    echo "device_setup.sh: ok; PYTHONPATH=$PYTHONPATH" >&2
    return 0
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    # Executed rather than sourced: the export would be lost, but still report success/failure.
    _qstream_setup || exit 1
    echo "device_setup.sh: note: run it with 'source' so PYTHONPATH reaches your shell" >&2
else
    _qstream_setup || { unset -f _qstream_setup; return 1; }
    unset -f _qstream_setup
fi
