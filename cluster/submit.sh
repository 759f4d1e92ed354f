#!/usr/bin/env bash
# Submit `unidd-ray pipeline ARGS...` to a Ray cluster as a Ray job (token authentication).
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: cluster/submit.sh [--no-wait] [--] PIPELINE_ARGS...

Submits `unidd-ray pipeline PIPELINE_ARGS...` with `ray job submit`, uploading the current directory
as the job's working dir (without data/, runs/, .venv/, .git/, *.beton and caches).

  --no-wait        return after submission (`ray job logs -f JOB_ID` follows it later)
  -h, --help       this message

Environment:
  RAY_ADDRESS      the cluster's dashboard / job API, e.g. http://127.0.0.1:8265 (required;
                   `ray dashboard cluster/aws.yaml` or `kubectl port-forward` tunnels it to localhost)
  RAY_AUTH_TOKEN   the cluster token; default: the contents of ~/.ray/auth_token
                   (or of $RAY_AUTH_TOKEN_PATH)
  UNIDD_JOB_ENV    extra job environment as JSON, e.g. '{"NCCL_DEBUG": "INFO"}' (merged into env_vars)
  RAY              the ray command (default: ray from PATH)

Results go where the recipe's `out` says: on a cluster, pass a shared path, e.g.
  cluster/submit.sh --recipe cifar10 --set out=/mnt/shared/runs/cifar10 \
      --set storage_path=/mnt/shared/ray --set data.root=/mnt/shared/datasets/cifar-10-batches-py
USAGE
}

wait_flag=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --no-wait) wait_flag=(--no-wait); shift ;;
    --) shift; break ;;
    *) break ;;
  esac
done
if [[ $# -eq 0 ]]; then
  usage >&2
  echo "error: give the pipeline's arguments, e.g. --recipe digits" >&2
  exit 2
fi

if [[ -z "${RAY_ADDRESS:-}" ]]; then
  echo "error: set RAY_ADDRESS to the cluster's job API, e.g. http://127.0.0.1:8265" >&2
  exit 2
fi

# token authentication: RAY_AUTH_TOKEN, else the token file (Ray reads it too, but fail early and clearly)
export RAY_AUTH_MODE=token
if [[ -z "${RAY_AUTH_TOKEN:-}" ]]; then
  token_file="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
  if [[ ! -s "$token_file" ]]; then
    echo "error: no Ray auth token: set RAY_AUTH_TOKEN or write the cluster token to $token_file" >&2
    exit 2
  fi
  RAY_AUTH_TOKEN="$(<"$token_file")"
  export RAY_AUTH_TOKEN
fi

ray_cmd="${RAY:-ray}"
if ! command -v "$ray_cmd" >/dev/null 2>&1; then
  echo "error: '$ray_cmd' not found; activate the project's virtualenv or set RAY=/path/to/ray" >&2
  exit 2
fi

# the job's environment (never the token: the cluster's nodes have their own)
env_vars='{"PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}'
if [[ -n "${UNIDD_JOB_ENV:-}" ]]; then
  env_vars="$(python3 -c 'import json, sys; a = json.loads(sys.argv[1]); a.update(json.loads(sys.argv[2])); print(json.dumps(a))' \
    "$env_vars" "$UNIDD_JOB_ENV")"
fi
runtime_env="{\"excludes\": [\"data/\", \"runs/\", \".venv/\", \"venv/\", \".git/\", \"*.beton\", \"__pycache__/\", \
\".pytest_cache/\", \"benchmarks/work/\", \"*.egg-info/\", \".whl/\", \"build/\"], \"env_vars\": $env_vars}"

exec "$ray_cmd" job submit --address "$RAY_ADDRESS" --working-dir . --runtime-env-json "$runtime_env" \
  ${wait_flag[@]+"${wait_flag[@]}"} -- unidd-ray pipeline "$@"
