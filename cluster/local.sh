#!/usr/bin/env bash
# A single-node Ray "cluster" on this machine, bound to loopback, for trying dpray the way it runs
# on Kubernetes (driver + `ray job submit`) without one.
#
#   cluster/local.sh up       start it (free ports, loopback only); prints the addresses
#   cluster/local.sh up --workers N
#                             multi-node: a head with 0 CPUs (it runs the driver and nothing else)
#                             plus N worker nodes joined with `ray start --address`, node i with
#                             DPRAY_LOCAL_WORKER_CPUS CPUs (default 1) and the resource node_i: 1
#   cluster/local.sh env      print `export RAY_ADDRESS=...` lines: eval "$(cluster/local.sh env)"
#   cluster/local.sh status   is it running, where, which process ids
#   cluster/local.sh stop-node I
#                             stop worker node I alone (a lost node, for fault-tolerance tests)
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
# Ray's unix socket paths must fit in 107 bytes, so keep the directory short.  Worker node i keeps
# its own --temp-dir, DIR/nI, and its own process session (so `stop-node` can stop it alone).
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
# DPRAY_LOCAL_OBJECT_STORE_BYTES (default 1 GiB, per node), DPRAY_LOCAL_DASHBOARD (auto|true|false;
# auto starts the dashboard, which `ray job submit` needs, when ray[default]'s packages are
# installed), DPRAY_LOCAL_WORKER_CPUS (CPUs of each worker node in multi-node mode, default 1).
set -euo pipefail

PYTHON="${PYTHON:-python3}"
DIR="${DPRAY_LOCAL_RAY_DIR:-$HOME/.cache/dpray/ray-local}"
STATE="$DIR/local.state"
TOKEN="$DIR/auth_token"
MAX_DIR_LEN=40 # + /session_<date>_<time>_<pid>/sockets/plasma_store <= 107 bytes
MAX_WORKERS=9  # worker temp dirs DIR/n1..DIR/n9: 3 bytes more, see cmd_up

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
  {
    [[ -n "${RAY_LOCAL_SID:-}" ]] && session_pids "$RAY_LOCAL_SID"
    local sid
    for sid in ${RAY_LOCAL_NODE_SIDS:-}; do [[ "$sid" == none ]] || session_pids "$sid"; done
    dir_pids
  } | sort -un
}

