#!/usr/bin/env bash
# Continue every shipped SmolLM2-135M head on one distilled dataset and ship each as <name>_<version>, so all
# five heads end up trained on the same data (issue 14's comparison needs it). Every step resumes where it
# stopped: the feature cache after its last shard, each training run from its last checkpoint, a head already
# shipped is skipped. Run it again after a stop (SIGTERM / Ctrl-C: the step in flight saves and stops).
#
#   scripts/retrain_smollm2_heads.sh heads/smollm2-135m/dataset_v3 [eagle medusa medusa1 ours ours_no_trigram]
#
# Environment: VERSION (default: the dataset folder's suffix, v3), CACHE (data/features/<version>),
# PATIENCE (early stopping, in evals; 3), EVAL_STEPS (200), EPOCHS (2), THREADS (2), EXTRA (more overrides).
# Each head keeps the learning rate it was first trained with (heads/smollm2-135m/MANIFEST.json), cosine from
# there, and stops once its eval loss has not improved for PATIENCE evals; the best eval's head is shipped.
set -euo pipefail
data=$(realpath -m "${1:?usage: scripts/retrain_smollm2_heads.sh <dataset folder> [head ...]}")   # from the caller's folder
shift
cd "$(dirname "$0")/.."
case $data in "$PWD"/*) data=${data#"$PWD"/} ;; esac      # inside the repository: recorded relative to it
heads=("$@")
[ ${#heads[@]} -gt 0 ] || heads=(eagle medusa medusa1 ours ours_no_trigram)
if [ -n "${VERSION:-}" ]; then version=$VERSION
else
  case $(basename "$data") in
    dataset_?*) version=$(basename "$data" | sed 's/^dataset_//') ;;
    *) echo "cannot tell the version from '$(basename "$data")' (not dataset_<version>): set VERSION=<name>" >&2; exit 2 ;;
  esac
fi
read -ra more <<< "${EXTRA:-}"           # EXTRA split on spaces, never glob-expanded
cache=${CACHE:-data/features/$version}
patience=${PATIENCE:-3}
eval_steps=${EVAL_STEPS:-200}
epochs=${EPOCHS:-2}
threads=${THREADS:-2}
for split in train eval; do
  [ -f "$data/distilled.$split.parquet" ] || { echo "no $data/distilled.$split.parquet: merge the dataset with eval_fraction > 0 first" >&2; exit 2; }
done

for name in "${heads[@]}"; do
  case $name in                    # preset, its overrides, the bench method that reads the head, learning rate
    eagle)           preset=eagle_smollm2;          extra=();                         method=eagle2_cpu;      lr=3e-4 ;;
    medusa)          preset=medusa_smollm2;         extra=();                         method=medusa_cpu;      lr=1e-3 ;;
    medusa1)         preset=medusa_smollm2;         extra=(head.medusa_num_heads=1);  method=medusa1_cpu;     lr=1e-3 ;;
    ours)            preset=ours_smollm2;           extra=();                         method=ours;            lr=3e-4 ;;
    ours_no_trigram) preset=ours_no_trigram_smollm2; extra=();                        method=ours_no_trigram; lr=3e-4 ;;
    *) echo "unknown head '$name' (eagle, medusa, medusa1, ours, ours_no_trigram)" >&2; exit 2 ;;
  esac
  start=heads/smollm2-135m/$name
  dest=heads/smollm2-135m/${name}_$version
  out=runs/train/${name}_$version
  if [ -f "$dest/model.safetensors" ]; then echo "== $dest already shipped: skipped"; continue; fi
  if [ -f "$out/train_summary.json" ]; then
    echo "== $out finished training before: shipped without training again"
  else
    echo "== $name: $start continued on $data -> $out (then $dest)"
    nice -n 5 .venv/bin/specdec-train "train=$preset" "${extra[@]}" \
      "data_path=$data/distilled.train.parquet" "eval_data_path=$data/distilled.eval.parquet" \
      "feature_cache=$cache" "threads=$threads" logger.wandb.mode=disabled "init_head=$start" "output_dir=$out" \
      "training.num_train_epochs=$epochs" "training.learning_rate=$lr" training.lr_scheduler_type=cosine \
      training.warmup_ratio=0.02 "training.eval_steps=$eval_steps" "training.save_steps=$eval_steps" \
      "early_stopping_patience=$patience" "${more[@]}"
  fi
  .venv/bin/python -m harness.ship "$out" "$dest" --method "$method (method.head_path=$dest)" \
    --data-command "specdec-distill runs recorded in $data/distilled.manifest.json (distill_runs)"
  .venv/bin/python -m reports.training_curves "$out" --out "docs/figures/training_curves_${name}_$version"
done
