# Shared by up.sh and down.sh: the state-dir layout and small process helpers. Source, do not run.
if [ $# -ne 1 ]; then
    echo "usage: $0 STATE_DIR" >&2
    exit 2
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "$0: must run as root (the daemons and the jobs run as root on this test cluster)" >&2
    exit 2
fi
STATE=$(realpath -m "$1")
export SLURM_CONF="$STATE/etc/slurm.conf"
MYSQL_SOCKET="$STATE/mysql/mysqld.sock"
MARIADB_PID="$STATE/run/mariadb.pid"
MUNGE_PID="$STATE/munge/munged.pid"
DBD_PID="$STATE/run/slurmdbd.pid"
CTLD_PID="$STATE/run/slurmctld.pid"
SLURMD_PID="$STATE/run/slurmd.pid"

# alive PIDFILE: the process named in PIDFILE is running.
alive() {
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

# wait_until SECONDS WHAT COMMAND...: poll COMMAND every 0.5 s; fail naming WHAT after SECONDS.
wait_until() {
    local seconds=$1 what=$2
    shift 2
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        if [ $SECONDS -ge $deadline ]; then
            echo "timed out after ${seconds}s waiting for: $what" >&2
            return 1
        fi
        sleep 0.5
    done
}

# stop_pidfile PIDFILE NAME: SIGTERM the process, wait up to 20 s, then SIGKILL it.
stop_pidfile() {
    alive "$1" || return 0
    local pid
    pid=$(cat "$1")
    kill "$pid" 2>/dev/null || true
    if ! wait_until 20 "$2 (pid $pid) to exit" bash -c "! kill -0 $pid"; then
        kill -9 "$pid" 2>/dev/null || true
    fi
}
