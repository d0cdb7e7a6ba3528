#!/usr/bin/env bash
# Install the test dependencies and run the whole test suite.
# As root (CI) it also starts a throwaway single-node Slurm cluster for the
# Slurm tests and stops it afterwards; elsewhere those tests skip with a reason.
# With CI=true (or MACHINABLE_REQUIRE_SLURM=1) a skipped Slurm test fails the run.
set -uo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install -q -e ".[test]" || { echo "test.sh: pip install failed" >&2; exit 1; }

if [[ $(id -u) == 0 && ${MACHINABLE_SKIP_SLURM:-0} != 1 ]]; then
    if command -v sinfo >/dev/null && timeout 20 sinfo -h >/dev/null 2>&1; then
        # a developer's cluster (or one started by hand): use it, leave it running
        echo "test.sh: Slurm is already up: using it" >&2
        export MACHINABLE_SLURM_AVAILABLE=1
    elif bash tests/cluster/start_slurm.sh; then
        export MACHINABLE_SLURM_AVAILABLE=1
        trap 'bash tests/cluster/stop_slurm.sh || true' EXIT  # also when the run is interrupted
    else
        echo "test.sh: could not start Slurm (see above)" >&2
    fi
fi
if [[ ${CI:-} == true ]]; then
    export MACHINABLE_REQUIRE_SLURM=1 MACHINABLE_CRASH_ITERATIONS=${MACHINABLE_CRASH_ITERATIONS:-50}
fi

python3 -m pytest "$@"
rc=$?

if [[ $rc == 5 ]]; then
    echo "test.sh: pytest collected no tests: that is a failure, not a pass" >&2
    exit 1
fi
exit $rc
