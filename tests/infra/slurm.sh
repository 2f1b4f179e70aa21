#!/usr/bin/env bash
# Single-node Slurm 22.05 cluster for greenstack's Slurm tests (launcher=slurm), from Debian 12 packages, without systemd.
# Tested as root in a 2-core microVM (no systemd, cgroup v1 hybrid, no cgroup delegation).
# Idempotent: safe to run repeatedly (CI-friendly). Re-running stops the daemons it
# started before (by the PID in their pid files, never by name) and starts them fresh.
#
#   bash tests/infra/slurm.sh          # install (if needed) + configure + start + wait until node idle
#   bash tests/infra/slurm.sh stop     # stop slurmd/slurmctld/slurmdbd/mariadbd/munged by PID
#   bash tests/infra/slurm.sh status
#
# Env knobs:
#   SLURM_ACCOUNTING=slurmdbd (default) -> MariaDB + slurmdbd: real `sacct` (submitit polls sacct)
#   SLURM_ACCOUNTING=none               -> no DB; plain `sacct` fails, `sacct -c` reads the
#                                          jobcomp/filetxt log (finished jobs only)
#   SLURM_CLUSTER_NAME (default greenstack)
#   SLURM_CLEAN_STATE=1 (default)       -> forget jobs of a previous run: wipe slurmctld state AND
#                                          drop the accounting DB (job ids restart at 1). Wiping only one
#                                          of them (e.g. `slurmctld -c` with an old DB) mangles old records.
#   SLURM_CLEAN_STATE=0                 -> keep both (jobs/ids/accounting survive a restart)
set -euo pipefail

CLUSTER=${SLURM_CLUSTER_NAME:-greenstack}
CLEAN_STATE=${SLURM_CLEAN_STATE:-1}
ACCOUNTING=${SLURM_ACCOUNTING:-slurmdbd}
JOBCOMP_LOG=/var/log/slurm/jobcomp.log
CONF=/etc/slurm/slurm.conf
DBD_CONF=/etc/slurm/slurmdbd.conf
MUNGE_PID=/run/munge/munged.pid
MARIADB_PID=/run/mysqld/mysqld.pid
DBD_PID=/run/slurm/slurmdbd.pid
CTLD_PID=/run/slurm/slurmctld.pid
SLURMD_PID=/run/slurm/slurmd.pid

log() { echo "[slurm-setup $(date +%H:%M:%S)] $*" >&2; }
[ "$(id -u)" -eq 0 ] || { echo "run as root" >&2; exit 1; }

# --- stop a daemon by the PID in its pid file (never by name) ----------------
# alive = exists and is not a zombie (PID 1 in containers/microVMs may reap orphans late,
# and `kill -0` succeeds on a zombie)
alive() { local st; st=$(sed -n 's/^.*) \(.\).*/\1/p' "/proc/$1/stat" 2>/dev/null) || return 1; [ -n "$st" ] && [ "$st" != Z ]; }

stop_pidfile() {
  local f=$1 name=$2 pid
  [ -s "$f" ] || return 0
  pid=$(cat "$f")
  if [ -n "$pid" ] && alive "$pid"; then
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 150); do alive "$pid" || break; sleep 0.1; done
    if alive "$pid"; then log "$name still alive after 15s, SIGKILL"; kill -KILL "$pid" || true; fi
  fi
  rm -f "$f"
}

stop_all() {
  stop_pidfile "$SLURMD_PID" slurmd
  stop_pidfile "$CTLD_PID" slurmctld
  stop_pidfile "$DBD_PID" slurmdbd
  stop_pidfile "$MARIADB_PID" mariadbd
  stop_pidfile "$MUNGE_PID" munged
}

status_all() {
  local f
  for f in "$MUNGE_PID" "$MARIADB_PID" "$DBD_PID" "$CTLD_PID" "$SLURMD_PID"; do
    if [ -s "$f" ] && alive "$(cat "$f")"; then echo "$f: running pid $(cat "$f")"; else echo "$f: not running"; fi
  done
  sinfo 2>/dev/null || true
}

