#!/usr/bin/env bash
# Throwaway Slurm cluster on localhost, for tests/test_slurm.py: one node by default, or
# QML_SLURM_NODES nodes, each its own slurmd (`slurmd -N NAME`) on this one machine.
#
#   tests/slurm_cluster.sh start   # install slurm-wlm + munge if missing (root), start
#                                  # munged, slurmctld, slurmd(s); print the SLURM_CONF path
#   tests/slurm_cluster.sh stop    # cancel jobs, stop the daemons, remove the state dir
#   tests/slurm_cluster.sh status  # exit 0 if the cluster answers and every node is usable
#
# Everything (config, munge key and socket, spool, state, logs) lives under one state
# dir, $QML_SLURM_DIR (default /tmp/qml-slurm); the daemons use their own ports and munge
# socket, so a site Slurm is left alone. Nothing under /etc is written, except that with
# QML_SLURM_NODES>1 `start` appends "127.0.0.1 qmlnodeN" lines to /etc/hosts (as root) for
# node names that do not resolve yet; it never removes or edits other lines.
# Both subcommands are idempotent. Messages go to stderr; `start` prints only the
# SLURM_CONF path on stdout, so `export SLURM_CONF=$(tests/slurm_cluster.sh start)` works.
#
# Environment:
#   QML_SLURM_DIR        state dir (default /tmp/qml-slurm; keep it short: it holds a socket)
#   QML_SLURM_NODES      number of nodes (default 1: node "localhost"; N>1: nodes qmlnode1..qmlnodeN,
#                        all in partition "batch", each a slurmd with its own port, spool and log)
#   QML_SLURM_CPUS       CPUs each node advertises (default 8, whatever the machine has)
#   QML_SLURM_PORT       slurmctld port; the slurmd of node i uses port+i (default 16817); `start` stops
#                        at once, naming the port, when a program already listens on one of them
#   QML_SLURM_WAIT       seconds to wait for the nodes to turn idle (default 60)
#   QML_SLURM_KEEP=1     `stop` keeps the state dir (logs) instead of removing it
set -euo pipefail

DIR=${QML_SLURM_DIR:-/tmp/qml-slurm}
CPUS=${QML_SLURM_CPUS:-8}
CTLD_PORT=${QML_SLURM_PORT:-16817}
SLURMD_PORT=$((CTLD_PORT + 1))
WAIT=${QML_SLURM_WAIT:-60}
NNODES=${QML_SLURM_NODES:-1}
CONF="$DIR/slurm.conf"
MARKER="$DIR/.qml-slurm-cluster"
NODES_FILE="$DIR/nodes" # the node names the running cluster was started with, one a line
PATH="$PATH:/usr/sbin:/sbin:/usr/local/sbin"
export SLURM_CONF="$CONF"

log() { echo "slurm_cluster.sh: $*" >&2; }
die() {
    echo "slurm_cluster.sh: error: $*" >&2
    exit 1
}

