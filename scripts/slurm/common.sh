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
MARIADB_PID="$STATE/run/mariadbd.pid"
MUNGE_PID="$STATE/munge/munged.pid"
DBD_PID="$STATE/run/slurmdbd.pid"
CTLD_PID="$STATE/run/slurmctld.pid"
SLURMD_PID="$STATE/run/slurmd.pid"

# pid_of PIDFILE: print the pid if that process is running and is the daemon the file is named after
# (munged.pid -> munged), so a stale file whose pid was reused by another process never matches.
pid_of() {
    local pid
    pid=$(cat "$1" 2>/dev/null) || return 1
    [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$(basename "$1" .pid)" ] && echo "$pid"
}

alive() {
    pid_of "$1" >/dev/null
}

# wait_until SECONDS WHAT COMMAND...: poll COMMAND every 0.2 s; fail naming WHAT after SECONDS.
wait_until() {
    local seconds=$1 what=$2
    shift 2
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        if [ $SECONDS -ge $deadline ]; then
            echo "timed out after ${seconds}s waiting for: $what" >&2
            return 1
        fi
        sleep 0.2
    done
}

# stop PIDFILE...: SIGTERM the processes named in the pid files, wait up to 20 s, then SIGKILL them.
stop() {
    local pids=() file pid
    for file in "$@"; do
        if pid=$(pid_of "$file"); then pids+=("$pid"); fi
    done
    [ ${#pids[@]} -eq 0 ] && return 0
    kill "${pids[@]}" 2>/dev/null || true
    for pid in "${pids[@]}"; do
        wait_until 20 "pid $pid to exit" bash -c "! kill -0 $pid" || kill -9 "$pid" 2>/dev/null || true
    done
}
