#!/usr/bin/env bash
# `stateshift bench` with the target's files on a disk of their own (docs/benchmarks.md,
# stop 33): ext4 on a loop device backed by a file in /dev/shm, mounted where the bench
# puts its target. The source, the writer's server, keeps this machine's disk, now shared
# with nothing the migration writes; as on two VMs, whose disks are two. It separates
# what the one-machine bench adds to the writer's tail (the target's import going to the
# source's disk: its writeback and the file system's journal) from what the migration
# costs the source itself. The target's disk is RAM, faster than any VM's: read the
# source's figures (the dump, while the writer writes the source), not the target's.
# As root (losetup, mount); needs RAM for the target's data (100M points: ~5 GB).
# Arguments go to `stateshift bench`; do not pass --dir (the target is mounted in
# /tmp/stateshift-bench). STATESHIFT_BIN (default target/release/stateshift),
# TARGET_DISK_SIZE (default 12G, sparse).
set -euo pipefail
BIN=${STATESHIFT_BIN:-target/release/stateshift}
DIR=/tmp/stateshift-bench
SIZE=${TARGET_DISK_SIZE:-12G}
[ "$(id -u)" = 0 ] || { echo "bench-two-disks: run as root (losetup, mount)" >&2; exit 2; }
for a in "$@"; do
  case "$a" in --dir|--dir=*) echo "bench-two-disks: --dir is $DIR here" >&2; exit 2 ;; esac
done
mountpoint -q "$DIR/target" && { echo "bench-two-disks: $DIR/target is mounted already" >&2; exit 2; }
img=$(mktemp /dev/shm/stateshift-target-disk.XXXXXX)
dev=
cleanup() {
  umount "$DIR/target" 2>/dev/null || true
  [ -z "$dev" ] || losetup -d "$dev" 2>/dev/null || true
  rm -f "$img"
}
trap cleanup EXIT
truncate -s "$SIZE" "$img"
dev=$(losetup --find --show "$img")
mkfs.ext4 -q -F "$dev"
rm -rf "$DIR/target"
mkdir -p "$DIR/target"
mount "$dev" "$DIR/target"
echo "bench-two-disks: the target's files on $dev (ext4 on $img, RAM); the source's on $(findmnt -n -o SOURCE -T "$DIR")"
"$BIN" bench --dir "$DIR" "$@"