# Print the last lines of each daemon log, to explain a failed start.
show_logs() {
    local f
    for f in "$DIR"/log/*.log; do
        [ -s "$f" ] || continue
        echo "---- tail of $f ----" >&2
        tail -n 15 "$f" >&2
    done
}

# The node names QML_SLURM_NODES asks for: "localhost" for one node (as before), else qmlnode1..N.
requested_nodes() {
    local i
    if [ "$NNODES" -eq 1 ]; then
        echo localhost
    else
        for ((i = 1; i <= NNODES; i++)); do echo "qmlnode$i"; done
    fi
}

# The node names of the cluster in $DIR (what `start` recorded), else the requested ones.
cluster_nodes() {
    if [ -s "$NODES_FILE" ]; then cat "$NODES_FILE"; else requested_nodes; fi
}

# The slurmd pidfile of a node: $DIR/slurmd.pid for the single node "localhost" (as before),
# $DIR/slurmd-<node>.pid for the qmlnodeN nodes (SlurmdPidFile=$DIR/slurmd-%n.pid).
slurmd_pidfile() { # node
    if [ "$1" = localhost ]; then echo "$DIR/slurmd.pid"; else echo "$DIR/slurmd-$1.pid"; fi
}

# The daemon of a pidfile ($DIR/<name>.pid or $DIR/<name>-<node>.pid) runs: the pid is alive and is
# still <name>, not a reused pid.
pid_alive() { # pidfile
    local pid name
    [ -s "$1" ] || return 1
    pid=$(cat "$1" 2>/dev/null) || return 1
    [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
    name=$(basename "$1" .pid)
    name=${name%%-*}
    [ "$(cat "/proc/$pid/comm" 2>/dev/null || ps -o comm= -p "$pid" 2>/dev/null)" = "$name" ]
}

# SIGTERM the daemons named by the pidfiles together, wait up to 10 s, then SIGKILL what is left.
kill_pidfiles() { # pidfile...
    local f pid i pids=() left
    for f in "$@"; do
        if pid_alive "$f"; then
            pid=$(cat "$f")
            pids+=("$pid")
            kill -TERM "$pid" 2>/dev/null || true
        fi
    done
    for ((i = 0; i < 100 && ${#pids[@]} > 0; i++)); do
        left=()
        for pid in "${pids[@]}"; do
            kill -0 "$pid" 2>/dev/null && left+=("$pid")
        done
        pids=("${left[@]}")
        [ ${#pids[@]} -gt 0 ] && sleep 0.1
    done
    for pid in "${pids[@]}"; do
        log "pid $pid ignored SIGTERM for 10 s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    done
    rm -f "$@"
}

# Whether a program listens on TCP port $1 of this machine (any address, IPv4 or IPv6), as /proc lists it.
port_in_use() { # port
    local hex tables=() t
    hex=$(printf '%04X' "$1")
    for t in /proc/net/tcp /proc/net/tcp6; do
        [ -r "$t" ] && tables+=("$t")
    done
    [ ${#tables[@]} -gt 0 ] || return 1 # no /proc: let the daemons find out
    # $2: local address:port in hex; $4: state, 0A = LISTEN
    awk -v port="$hex" 'FNR > 1 { n = split($2, a, ":"); if (a[n] == port && $4 == "0A") found = 1 }
        END { exit !found }' "${tables[@]}"
}

node_state() { # node
    timeout 10 sinfo -h -N -n "$1" -o %t 2>/dev/null | head -n1 || true
}

# The qmlnodeN names must resolve to 127.0.0.1 on this machine (jobs use them, e.g. for MASTER_ADDR):
# append "127.0.0.1 <name>" to /etc/hosts for each one that does not resolve at all; never touch
# other lines. A name that resolves elsewhere is an error.
ensure_hosts() { # node...
    local n addrs missing=()
    for n in "$@"; do
        [ "$n" = localhost ] && continue
        addrs=$(getent ahostsv4 "$n" 2>/dev/null | awk '{print $1}' | sort -u | tr '\n' ' ') || true
        if [ -z "$addrs" ]; then
            missing+=("$n")
        elif [ "$addrs" != "127.0.0.1 " ]; then
            die "node name $n resolves to ${addrs% } on this machine, not 127.0.0.1; fix /etc/hosts or DNS"
        fi
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$(id -u)" -eq 0 ] && [ -w /etc/hosts ] ||
        die "node names ${missing[*]} do not resolve; as root add them to /etc/hosts:" \
            "echo '127.0.0.1 ${missing[*]}' >> /etc/hosts"
    log "adding '127.0.0.1 ${missing[*]}' to /etc/hosts"
    # A file without a final newline would glue the new line to its last one.
    [ -s /etc/hosts ] && [ -n "$(tail -c1 /etc/hosts)" ] && echo >>/etc/hosts
    for n in "${missing[@]}"; do
        printf '127.0.0.1\t%s\t# added by tests/slurm_cluster.sh\n' "$n" >>/etc/hosts
    done
    for n in "${missing[@]}"; do
        getent hosts "$n" >/dev/null 2>&1 || die "$n still does not resolve after adding it to /etc/hosts"
    done
}

install_packages() {
    local missing=() b sudo=() apt=(env DEBIAN_FRONTEND=noninteractive apt-get -qq)
    for b in slurmctld slurmd munged sbatch srun sinfo scontrol; do
        command -v "$b" >/dev/null 2>&1 || missing+=("$b")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        { command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; } ||
            die "Slurm is not installed (missing: ${missing[*]}) and installing it needs root" \
                "(or password-less sudo): run 'apt-get install slurm-wlm munge' as root first"
        sudo=(sudo -n)
    fi
    command -v apt-get >/dev/null 2>&1 ||
        die "Slurm is not installed (missing: ${missing[*]}) and there is no apt-get to install it with"
    log "installing slurm-wlm and munge with apt-get (missing: ${missing[*]})"
    "${sudo[@]}" "${apt[@]}" update >&2 || die "apt-get update failed"
    "${sudo[@]}" "${apt[@]}" install -y --no-install-recommends slurm-wlm munge >&2 ||
        die "apt-get install slurm-wlm munge failed"
    for b in slurmctld slurmd munged sbatch; do
        command -v "$b" >/dev/null 2>&1 || die "$b still missing after installing slurm-wlm and munge"
    done
}

write_config() { # node...
    local user n i=0 nodelines="" spool="$DIR/spool" pidfile="$DIR/slurmd.pid" logfile="$DIR/log/slurmd.log"
    user=$(id -un)
    mkdir -p "$DIR"/{munge,state,spool,log}
    if [ $# -gt 1 ] || [ "$1" != localhost ]; then
        # Several slurmds on one host: each needs its own port, spool dir, pidfile and log (%n = node name).
        spool="$DIR/spool/%n" pidfile="$DIR/slurmd-%n.pid" logfile="$DIR/log/slurmd-%n.log"
        for n in "$@"; do
            i=$((i + 1))
            mkdir -p "$DIR/spool/$n"
            nodelines+="NodeName=$n NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((CTLD_PORT + i)) CPUs=$CPUS State=UNKNOWN"$'\n'
        done
    else
        nodelines="NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN"$'\n'
    fi
    printf '%s\n' "$@" >"$NODES_FILE"
    chmod 755 "$DIR" "$DIR/munge"
    touch "$MARKER"
    if [ ! -s "$DIR/munge/munge.key" ]; then
        if command -v mungekey >/dev/null 2>&1; then
            mungekey --create --keyfile="$DIR/munge/munge.key" --force >&2
        else
            dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
        fi
    fi
    chmod 600 "$DIR/munge/munge.key"
    cat >"$CONF" <<EOF
# Written by tests/slurm_cluster.sh: a test cluster of $# node(s) on localhost.
ClusterName=qmltest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket.2
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$pidfile
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$logfile
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig=$DIR/plugstack.conf
# Let the node advertise more CPUs than the machine has (8 GPU-less "cores" on a 2-core CI box).
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
SwitchType=switch/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
InactiveLimit=0
KillWait=5
MinJobAge=300
SlurmdTimeout=60
SlurmctldTimeout=60
${nodelines%$'\n'}
PartitionName=batch Nodes=$(IFS=,; echo "$*") Default=YES MaxTime=INFINITE State=UP
EOF
    : >"$DIR/plugstack.conf"
}

# Succeeds when munged, slurmctld and every node's slurmd run and every node takes jobs;
# otherwise prints why.
unhealthy_reason() {
    local d n state nodes=()
    mapfile -t nodes < <(cluster_nodes)
    for d in munged slurmctld; do
        pid_alive "$DIR/$d.pid" || { echo "$d is not running"; return 0; }
    done
    for n in "${nodes[@]}"; do
        pid_alive "$(slurmd_pidfile "$n")" || { echo "slurmd of node $n is not running"; return 0; }
    done
    for n in "${nodes[@]}"; do
        state=$(node_state "$n")
        [[ "$state" =~ ^(idle|mix|alloc|comp) ]] || { echo "node $n is '${state:-unknown}'"; return 0; }
    done
    return 1
}

on_failed_start() {
    local rc=$?
    [ "$rc" -eq 0 ] && return 0
    cmd_stop_daemons
    log "start failed; logs kept in $DIR/log (remove them with: $0 stop)"
    exit "$rc"
}

cmd_start() {
    [[ "$CPUS" =~ ^[1-9][0-9]*$ ]] || die "QML_SLURM_CPUS must be a positive integer, not '$CPUS'"
    [[ "$CTLD_PORT" =~ ^[1-9][0-9]*$ ]] || die "QML_SLURM_PORT must be a port number, not '$CTLD_PORT'"
    [[ "$NNODES" =~ ^[1-9][0-9]*$ ]] && [ "$NNODES" -le 64 ] ||
        die "QML_SLURM_NODES must be a node count from 1 to 64, not '$NNODES'"
    [ $((CTLD_PORT + NNODES)) -le 65535 ] || die "QML_SLURM_PORT $CTLD_PORT leaves no room for $NNODES slurmd port(s)"
    [ ${#DIR} -le 80 ] || die "QML_SLURM_DIR '$DIR' is too long for a unix socket path (keep it under 80 characters)"
    local nodes=()
    mapfile -t nodes < <(requested_nodes)
    if [ -f "$MARKER" ] && ! unhealthy_reason >/dev/null; then
        [ "$(cluster_nodes)" = "$(requested_nodes)" ] ||
            die "the cluster in $DIR runs node(s) $(cluster_nodes | paste -sd, -), not ${nodes[*]}" \
                "(QML_SLURM_NODES=$NNODES); run '$0 stop' first or use another QML_SLURM_DIR"
        log "cluster already running (state dir $DIR)"
        echo "$CONF"
        return 0
    fi
    if [ -e "$DIR" ] && [ ! -f "$MARKER" ] && [ -n "$(ls -A "$DIR" 2>/dev/null)" ]; then
        die "state dir $DIR exists, is not empty and was not made by this script; set QML_SLURM_DIR to another path"
    fi
    install_packages
    ensure_hosts "${nodes[@]}"
    cmd_stop_daemons # leftovers from a half-started earlier run
    local p
    for ((p = CTLD_PORT; p <= CTLD_PORT + NNODES; p++)); do # slurmctld's, then each slurmd's
        ! port_in_use "$p" ||
            die "port $p (slurmctld uses QML_SLURM_PORT=$CTLD_PORT, the slurmds the next $NNODES) is in use by" \
                "another program; choose another QML_SLURM_PORT"
    done
    write_config "${nodes[@]}"
    # A failed start stops whatever it did start; the logs stay in $DIR/log.
    trap on_failed_start EXIT

    log "starting munged"
    munged --force --socket="$DIR/munge/munge.socket.2" --key-file="$DIR/munge/munge.key" \
        --pid-file="$DIR/munged.pid" --log-file="$DIR/log/munged.log" \
        --seed-file="$DIR/munge/munged.seed" >&2 ||
        { show_logs; die "munged did not start"; }
    local i
    for ((i = 0; i < 50; i++)); do
        [ -S "$DIR/munge/munge.socket.2" ] && break
        sleep 0.1
    done
    if command -v munge >/dev/null 2>&1; then
        munge -n -S "$DIR/munge/munge.socket.2" | unmunge -S "$DIR/munge/munge.socket.2" >/dev/null 2>&1 ||
            { show_logs; die "munge round trip through $DIR/munge/munge.socket.2 failed"; }
    fi

    log "starting slurmctld (port $CTLD_PORT)"
    slurmctld -c -f "$CONF" >&2 || { show_logs; die "slurmctld did not start"; }
    for ((i = 0; i < 10 * WAIT; i++)); do
        timeout 5 scontrol ping 2>/dev/null | grep -q UP && break
        pid_alive "$DIR/slurmctld.pid" || [ $i -lt 20 ] || { show_logs; die "slurmctld exited"; }
        sleep 0.1
    done
    local n port=$SLURMD_PORT
    for n in "${nodes[@]}"; do
        log "starting slurmd (node $n, $CPUS CPUs, port $port)"
        slurmd -f "$CONF" -N "$n" >&2 || { show_logs; die "slurmd of node $n did not start"; }
        port=$((port + 1))
    done

    local state="" idle=0 t0=$SECONDS
    while :; do
        idle=0
        for n in "${nodes[@]}"; do
            state=$(node_state "$n")
            [ "$state" = idle ] || break
            idle=$((idle + 1))
        done
        [ "$idle" -eq ${#nodes[@]} ] && break
        [ $((SECONDS - t0)) -lt "$WAIT" ] || break
        sleep 1
    done
    if [ "$idle" -ne ${#nodes[@]} ]; then
        show_logs
        timeout 10 scontrol show node "$n" >&2 || true
        die "node $n is '${state:-unknown}', not idle, after ${WAIT}s; logs are in $DIR/log"
    fi
    trap - EXIT
    log "cluster up: partition batch, node(s) ${nodes[*]} with $CPUS CPUs each; export SLURM_CONF=$CONF"
    echo "$CONF"
}

cmd_stop_daemons() {
    if pid_alive "$DIR/slurmctld.pid"; then
        # Cancel what is still queued or running, so no job step outlives its slurmd.
        local i jobs=()
        mapfile -t jobs < <(timeout 10 squeue -h -o %i 2>/dev/null || true)
        if [ ${#jobs[@]} -gt 0 ]; then
            log "cancelling remaining jobs: ${jobs[*]}"
            timeout 10 scancel --quiet "${jobs[@]}" 2>/dev/null || true
            for ((i = 0; i < 30; i++)); do
                [ -z "$(timeout 5 squeue -h -o %i 2>/dev/null)" ] && break
                sleep 0.5
            done
        fi
    fi
    # Every slurmd this state dir has (slurmd.pid or slurmd-<node>.pid), whatever QML_SLURM_NODES says now.
    local slurmds=()
    mapfile -t slurmds < <(compgen -G "$DIR/slurmd*.pid" || true)
    kill_pidfiles "${slurmds[@]}" "$DIR/slurmctld.pid"
    kill_pidfiles "$DIR/munged.pid"
}

cmd_stop() {
    if [ ! -e "$DIR" ]; then
        log "nothing to stop ($DIR does not exist)"
        return 0
    fi
    [ -f "$MARKER" ] || die "$DIR was not made by this script; refusing to touch it"
    cmd_stop_daemons
    if [ "${QML_SLURM_KEEP:-0}" = 1 ]; then
        log "daemons stopped; state and logs kept in $DIR"
    else
        rm -rf -- "$DIR"
        log "daemons stopped; $DIR removed"
    fi
}

cmd_status() {
    [ -f "$MARKER" ] || die "no cluster state in $DIR"
    local why
    if why=$(unhealthy_reason); then
        die "cluster in $DIR is not usable: $why"
    fi
    echo "$CONF"
}

case "${1:-}" in
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
*)
    echo "usage: $0 start|stop|status   (state dir: \$QML_SLURM_DIR, default /tmp/qml-slurm)" >&2
    exit 2
    ;;
esac
