#!/usr/bin/env bash
# Retrieval quality, configuration by configuration, through the gateway: for each row a fresh
# embedded stack with that row's settings, `loupe eval retrieval` on the gallery, the stack
# stopped. Prints a Markdown table (docs/quality.md) and keeps each run's JSON in OUT.
#
#   tools/quality_sweep.sh GALLERY [OUT] -- EVAL_ARGS...
#   tools/quality_sweep.sh ../shared/data/corel1k/images .cache/quality -- --numbered-groups 100
#
# Rows: exact cosine (float index, no DBA, no QE) as the baseline; binary codes + full-precision
# re-ranking; + alpha-QE; + DBA; + both (the defaults); the defaults with objects indexed too;
# then other embedder exports (GeM, multi-scale, INT8), where models/ has them.
set -euo pipefail
cd "$(dirname "$0")/.."
GALLERY=${1:?gallery folder}
OUT=${2:-.cache/quality}
shift 2 || true
[ "${1:-}" = "--" ] && shift
mkdir -p "$OUT"
LOUPE=.venv/bin/loupe
# Ports apart from a default `loupe up`, so the sweep can run beside one.
export LOUPE_GATEWAY_PORT=52051 LOUPE_DETECTION_PORT=52052 LOUPE_EMBEDDING_PORT=52053 \
  LOUPE_RETRIEVAL_PORT=52054 LOUPE_RANKING_PORT=52055 LOUPE_GATEWAY_METRICS_PORT=9351 \
  LOUPE_DETECTION_METRICS_PORT=9352 LOUPE_EMBEDDING_METRICS_PORT=9353 \
  LOUPE_RETRIEVAL_METRICS_PORT=9354 LOUPE_RANKING_METRICS_PORT=9355 LOUPE_REDIS_PORT=6599

EXACT="LOUPE_RETRIEVAL_CANDIDATE_CODE=float LOUPE_DBA_NEIGHBOURS=0 LOUPE_RANKING_QE_NEIGHBOURS=0"
ALL_ROWS=(
  "exact|$EXACT|"
  "binary+rerank|LOUPE_DBA_NEIGHBOURS=0 LOUPE_RANKING_QE_NEIGHBOURS=0|"
  "binary+rerank+QE|LOUPE_DBA_NEIGHBOURS=0|"
  "binary+rerank+DBA|LOUPE_RANKING_QE_NEIGHBOURS=0|"
  "defaults (binary+rerank+DBA+QE)||"
  "defaults, objects indexed (--detect)||--detect"
  "exact, GeM p=3 embedder|$EXACT LOUPE_EMBEDDING_MODEL=embedder_gem3|"
  "exact, multi-scale embedder|$EXACT LOUPE_EMBEDDING_MODEL=embedder_avg_ms|"
  "defaults, multi-scale embedder|LOUPE_EMBEDDING_MODEL=embedder_avg_ms|"
  "exact, INT8 embedder|$EXACT LOUPE_EMBEDDING_MODEL=embedder_int8|"
  "defaults, INT8 embedder|LOUPE_EMBEDDING_MODEL=embedder_int8|"
)
# ONLY=1,5 runs some rows (numbered from 1) into the same OUT.
ROWS=()
for i in "${!ALL_ROWS[@]}"; do
  if [ -z "${ONLY:-}" ] || [[ ",$ONLY," == *",$((i + 1)),"* ]]; then ROWS+=("${ALL_ROWS[$i]}"); fi
done
for row in "${ROWS[@]}"; do
  IFS='|' read -r name settings extra <<<"$row"
  slug=$(echo "$name" | tr -c 'a-zA-Z0-9\n' '_')
  model=$(echo "$settings" | sed -n 's/.*LOUPE_EMBEDDING_MODEL=\([^ ]*\).*/\1/p')
  if [ -n "$model" ] && [ ! -f "models/$model/config.pbtxt" ]; then
    echo "==> $name: skipped, no models/$model (build it: docs/models.md)" >&2
    continue
  fi
  dir=$(mktemp -d)
  echo "==> $name: $settings $extra" >&2
  # shellcheck disable=SC2086
  env $settings "$LOUPE" up --data-dir "$dir" >&2
  # --data-dir: the stack's own admin key (it creates and drops a catalogue) is found there.
  # shellcheck disable=SC2086
  "$LOUPE" eval retrieval --gateway 127.0.0.1:52051 --data-dir "$dir" --gallery "$GALLERY" "$@" $extra \
    --json "$OUT/$slug.json" >&2 || status=$?
  "$LOUPE" down --data-dir "$dir" >/dev/null
  rm -rf "$dir"
  [ "${status:-0}" = 0 ] || exit "$status"
  echo "$name|$settings $extra|$OUT/$slug.json" >>"$OUT/rows.txt"
done
.venv/bin/python - "$OUT/rows.txt" <<'PY'
import json, sys
print("| configuration | settings | mAP | mAP@100 | P@1 | P@5 | P@10 | R@10 | p50 ms | p95 ms | index B/row | of float32 |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for line in open(sys.argv[1]):
    name, settings, path = line.rstrip("\n").split("|")
    r = json.load(open(path)); m = r["metrics"]; i = r["index"]
    print(f"| {name} | `{settings.strip() or 'defaults'}` | {m['map']:.4f} | {m['map_at_100']:.4f} | "
          f"{m['p_at_1']:.4f} | {m['p_at_5']:.4f} | {m['p_at_10']:.4f} | {m['r_at_10']:.4f} | "
          f"{m['latency_ms_median']:.0f} | {m['latency_ms_p95']:.0f} | {i['code_bytes_per_row']} | "
          f"{i['code_fraction_of_full']:.3f} |")
PY
