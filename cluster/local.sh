#!/usr/bin/env bash
# A single-node Ray "cluster" on this machine, bound to loopback, for trying dpray the way it runs
# on Kubernetes (driver + `ray job submit`) without one.
#
#   cluster/local.sh up       start it (free ports, loopback only); prints the addresses
#   cluster/local.sh env      print `export RAY_ADDRESS=...` lines: eval "$(cluster/local.sh env)"
#   cluster/local.sh status   is it running, where, which process ids
#   cluster/local.sh down     stop exactly the processes `up` started, by process id
#
#   cluster/local.sh up && eval "$(cluster/local.sh env)"
#   dpray run jobs/smoke.yaml --address auto            # the driver joins via RAY_ADDRESS
#   ray job submit -- python -m dpray run "$PWD/jobs/smoke.yaml" \
#       --run-dir "$PWD/runs/smoke-job" --address auto     # needs ray[default]; absolute paths:
#                                                           # the job runs where `up` was run
#
# Everything lives in one state directory (default $HOME/.cache/dpray/ray-local, override with
# DPRAY_LOCAL_RAY_DIR): Ray's --temp-dir (sessions, logs, sockets), the state file `local.state`
# (addresses, session id, process ids) and the cluster's own auth token `auth_token` (Ray token
# authentication is always on; `env` exports RAY_AUTH_MODE/RAY_AUTH_TOKEN_PATH for clients).
# Ray's unix socket paths must fit in 107 bytes, so keep the directory short.
#
# Loopback: the node and every address we hand out are 127.0.0.1, and the dashboard (the HTTP job
# API) binds 127.0.0.1 only.  Ray has no bind option for its gRPC servers (GCS, raylet, agents):
# they listen on all interfaces, hence the token.
#
# Stopping: `ray start` runs in a new session (setsid), so everything Ray starts (gcs, raylet,
# dashboard, agents, workers) shares one session id; `down` signals exactly the processes of that
# session and, as a fallback, Ray processes whose command line names the state directory.  It never
# runs `ray stop`, which stops every Ray of this user on the machine, other people's included.
#
# Environment: PYTHON (interpreter that has ray; default python3), DPRAY_LOCAL_NUM_CPUS,
# DPRAY_LOCAL_OBJECT_STORE_BYTES (default 1 GiB), DPRAY_LOCAL_DASHBOARD (auto|true|false; auto
# starts the dashboard, which `ray job submit` needs, when ray[default]'s packages are installed).
set -euo pipefail

PYTHON="${PYTHON:-python3}"
DIR="${DPRAY_LOCAL_RAY_DIR:-$HOME/.cache/dpray/ray-local}"
STATE="$DIR/local.state"
TOKEN="$DIR/auth_token"
MAX_DIR_LEN=40 # + /session_<date>_<time>_<pid>/sockets/plasma_store <= 107 bytes

die() { echo "local.sh: $*" >&2; exit 1; }

load_state() {
  [[ -f "$STATE" ]] || return 1
  # shellcheck disable=SC1090
  source "$STATE"
}

# pids of live processes in session $1
session_pids() {
  ps -eo pid=,sid= | awk -v sid="$1" '$2 == sid {print $1}'
}

# awk: does the line name the state directory (as a whole path component, so .../ray-local never
# matches .../ray-local2)?  The directory goes through the environment, so awk's own command line
# does not match.
NAMES_DIR='function names_dir(line, d) { d = ENVIRON["D"]; return index(line, d "/") || index(line, d " ") || substr(line, length(line) - length(d) + 1) == d }'

# pids of live Ray processes whose command line names the state directory
dir_pids() {
  ps -eo pid=,args= | D="$DIR" ME="$$" awk "$NAMES_DIR"'
    names_dir($0) && $1 != ENVIRON["ME"] && /ray/ && !/local\.sh/ {print $1}'
}

our_pids() {
  { [[ -n "${RAY_LOCAL_SID:-}" ]] && session_pids "$RAY_LOCAL_SID"; dir_pids; } | sort -un
}

