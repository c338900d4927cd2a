#!/usr/bin/env bash
# A single-node Slurm on this machine, for `mo-align sweep` with `backend = "slurm"` and its
# test (tests/sweep.rs): Debian's slurm-wlm and munge, no cgroups (ProctrackType=
# proctrack/linuxproc, TaskPlugin=task/none), no accounting database, one node `localhost`
# with the machine's CPUs in partition `debug`. Run as root; running it again changes
# nothing that is already in place (packages, munge key, config, running daemons).
#   sudo scripts/slurm-local.sh        then: sinfo; squeue
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
    echo "slurm-local.sh: run as root (it installs packages and starts daemons)" >&2
    exit 2
fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurm-wlm munge >/dev/null
fi

# munge: a key readable by the munge user only, and its daemon.
if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
if ! pidof munged >/dev/null; then
    runuser -u munge -- munged
fi

cpus=$(nproc)
mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
conf_dir=/etc/slurm
mkdir -p "$conf_dir" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
header="# Written by mo-align's scripts/slurm-local.sh: one node, no cgroups, no accounting."
conf=$(cat <<EOF
$header
ClusterName=moalign
SlurmctldHost=localhost
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
)
# A slurm.conf this script did not write (its first line says who did) is a cluster's own:
# never replaced.
if [ -e "$conf_dir/slurm.conf" ] && [ "$(head -n 1 "$conf_dir/slurm.conf")" != "$header" ]; then
    echo "slurm-local.sh: $conf_dir/slurm.conf exists and was not written by this script; not replacing it (move it aside to use this script)" >&2
    exit 2
fi
if [ ! -f "$conf_dir/slurm.conf" ] || [ "$(cat "$conf_dir/slurm.conf")" != "$conf" ]; then
    # Written aside and renamed: slurmctld never reads half a config.
    printf '%s\n' "$conf" > "$conf_dir/.slurm.conf.tmp-$$"
    mv -f "$conf_dir/.slurm.conf.tmp-$$" "$conf_dir/slurm.conf"
    changed=1
fi

if ! pidof slurmctld >/dev/null; then
    slurmctld
elif [ "${changed:-0}" = 1 ]; then
    scontrol reconfigure
fi
if ! pidof slurmd >/dev/null; then
    slurmd -N localhost
fi

# Wait for the node to come up (at most 30 s), and show it.
for _ in $(seq 30); do
    if sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
        break
    fi
    sleep 1
done
sinfo
