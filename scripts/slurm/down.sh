#!/usr/bin/env bash
# Tear down the cluster that up.sh started in STATE_DIR: cancel its jobs, `scontrol shutdown`, then stop
# slurmdbd, mariadb and munged. Safe to run twice, or on a half-started cluster. STATE_DIR is kept.
#
#   scripts/slurm/down.sh STATE_DIR
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/common.sh"

if alive "$CTLD_PID"; then
    jobs=$(squeue -h -o %A 2>/dev/null || true)
    if [ -n "$jobs" ]; then
        # shellcheck disable=SC2086 - one job id per word
        scancel $jobs || true
        wait_until 30 "jobs to end" bash -c '[ -z "$(squeue -h -o %A)" ]' || true
    fi
    scontrol shutdown || true
fi
# shutdown stops slurmctld and slurmd; signal them anyway in case the controller was not answering.
stop "$SLURMD_PID" "$CTLD_PID"
stop "$DBD_PID"
stop "$MARIADB_PID" "$MUNGE_PID"
echo "SLURM cluster in $STATE is down"
