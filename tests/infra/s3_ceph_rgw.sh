#!/usr/bin/env bash
# A real S3 server for greenstack's durable-checkpoint tests (adapted from the team's infra notes): Debian's
# Ceph RADOS Gateway 16.2 on a throw-away single-node Ceph with a RAM-backed OSD.
# on a throw-away single-node Ceph: 1 mon + 1 memstore OSD (RAM-backed, 1 GiB cap),
# no mgr, auth none, messenger v1 only. S3 endpoint: http://127.0.0.1:7480
# access key "testkey" / secret "testsecret" (override with RGW_ACCESS_KEY / RGW_SECRET_KEY).
#
#   bash s3_ceph_rgw.sh         # install if needed, (re)create cluster, start, create S3 user
#   bash s3_ceph_rgw.sh stop    # stop daemons by PID file (never by name)
#
# All state lives under $CEPH_DIR (default /tmp/ceph-rgw); memstore => data is gone after stop.
set -euo pipefail
D=${CEPH_DIR:-/tmp/ceph-rgw}
CONF=$D/ceph.conf
PORT=${RGW_PORT:-7480}
AK=${RGW_ACCESS_KEY:-testkey}
SK=${RGW_SECRET_KEY:-testsecret}

alive() { local st; st=$(sed -n 's/^.*) \(.\).*/\1/p' "/proc/$1/stat" 2>/dev/null) || return 1; [ -n "$st" ] && [ "$st" != Z ]; }
stop() {
  local p pid
  for p in "$D"/run/client.rgw.a.pid "$D"/run/osd.0.pid "$D"/run/mon.a.pid; do
    [ -s "$p" ] || continue
    pid=$(cat "$p")
    if alive "$pid"; then
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 100); do alive "$pid" || break; sleep 0.1; done
      alive "$pid" && kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$p"
  done
}
if [ "${1:-start}" = stop ]; then stop; exit 0; fi
trap 'echo "s3_ceph_rgw.sh: failed at line $LINENO" >&2; tail -n 5 "$D"/log/*.log >&2 2>/dev/null || true' ERR

T0=$(date +%s.%N)
if ! command -v radosgw >/dev/null || ! command -v ceph-osd >/dev/null || ! command -v ceph-mon >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # ~61 MB download, 62 packages
  apt-get install -y -qq --no-install-recommends radosgw ceph-mon ceph-osd ceph-common >/dev/null
fi
T1=$(date +%s.%N)

stop
rm -rf "$D"; mkdir -p "$D"/run "$D"/log "$D"/mon/a "$D"/osd/0 "$D"/rgw
FSID=$(cat /proc/sys/kernel/random/uuid)
cat >"$CONF" <<CONF
[global]
fsid = $FSID
# msgr v1 only: with auth=none, radosgw's msgr2 handshake fails (get_initial_auth_request returned -13)
mon_host = v1:127.0.0.1:6789
ms_bind_msgr2 = false
ms_bind_ipv6 = false
# OSD ports default to 6800-7300, which contains Slurm's 6817-6819: keep clear of them
ms_bind_port_min = 7000
ms_bind_port_max = 7100
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
auth_cluster_required = none
auth_service_required = none
auth_client_required = none
osd_pool_default_size = 1
osd_pool_default_min_size = 1
mon_allow_pool_size_one = true
mon_warn_on_pool_no_redundancy = false
mon_data_avail_warn = 1
osd_crush_chooseleaf_type = 0
# rgw creates ~8 pools; default pg_num 32 would exceed mon_max_pg_per_osd (250) on one OSD
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
osd_objectstore = memstore
memstore_device_bytes = 1073741824
run_dir = $D/run
pid_file = $D/run/\$name.pid
admin_socket = $D/run/\$name.asok
log_file = $D/log/\$name.log
[mon.a]
mon_data = $D/mon/a
[osd.0]
osd_data = $D/osd/0
# with auth=none the OSD may send its start-up crush commands before it has the monmap
# (fsid 0000... -> 'wrong fsid', ceph-osd exits 250): skip them, add the OSD to crush by hand
osd_crush_update_on_start = false
osd_class_update_on_start = false
[client.rgw.a]
rgw_frontends = beast endpoint=127.0.0.1:$PORT
rgw_data = $D/rgw
CONF

ceph-authtool --create-keyring "$D/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
monmaptool --create --fsid "$FSID" --addv a '[v1:127.0.0.1:6789]' --clobber "$D/monmap" >/dev/null
ceph-mon -c "$CONF" --mkfs -i a --monmap "$D/monmap" --keyring "$D/mon.keyring"
ceph-mon -c "$CONF" -i a                                   # forks
OSD_UUID=$(cat /proc/sys/kernel/random/uuid)
ceph -c "$CONF" osd new "$OSD_UUID" >/dev/null
ceph-osd -c "$CONF" -i 0 --mkfs --osd-uuid "$OSD_UUID" >/dev/null 2>&1
HOST=$(hostname -s)
ceph -c "$CONF" osd crush add-bucket "$HOST" host >/dev/null 2>&1
ceph -c "$CONF" osd crush move "$HOST" root=default >/dev/null 2>&1
ceph -c "$CONF" osd crush add osd.0 1.0 host="$HOST" >/dev/null 2>&1
ceph-osd -c "$CONF" -i 0 2>/dev/null                       # forks
for _ in $(seq 150); do ceph -c "$CONF" osd stat 2>/dev/null | grep -q '1 up.*1 in' && break; sleep 0.2; done
ceph -c "$CONF" osd stat | grep -q '1 up.*1 in' || { echo "osd not up"; tail -20 "$D/log/osd.0.log"; exit 1; }
radosgw -c "$CONF" -n client.rgw.a                         # forks
for _ in $(seq 300); do curl -s -o /dev/null "http://127.0.0.1:$PORT/" && break; sleep 0.2; done
curl -s -o /dev/null "http://127.0.0.1:$PORT/" || { echo "rgw not up"; tail -20 "$D/log/client.rgw.a.log"; exit 1; }
radosgw-admin -c "$CONF" user create --uid=test --display-name=test --access-key="$AK" --secret-key="$SK" >/dev/null
T2=$(date +%s.%N)
echo "rgw up on http://127.0.0.1:$PORT (mon=$(cat $D/run/mon.a.pid) osd=$(cat $D/run/osd.0.pid) rgw=$(cat $D/run/client.rgw.a.pid)); install $(awk "BEGIN{printf \"%.1f\", $T1-$T0}")s, start $(awk "BEGIN{printf \"%.1f\", $T2-$T1}")s"