alive() {
  [[ -n "${RAY_LOCAL_GCS_PID:-}" ]] && kill -0 "$RAY_LOCAL_GCS_PID" 2>/dev/null &&
    ps -o args= -p "$RAY_LOCAL_GCS_PID" | D="$DIR" awk "$NAMES_DIR"' names_dir($0) {f = 1} END {exit !f}'
}

free_ports() {
  "$PYTHON" - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
for s in socks:
    s.close()
EOF
}

stop_pids() {
  local pids=("$@") left=() pid _
  ((${#pids[@]})) || return 0
  kill -TERM "${pids[@]}" 2>/dev/null || true
  for _ in $(seq 1 40); do
    left=()
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && left+=("$pid"); done
    ((${#left[@]})) || return 0
    sleep 0.25
  done
  kill -KILL "${left[@]}" 2>/dev/null || true
}

cmd_up() {
  [[ ${#DIR} -le $MAX_DIR_LEN ]] ||
    die "state dir '$DIR' is longer than $MAX_DIR_LEN characters (Ray's socket paths would not fit); set DPRAY_LOCAL_RAY_DIR"
  if load_state && alive; then
    echo "already running: $RAY_LOCAL_GCS (dashboard: ${RAY_LOCAL_DASHBOARD:-none})"
    return 0
  fi
  mkdir -p "$DIR"
  rm -f "$STATE"
  # Ray >= 2.5x turns on token auth when ~/.ray/auth_token exists (shared by every Ray of this
  # user); use a token of our own instead, always: the GCS and raylet listen on all interfaces.
  if [[ ! -s "$TOKEN" ]]; then
    (umask 077 && "$PYTHON" -c "import secrets; print(secrets.token_hex(32), end='')" >"$TOKEN")
  fi
  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$TOKEN"
  unset RAY_AUTH_TOKEN RAY_ADDRESS

  local dashboard="${DPRAY_LOCAL_DASHBOARD:-auto}"
  if [[ "$dashboard" == auto ]]; then
    if "$PYTHON" -c "import ray.dashboard.modules.job.job_head" 2>/dev/null; then
      dashboard=true
    else
      dashboard=false
      echo "local.sh: dashboard off: ray[default] is not installed, so \`ray job submit\` will not" \
        "work (pip install 'ray[default]'); drivers can still join with RAY_ADDRESS" >&2
    fi
  fi

  local gcs dash client agent agent_grpc runtime_env metrics node_mgr obj_mgr
  read -r gcs dash client agent agent_grpc runtime_env metrics node_mgr obj_mgr <<<"$(free_ports 9)"
  local args=(
    start --head --disable-usage-stats
    --node-ip-address=127.0.0.1 --port="$gcs" --temp-dir="$DIR"
    --include-dashboard="$dashboard" --dashboard-host=127.0.0.1 --dashboard-port="$dash"
    --dashboard-agent-listen-port="$agent"
    --dashboard-agent-grpc-port="$agent_grpc" --runtime-env-agent-port="$runtime_env"
    --metrics-export-port="$metrics" --node-manager-port="$node_mgr"
    --object-manager-port="$obj_mgr"
    --object-store-memory="${DPRAY_LOCAL_OBJECT_STORE_BYTES:-1073741824}"
  )
  [[ -n "${DPRAY_LOCAL_NUM_CPUS:-}" ]] && args+=(--num-cpus="$DPRAY_LOCAL_NUM_CPUS")
  # the Ray client server (ray://) runs only with ray[client] (grpcio): Ray then defaults it to port
  # 10001, which another Ray may hold, and refuses the option without it
  local client_url=""
  if "$PYTHON" -c "import grpc" 2>/dev/null; then
    args+=(--ray-client-server-port="$client")
    client_url="ray://127.0.0.1:$client"
  fi

  # a new session: every process Ray starts (gcs, raylet, dashboard, workers) shares its id
  setsid --wait "$PYTHON" -m ray.scripts.scripts "${args[@]}" >"$DIR/start.log" 2>&1 &
  local starter=$!
  local rc=0
  wait "$starter" || rc=$?
  local sid gcs_pid
  gcs_pid="$(ps -eo pid=,args= | D="$DIR" awk "$NAMES_DIR"' /gcs_server/ && names_dir($0) {print $1; exit}')"
  if [[ -n "$gcs_pid" ]]; then
    sid="$(ps -o sid= -p "$gcs_pid" | tr -d ' ')"
  else
    sid="$starter"
  fi
  if [[ "$sid" == "$(ps -o sid= -p $$ | tr -d ' ')" ]]; then
    # setsid did not take: the session is ours (our shell, our caller) and must not be signalled
    echo "local.sh: Ray did not get a session of its own; stopping will go by state dir only" >&2
    sid=""
  fi
  RAY_LOCAL_SID="$sid"
  if ((rc != 0)) || [[ -z "$gcs_pid" ]]; then
    echo "local.sh: ray start failed (rc=$rc); log: $DIR/start.log" >&2
    tail -n 20 "$DIR/start.log" >&2 || true
    mapfile -t pids < <(our_pids)
    stop_pids "${pids[@]}"
    exit 1
  fi
  local pids
  pids="$(our_pids | tr '\n' ' ')"
  local dash_url=""
  [[ "$dashboard" == true ]] && dash_url="http://127.0.0.1:$dash"
  cat >"$STATE" <<EOF
RAY_LOCAL_DIR='$DIR'
RAY_LOCAL_GCS='127.0.0.1:$gcs'
RAY_LOCAL_DASHBOARD='$dash_url'
RAY_LOCAL_CLIENT='$client_url'
RAY_LOCAL_SID='$sid'
RAY_LOCAL_GCS_PID='$gcs_pid'
RAY_LOCAL_PIDS='${pids% }'
EOF
  echo "ray up: gcs 127.0.0.1:$gcs, dashboard ${dash_url:-off}, session $sid, pids ${pids% }"
  echo "state: $STATE"
}

cmd_env() {
  load_state || die "not running (no $STATE)"
  echo "export RAY_ADDRESS='$RAY_LOCAL_GCS'"
  echo "export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH='$TOKEN'"
  [[ -n "$RAY_LOCAL_DASHBOARD" ]] && echo "export RAY_API_SERVER_ADDRESS='$RAY_LOCAL_DASHBOARD'"
  return 0
}

cmd_status() {
  if ! load_state; then
    echo "not running (no $STATE)"
    return 3
  fi
  local pids
  pids="$(our_pids | tr '\n' ' ')"
  if alive; then
    echo "running: gcs $RAY_LOCAL_GCS, dashboard ${RAY_LOCAL_DASHBOARD:-off}, session $RAY_LOCAL_SID"
    echo "pids: ${pids% }"
    return 0
  fi
  echo "not running (stale state $STATE); leftover pids: ${pids:-none}"
  return 3
}

cmd_down() {
  if ! load_state; then
    local pids
    pids="$(dir_pids | tr '\n' ' ')"
    [[ -z "$pids" ]] && { echo "not running"; return 0; }
  fi
  local recorded=() pid
  # recorded pids only while they still belong to our session (guards against pid reuse)
  for pid in ${RAY_LOCAL_PIDS:-}; do
    [[ "$(ps -o sid= -p "$pid" 2>/dev/null | tr -d ' ')" == "${RAY_LOCAL_SID:-x}" ]] && recorded+=("$pid")
  done
  mapfile -t current < <({ printf '%s\n' "${recorded[@]}"; our_pids; } | grep -v '^$' | sort -un)
  stop_pids "${current[@]}"
  # workers started after `up` may still be exiting: one more pass
  mapfile -t current < <(our_pids)
  stop_pids "${current[@]}"
  rm -f "$STATE"
  mapfile -t current < <(our_pids)
  if ((${#current[@]})); then
    die "still running after down: ${current[*]}"
  fi
  echo "ray down: stopped session ${RAY_LOCAL_SID:-?}"
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  env) cmd_env ;;
  *) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac
