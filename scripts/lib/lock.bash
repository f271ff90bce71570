# Sourced by scripts/bench and scripts/bench-dfs.
#
# lock_held_by_ancestor LOCK: true when a flock(1) among this shell's
# ancestors holds LOCK, as `flock LOCK scripts/bench...` does. Taking the lock
# again from here would then wait for ever. /proc/locks names the holder's
# PID and the file's inode, so match the inode and walk up the PPid chain.
lock_held_by_ancestor() {
  local lock=$1 ino pid=$$ holders
  [[ -e $lock ]] || return 1
  ino=$(stat -c %i "$lock")
  holders=$(awk -v ino="$ino" '$2 == "FLOCK" { split($6, f, ":"); if (f[3] == ino) print $5 }' /proc/locks)
  [[ -n $holders ]] || return 1
  while [[ $pid -gt 1 ]]; do
    [[ " $holders " == *" $pid "* ]] && return 0
    pid=$(awk '/^PPid:/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 1)
  done
  return 1
}
