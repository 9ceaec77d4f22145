#!/usr/bin/env bash
# A one-node Slurm cluster on this Debian machine, to test `srun lmforge train` (tests/dist/
# test_srun.cpp, which skips where `sinfo` finds no cluster). Needs root; idempotent.
#   sudo scripts/slurm-local.sh && (cd build && ctest -R Srun --output-on-failure)
# Installs slurm-wlm and munge, writes /etc/slurm/slurm.conf (one node: this host, its cores,
# oversubscription allowed for srun -O), starts munged, slurmctld and slurmd.
set -euo pipefail
[[ $(id -u) -eq 0 ]] || { echo "slurm-local: run as root (sudo)" >&2; exit 1; }
for p in slurm-wlm munge; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge
done
host=$(hostname -s)
cpus=$(nproc)
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 8 / 10 ))
# The controller's state lives in a directory of its own, emptied on each set-up.
state=/var/spool/slurmctld-lmforge
rm -rf "$state"
mkdir -p /etc/slurm /var/spool/slurmd "$state" /var/log/slurm /run/munge
cat >/etc/slurm/slurm.conf <<CONF
ClusterName=lmforge-local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$state
SlurmdSpoolDir=/var/spool/slurmd
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=pmix
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$host CPUs=$cpus Sockets=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:8
CONF
[[ -s /etc/munge/munge.key ]] || /usr/sbin/mungekey --create
chown munge:munge /etc/munge/munge.key /run/munge
chmod 400 /etc/munge/munge.key
pgrep -x munged >/dev/null || su -s /bin/sh munge -c /usr/sbin/munged
# Restart the daemons so they read this configuration.
scontrol shutdown >/dev/null 2>&1 || true
pkill -x slurmd || true
sleep 2
slurmctld
slurmd
for _ in $(seq 20); do
  sinfo -h -o %T 2>/dev/null | grep -qE "idle|mixed|alloc" && break
  scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
  sleep 1
done
sinfo
