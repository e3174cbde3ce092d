#!/usr/bin/env bash
# Indexing speed and search latency of the defaults beside the baseline, in one run: exact
# cosine search (the float vectors in a FLAT index, no DBA, no query expansion), then Loupe's
# defaults (binary codes, full-precision re-ranking, DBA, alpha-QE). Each gets a fresh stack,
# indexes DIR (`loupe index` prints files/s) and runs tools/bench_search.py on it.
#
#   tools/bench_search_configs.sh ../shared/data/corel1k/images [BENCH_SEARCH_ARGS...]
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGES=${1:?folder of images}
shift
LOUPE=.venv/bin/loupe
# Ports apart from a default `loupe up`.
export LOUPE_GATEWAY_PORT=53051 LOUPE_DETECTION_PORT=53052 LOUPE_EMBEDDING_PORT=53053 \
  LOUPE_RETRIEVAL_PORT=53054 LOUPE_RANKING_PORT=53055 LOUPE_GATEWAY_METRICS_PORT=9451 \
  LOUPE_DETECTION_METRICS_PORT=9452 LOUPE_EMBEDDING_METRICS_PORT=9453 \
  LOUPE_RETRIEVAL_METRICS_PORT=9454 LOUPE_RANKING_METRICS_PORT=9455 LOUPE_REDIS_PORT=6699
CONFIGS=(
  "baseline: exact cosine|LOUPE_RETRIEVAL_CANDIDATE_CODE=float LOUPE_DBA_NEIGHBOURS=0 LOUPE_RANKING_QE_NEIGHBOURS=0"
  "defaults|"
)
for config in "${CONFIGS[@]}"; do
  IFS='|' read -r name settings <<<"$config"
  dir=$(mktemp -d)
  echo "==> $name ${settings:+($settings)}"
  # shellcheck disable=SC2086
  env $settings "$LOUPE" up --data-dir "$dir" >/dev/null 2>&1
  "$LOUPE" index --gateway 127.0.0.1:53051 --quiet "$IMAGES" 2>&1 | tail -1
  # Searches measure a settled catalogue, not one the batch DBA is rewriting.
  "$LOUPE" catalogs augment default --gateway 127.0.0.1:53051 >/dev/null
  .venv/bin/python tools/bench_search.py "$IMAGES" --gateway 127.0.0.1:53051 \
    --retrieval 127.0.0.1:53054 "$@" 2>/dev/null || status=$?
  "$LOUPE" down --data-dir "$dir" >/dev/null 2>&1
  rm -rf "$dir"
  [ "${status:-0}" = 0 ] || exit "$status"
done
