#!/usr/bin/env bash
# Reserve huge pages and mount hugetlbfs for vhostmem's huge page scenarios. Root only.
#
#   hugepages/setup.sh [--size 2M|1G] [--pages N] [--mount DIR] [--save FILE]
#   hugepages/setup.sh --restore FILE
#
#   --size 2M|1G   page size to act on (default 2M)
#   --pages N      set that size's pool (nr_hugepages) to N pages; fails if the kernel grants
#                  fewer (memory too fragmented), saying how many it got
#   --mount DIR    mount hugetlbfs (pagesize = --size) at DIR unless a hugetlbfs is there already
#   --save FILE    before changing anything, record the previous pool size (and whether DIR was
#                  mounted by us) in FILE; an existing FILE is kept, so rerunning never loses
#                  the original value
#   --restore FILE put back what FILE recorded (pool size, unmount what we mounted), delete FILE
#
# Idempotent: it prints one line per thing it checked, saying "ok" or what it changed.
set -euo pipefail

say() { printf 'hugepages: %s\n' "$*"; }
die() { printf 'hugepages: error: %s\n' "$*" >&2; exit 1; }

size=2M pages="" mount_dir="" save="" restore=""
while [ $# -gt 0 ]; do
    case "$1" in
        --size) size=${2:?--size needs 2M or 1G}; shift 2 ;;
        --pages) pages=${2:?--pages needs a number}; shift 2 ;;
        --mount) mount_dir=${2:?--mount needs a directory}; shift 2 ;;
        --save) save=${2:?--save needs a file}; shift 2 ;;
        --restore) restore=${2:?--restore needs a file}; shift 2 ;;
        -h|--help) sed -n '2,17s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done

case "$size" in
    2M|2m|2048k|2048kB) kb=2048 ;;
    1G|1g|1048576k|1048576kB) kb=1048576 ;;
    *) die "--size must be 2M or 1G, not $size" ;;
esac
[ "$(id -u)" -eq 0 ] || die "needs root (it writes /sys/kernel/mm/hugepages and mounts): sudo $0 $*"
pool=/sys/kernel/mm/hugepages/hugepages-${kb}kB
[ -d "$pool" ] || die "this kernel has no ${size} huge pages ($pool missing)"

is_hugetlbfs_mount() { awk -v d="$1" '$2 == d && $3 == "hugetlbfs" {found=1} END {exit !found}' /proc/mounts; }

if [ -n "$restore" ]; then
    [ -f "$restore" ] || { say "nothing to restore ($restore does not exist)"; exit 0; }
    while read -r key a b; do
        case "$key" in
            nr_hugepages)
                cur=$(cat "/sys/kernel/mm/hugepages/hugepages-${a}kB/nr_hugepages")
                if [ "$cur" = "$b" ]; then
                    say "${a}kB pool: ok ($b pages)"
                else
                    echo "$b" > "/sys/kernel/mm/hugepages/hugepages-${a}kB/nr_hugepages"
                    say "${a}kB pool: $cur -> $(cat "/sys/kernel/mm/hugepages/hugepages-${a}kB/nr_hugepages") pages (restored)"
                fi ;;
            mounted)
                if is_hugetlbfs_mount "$a"; then
                    umount "$a" && say "unmounted hugetlbfs at $a"
                else
                    say "hugetlbfs at $a: already unmounted"
                fi ;;
        esac
    done < "$restore"
    rm -f "$restore"
    exit 0
fi

if [ -n "$save" ] && [ ! -f "$save" ]; then
    echo "nr_hugepages $kb $(cat "$pool/nr_hugepages")" > "$save"
    say "saved the current state to $save (undo: $0 --restore $save)"
elif [ -n "$save" ]; then
    say "kept $save (it already holds the state to restore)"
fi

if [ -n "$pages" ]; then
    [[ "$pages" =~ ^[0-9]+$ ]] || die "--pages must be a number, not $pages"
    cur=$(cat "$pool/nr_hugepages")
    if [ "$cur" -eq "$pages" ]; then
        say "${size} pool: ok ($cur pages, $(cat "$pool/free_hugepages") free)"
    else
        echo "$pages" > "$pool/nr_hugepages"
        got=$(cat "$pool/nr_hugepages")
        say "${size} pool: $cur -> $got pages ($(cat "$pool/free_hugepages") free)"
        if [ "$got" -lt "$pages" ]; then
            die "the kernel granted only $got of $pages ${size} pages (memory is fragmented or short):" \
                "try 'sync; echo 3 > /proc/sys/vm/drop_caches; echo 1 > /proc/sys/vm/compact_memory' and rerun," \
                "or reserve 1G pages at boot (hugepagesz=1G hugepages=N)"
        fi
    fi
fi

if [ -n "$mount_dir" ]; then
    if is_hugetlbfs_mount "$mount_dir"; then
        say "hugetlbfs at $mount_dir: ok (already mounted)"
    else
        mkdir -p "$mount_dir"
        mount -t hugetlbfs -o "pagesize=${size^^}" none "$mount_dir"
        say "hugetlbfs at $mount_dir: mounted (pagesize=${size^^})"
        if [ -n "$save" ] && ! grep -qs "^mounted $mount_dir\$" "$save"; then
            echo "mounted $mount_dir" >> "$save"
        fi
    fi
fi