# pids of worker node $1: its session, and Ray processes naming its temp dir
node_pids() {
  local i="$1" sids
  read -r -a sids <<<"${RAY_LOCAL_NODE_SIDS:-}"
  {
    if ((i >= 1 && i <= ${#sids[@]})) && [[ "${sids[i - 1]}" != none ]]; then
      session_pids "${sids[i - 1]}"
    fi
    DIR="$DIR/n$i" dir_pids
  } | sort -un
}

# the session id of the live process whose command line matches $1 and names directory $2
sid_of() {
  local pid
  pid="$(ps -eo pid=,args= | D="$2" awk "$NAMES_DIR"' /'"$1"'/ && names_dir($0) {print $1; exit}')"
  [[ -n "$pid" ]] && ps -o sid= -p "$pid" | tr -d ' '
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

# Worker node $1 joins the head at $2: its own temp dir, free ports, session, and resource node_$1.
# Appends its session id to RAY_LOCAL_NODE_SIDS.
start_worker() {
  local i="$1" address="$2" dir="$DIR/n$1"
  local agent agent_grpc runtime_env metrics node_mgr obj_mgr
  read -r agent agent_grpc runtime_env metrics node_mgr obj_mgr <<<"$(free_ports 6)"
  mkdir -p "$dir"
  local args=(
    start --address="$address" --disable-usage-stats
    --node-ip-address=127.0.0.1 --temp-dir="$dir"
    --num-cpus="${DPRAY_LOCAL_WORKER_CPUS:-1}" --num-gpus=0 --resources="{\"node_$i\": 1}"
    --dashboard-agent-listen-port="$agent"
    --dashboard-agent-grpc-port="$agent_grpc" --runtime-env-agent-port="$runtime_env"
    --metrics-export-port="$metrics" --node-manager-port="$node_mgr"
    --object-manager-port="$obj_mgr"
    --object-store-memory="${DPRAY_LOCAL_OBJECT_STORE_BYTES:-1073741824}"
  )
  setsid --wait "$PYTHON" -m ray.scripts.scripts "${args[@]}" >"$DIR/n$i.log" 2>&1 || return 1
  local sid
  sid="$(sid_of raylet "$dir")"
  [[ -n "$sid" ]] || return 1
  if [[ "$sid" == "$(ps -o sid= -p $$ | tr -d ' ')" ]]; then
    echo "local.sh: worker node $i did not get a session of its own; it is stopped by temp dir" >&2
    sid=none
  fi
  RAY_LOCAL_NODE_SIDS="$RAY_LOCAL_NODE_SIDS $sid"
}

# stop whatever a failed start of worker node $1 left running (it has no session recorded yet)
clear_node() {
  local pids
  echo "local.sh: worker node $1 did not start; trying once more" >&2
  mapfile -t pids < <(DIR="$DIR/n$1" dir_pids)
  stop_pids "${pids[@]}"
}

cmd_up() {
  local workers=0
  while (($#)); do
    case "$1" in
      --workers) workers="${2:-}"; shift; shift || true ;;
      --workers=*) workers="${1#--workers=}"; shift ;;
      *) die "up: unknown argument '$1' (usage: up [--workers N])" ;;
    esac
  done
  [[ "$workers" =~ ^[0-9]+$ ]] && ((workers <= MAX_WORKERS)) ||
    die "--workers must be a number from 0 to $MAX_WORKERS, not '$workers'"
  local max_len=$MAX_DIR_LEN
  ((workers)) && max_len=$((MAX_DIR_LEN - 3))
  [[ ${#DIR} -le $max_len ]] ||
    die "state dir '$DIR' is longer than $max_len characters (Ray's socket paths would not fit); set DPRAY_LOCAL_RAY_DIR"
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
  if ((workers)); then
    args+=(--num-cpus=0 --num-gpus=0) # the head runs the driver (and job supervisor) only
  elif [[ -n "${DPRAY_LOCAL_NUM_CPUS:-}" ]]; then
    args+=(--num-cpus="$DPRAY_LOCAL_NUM_CPUS")
  fi
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
  RAY_LOCAL_NODE_SIDS=""
  if ((rc != 0)) || [[ -z "$gcs_pid" ]]; then
    echo "local.sh: ray start failed (rc=$rc); log: $DIR/start.log" >&2
    tail -n 20 "$DIR/start.log" >&2 || true
    mapfile -t pids < <(our_pids)
    stop_pids "${pids[@]}"
    exit 1
  fi
  local i
  for ((i = 1; i <= workers; i++)); do
    # Ray gives a joining raylet 30 s to register with the GCS (not configurable); a busy machine
    # can miss that, so a node that failed is cleared away and started once more
    if ! start_worker "$i" "127.0.0.1:$gcs" && ! { clear_node "$i" && start_worker "$i" "127.0.0.1:$gcs"; }; then
      echo "local.sh: worker node $i failed to start; log: $DIR/n$i.log" >&2
      tail -n 20 "$DIR/n$i.log" >&2 || true
      mapfile -t pids < <(our_pids)
      stop_pids "${pids[@]}"
      exit 1
    fi
  done
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
RAY_LOCAL_WORKERS='$workers'
RAY_LOCAL_NODE_SIDS='${RAY_LOCAL_NODE_SIDS# }'
EOF
  echo "ray up: gcs 127.0.0.1:$gcs, dashboard ${dash_url:-off}, session $sid, pids ${pids% }"
  if ((workers)); then
    echo "worker nodes: $workers (sessions ${RAY_LOCAL_NODE_SIDS# }); the head has 0 CPUs"
  fi
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
    local i node
    for ((i = 1; i <= ${RAY_LOCAL_WORKERS:-0}; i++)); do
      node="$(node_pids "$i" | tr '\n' ' ')"
      if [[ -n "$node" ]]; then echo "worker node $i: running, pids ${node% }"; else echo "worker node $i: stopped"; fi
    done
    return 0
  fi
  echo "not running (stale state $STATE); leftover pids: ${pids:-none}"
  return 3
}

cmd_stop_node() {
  load_state || die "not running (no $STATE)"
  local i="${1:-}" pids
  [[ "$i" =~ ^[0-9]+$ ]] && ((i >= 1 && i <= ${RAY_LOCAL_WORKERS:-0})) ||
    die "stop-node: no worker node '$i' (this cluster has ${RAY_LOCAL_WORKERS:-0})"
  mapfile -t pids < <(node_pids "$i")
  stop_pids "${pids[@]}"
  mapfile -t pids < <(node_pids "$i")
  ((${#pids[@]} == 0)) || die "worker node $i still running after stop-node: ${pids[*]}"
  echo "worker node $i stopped"
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
  up) shift; cmd_up "$@" ;;
  down) cmd_down ;;
  status) cmd_status ;;
  env) cmd_env ;;
  stop-node) cmd_stop_node "${2:-}" ;;
  *) echo "usage: $0 up [--workers N]|down|status|env|stop-node I" >&2; exit 2 ;;
esac
