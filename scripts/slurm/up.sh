#!/usr/bin/env bash
# Bring up a real single-node SLURM cluster from Debian packages: munged, mariadb, slurmdbd (so sacct
# works), slurmctld and slurmd, bound to 127.0.0.1, with every config, state, spool, log and pid file
# under STATE_DIR. Idempotent: installed packages and running daemons are left as they are.
#
#   scripts/slurm/up.sh STATE_DIR && . STATE_DIR/env.sh    # sets SLURM_CONF for sbatch, sinfo, sacct
#   scripts/slurm/down.sh STATE_DIR
#
# Environment (read on the first run, then kept in STATE_DIR/settings):
#   MOE_SLURM_PORT           first of 4 consecutive ports: slurmctld, slurmd, slurmdbd, mariadb (16817)
#   MOE_SLURM_REQUEUE_DELAY  seconds a requeued job stays PENDING before it restarts (10; SLURM's default 120)
#   MOE_SLURM_INSTALL=0      never call apt-get; fail if a package is missing
set -Eeuo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/common.sh"

PACKAGES=(slurm-wlm munge slurmdbd mariadb-server)
CLUSTER=moe

install_packages() {
    local missing=() pkg
    for pkg in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "${MOE_SLURM_INSTALL:-1}" = 0 ]; then
        echo "missing packages: ${missing[*]} (MOE_SLURM_INSTALL=0)" >&2
        return 1
    fi
    echo "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # A stale package index is the usual reason an install fails; refresh it once and retry.
    apt-get install -y -q "${missing[@]}" >"$STATE/log/apt.log" 2>&1 \
        || { apt-get update -q >>"$STATE/log/apt.log" 2>&1 && apt-get install -y -q "${missing[@]}" >>"$STATE/log/apt.log" 2>&1; } \
        || { tail -20 "$STATE/log/apt.log" >&2; return 1; }
}

write_settings() {
    [ -s "$STATE/settings" ] && return 0
    local base=${MOE_SLURM_PORT:-16817}
    cat >"$STATE/settings" <<SETTINGS
CTLD_PORT=$base
SLURMD_PORT=$((base + 1))
DBD_PORT=$((base + 2))
DB_PORT=$((base + 3))
REQUEUE_DELAY=${MOE_SLURM_REQUEUE_DELAY:-10}
DB_PASSWORD=$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')
SETTINGS
    chmod 600 "$STATE/settings"
}

# render TEMPLATE OUTPUT: fill the @NAME@ placeholders of a config template.
render() {
    sed -e "s|@STATE@|$STATE|g" -e "s|@CLUSTER@|$CLUSTER|g" \
        -e "s|@CTLD_PORT@|$CTLD_PORT|g" -e "s|@SLURMD_PORT@|$SLURMD_PORT|g" \
        -e "s|@DBD_PORT@|$DBD_PORT|g" -e "s|@DB_PORT@|$DB_PORT|g" \
        -e "s|@DB_PASSWORD@|$DB_PASSWORD|g" -e "s|@REQUEUE_DELAY@|$REQUEUE_DELAY|g" \
        -e "s|@CPUS@|$CPUS|g" -e "s|@MEMORY_MB@|$MEMORY_MB|g" -e "s|@DEF_MEM_PER_CPU@|$DEF_MEM_PER_CPU|g" \
        "$1" >"$2"
}

write_configs() {
    CPUS=$(nproc)
    # Declare 90% of what slurmd measures: a node that claims more memory than it has is drained.
    local measured
    measured=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
    MEMORY_MB=$((measured * 9 / 10))
    DEF_MEM_PER_CPU=$((MEMORY_MB / CPUS < 2048 ? MEMORY_MB / CPUS : 2048))
    render "$HERE/slurm.conf.in" "$STATE/etc/slurm.conf"
    (umask 077 && render "$HERE/slurmdbd.conf.in" "$STATE/etc/slurmdbd.conf")
    cat >"$STATE/env.sh" <<ENV
# Source this to use the test cluster: sbatch, squeue, sinfo, sacct and submitit read SLURM_CONF.
export SLURM_CONF=$SLURM_CONF
ENV
}

start_munge() {
    alive "$MUNGE_PID" && return 0
    local dir="$STATE/munge"
    [ -s "$dir/munge.key" ] || dd if=/dev/urandom of="$dir/munge.key" bs=1024 count=1 status=none
    chmod 600 "$dir/munge.key"
    chmod 755 "$dir"
    local args=(--socket="$dir/munge.socket" --key-file="$dir/munge.key" --log-file="$dir/munged.log"
        --pid-file="$MUNGE_PID" --seed-file="$dir/munged.seed")
    chown -R munge:munge "$dir"
    if runuser -u munge -- test -r "$dir/munge.key"; then
        runuser -u munge -- munged "${args[@]}"
    else
        # The munge user cannot reach STATE_DIR (e.g. under a private tmp dir): run as root, and --force
        # past munged's check that every parent of the socket is world-searchable.
        chown -R root:root "$dir"
        munged --force "${args[@]}"
    fi
    wait_until 10 "munged" munge -S "$dir/munge.socket" -n
}

start_mariadb() {
    local data="$STATE/mysql/data" tmp="$STATE/mysql/tmp"
    # a tmpdir of its own: in the shared /tmp a stale #sql-temptable-<pid>-... of an earlier server with
    # the same pid made the install fail ("Could not remove temporary table")
    mkdir -p "$tmp"
    if [ ! -d "$data/mysql" ]; then
        mariadb-install-db --no-defaults --datadir="$data" --tmpdir="$tmp" --user=root --skip-test-db \
            --auth-root-authentication-method=socket >"$STATE/log/mariadb-install.log" 2>&1
    fi
    if ! alive "$MARIADB_PID"; then
        setsid mariadbd --no-defaults --datadir="$data" --tmpdir="$tmp" --user=root --socket="$MYSQL_SOCKET" \
            --port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve --pid-file="$MARIADB_PID" \
            --log-error="$STATE/log/mariadb.log" --innodb-buffer-pool-size=128M \
            --innodb-lock-wait-timeout=900 </dev/null >/dev/null 2>&1 &
        wait_until 60 "mariadb" mariadb-admin --no-defaults --socket="$MYSQL_SOCKET" ping
    fi
    mariadb --no-defaults --socket="$MYSQL_SOCKET" -u root <<SQL
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASSWORD';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
SQL
}

start_slurm() {
    if ! alive "$DBD_PID"; then
        slurmdbd
        wait_until 60 "slurmdbd" sacctmgr -n list cluster
    fi
    sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
    if ! alive "$CTLD_PID"; then
        slurmctld
        wait_until 60 "slurmctld" scontrol ping
    fi
    # The machine's host name is not "localhost", so name the node explicitly.
    alive "$SLURMD_PID" || slurmd -N localhost
    wait_until 60 "node localhost to be idle" bash -c 'sinfo -h -N -n localhost -o %T | grep -qx idle'
    wait_until 60 "sacct" sacct -n -X
}

on_error() {
    echo "up.sh failed; log tails from $STATE/log:" >&2
    for f in "$STATE"/log/*.log "$STATE"/munge/munged.log; do
        [ -f "$f" ] && { echo "== $f" >&2; tail -5 "$f" >&2; }
    done
}
trap on_error ERR

mkdir -p "$STATE"/{etc,run,log,spool/ctld,spool/slurmd,munge,mysql}
install_packages
write_settings
. "$STATE/settings"
write_configs
start_munge
start_mariadb
start_slurm
echo "SLURM cluster '$CLUSTER' is up: $(sinfo -h -o '%P %D %c cpus %m MB %T'). Use it with: . $STATE/env.sh"