case "${1:-start}" in
  stop) stop_all; exit 0 ;;
  status) status_all; exit 0 ;;
  start) ;;
  *) echo "usage: $0 [start|stop|status]" >&2; exit 2 ;;
esac

T0=$(date +%s.%N)
# --- 1. install (Debian bookworm: slurm-wlm 22.05.8, munge 0.5.15, mariadb 10.11) ----
PKGS=()
for c in slurmctld slurmd sbatch munged; do command -v "$c" >/dev/null || { PKGS+=(slurm-wlm munge); break; }; done
if [ "$ACCOUNTING" = slurmdbd ]; then
  command -v slurmdbd >/dev/null || PKGS+=(slurmdbd)
  [ -x /usr/sbin/mariadbd ] || PKGS+=(mariadb-server)
fi
if [ ${#PKGS[@]} -gt 0 ]; then
  log "installing ${PKGS[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # postinst scripts try invoke-rc.d/systemctl; harmless without systemd
  apt-get install -y -qq --no-install-recommends "${PKGS[@]}" >/dev/null
fi
T1=$(date +%s.%N)

# Stop whatever a previous run of this script started (by PID) before reconfiguring.
stop_all

# --- 2. munge key + runtime dirs ------------------------------------------------
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then      # Debian's postinst normally creates it already
  log "creating munge key"
  mungekey --create --keyfile=/etc/munge/munge.key --force
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key

install -d -o slurm -g slurm -m 0755 /var/spool/slurmctld /var/log/slurm /run/slurm
install -d -o root -g root -m 0755 /var/spool/slurmd
if [ "$CLEAN_STATE" = 1 ]; then : >"$JOBCOMP_LOG"; else touch "$JOBCOMP_LOG"; fi   # job ids restart at 1
chown slurm:slurm "$JOBCOMP_LOG"

# --- 3. slurm.conf from `slurmd -C` ---------------------------------------------------
HOST=$(hostname -s)
getent hosts "$HOST" >/dev/null || echo "127.0.0.1 $HOST" >>/etc/hosts
# e.g. "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105"
NODELINE=$(slurmd -C | head -n1)
MEM=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$NODELINE")
# keep 5% back: if configured RealMemory > what slurmd measures, the node is DRAINED ("Low RealMemory")
NODELINE=$(sed "s/RealMemory=[0-9]*/RealMemory=$((MEM * 95 / 100))/" <<<"$NODELINE")
CPUS=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$NODELINE")

if [ "$ACCOUNTING" = slurmdbd ]; then
  ACCT_LINES="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819"
else
  ACCT_LINES="AccountingStorageType=accounting_storage/none"
fi

NEWCONF=$(mktemp)
cat >"$NEWCONF" <<EOF
# generated by greenstack tests/infra/slurm.sh
ClusterName=$CLUSTER
SlurmctldHost=$HOST
SlurmUser=slurm
AuthType=auth/munge
CredType=cred/munge
# requeued jobs (preemption, submitit checkpoint/requeue) wait cred_expire s before restarting (default 120)
AuthInfo=cred_expire=10
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmctldPort=6817
SlurmdPort=6818
# no systemd / no cgroup delegation in containers and microVMs: avoid cgroup plugins
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
$ACCT_LINES
# text job-completion log as well (\`sacct -c\` reads it in 22.05)
JobCompType=jobcomp/filetxt
JobCompLoc=$JOBCOMP_LOG
SchedulerType=sched/backfill
# CR_Core: memory is not a consumable resource, so --mem does not serialize jobs
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
MailProg=/bin/true
# fast turnaround for tests
SchedulerParameters=sched_interval=2,bf_interval=2
MessageTimeout=10
SlurmdTimeout=60
InactiveLimit=0
KillWait=10
MinJobAge=600
# preemption for tests: a job in partition "urgent" preempts (requeues) jobs in "debug";
# the victim first gets its own --signal (e.g. submitit's USR2) and GraceTime s to checkpoint
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
$NODELINE State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO PriorityTier=1 GraceTime=30
PartitionName=urgent Nodes=$HOST MaxTime=INFINITE State=UP OverSubscribe=NO PriorityTier=10 PreemptMode=OFF
EOF
install -m 0644 "$NEWCONF" "$CONF"; rm -f "$NEWCONF"

# --- 4. start daemons directly (no systemd) ------------------------------------------
log "starting munged"
runuser -u munge -- /usr/sbin/munged --pid-file="$MUNGE_PID"    # forks; refuses root-owned key
for _ in $(seq 1 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
munge -n | unmunge >/dev/null || { log "munge not working"; exit 1; }

if [ "$ACCOUNTING" = slurmdbd ]; then
  log "starting mariadbd"
  install -d -o mysql -g root -m 0755 /run/mysqld
  # mariadbd does not daemonize itself: setsid + background, PID comes from --pid-file
  setsid /usr/sbin/mariadbd --user=mysql --pid-file="$MARIADB_PID" --bind-address=127.0.0.1 \
      >>/var/log/slurm/mariadbd.console 2>&1 </dev/null &
  for _ in $(seq 1 150); do mariadb-admin ping >/dev/null 2>&1 && break; sleep 0.2; done
  mariadb-admin ping >/dev/null || { log "mariadb did not come up"; tail -n 30 /var/log/slurm/mariadbd.console; exit 1; }
  for _ in $(seq 1 50); do [ -s "$MARIADB_PID" ] && break; sleep 0.1; done
  if [ "$CLEAN_STATE" = 1 ]; then mariadb -e "DROP DATABASE IF EXISTS slurm_acct_db;"; fi
  mariadb -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmpw';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
  cat >"$DBD_CONF" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=slurm
DebugLevel=info
LogFile=/var/log/slurm/slurmdbd.log
PidFile=$DBD_PID
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=slurm_acct_db
StorageUser=slurm
StoragePass=slurmpw
EOF
  chown slurm:slurm "$DBD_CONF"; chmod 600 "$DBD_CONF"   # slurmdbd refuses a world-readable conf
  log "starting slurmdbd"
  /usr/sbin/slurmdbd                                     # forks
  for _ in $(seq 1 150); do sacctmgr -n show cluster >/dev/null 2>&1 && break; sleep 0.2; done
  sacctmgr -n show cluster >/dev/null || { log "slurmdbd did not come up"; tail -n 30 /var/log/slurm/slurmdbd.log; exit 1; }
  sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
fi

log "starting slurmctld"
if [ "$CLEAN_STATE" = 1 ]; then
  find /var/spool/slurmctld -mindepth 1 -delete
  /usr/sbin/slurmctld -c -i       # forks
else
  /usr/sbin/slurmctld -i          # forks; -i: tolerate unreadable state files
fi
for _ in $(seq 1 150); do scontrol ping 2>/dev/null | grep -q 'is UP' && break; sleep 0.2; done
scontrol ping | grep -q 'is UP' || { log "slurmctld did not come up"; tail -n 30 /var/log/slurm/slurmctld.log; exit 1; }

log "starting slurmd"
/usr/sbin/slurmd                                         # forks
st=""
for _ in $(seq 1 150); do
  st=$(sinfo -h -n "$HOST" -o '%T' 2>/dev/null || true)
  case "$st" in idle*|mixed*|allocated*) break ;; esac
  sleep 0.2
done
case "$st" in
  idle*|mixed*|allocated*) ;;
  *) log "node state '$st' -> scontrol update state=resume"; scontrol update nodename="$HOST" state=resume || true; sleep 1
     st=$(sinfo -h -n "$HOST" -o '%T'); case "$st" in idle*|mixed*|allocated*) ;; *) log "node not usable: $st"; scontrol show node "$HOST"; exit 1;; esac ;;
esac
sinfo
T2=$(date +%s.%N)
log "up (accounting=$ACCOUNTING): munged=$(cat $MUNGE_PID) slurmctld=$(cat $CTLD_PID) slurmd=$(cat $SLURMD_PID) cpus=$CPUS; install $(awk "BEGIN{printf \"%.1f\", $T1-$T0}")s, configure+start $(awk "BEGIN{printf \"%.1f\", $T2-$T1}")s"
