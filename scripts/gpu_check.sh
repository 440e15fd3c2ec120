#!/usr/bin/env bash
# The GPU check (issue 15): one command, <= 10 minutes on one GPU, the default model only (no hub is reachable
# from the lent machines). It exercises fp16 on CUDA with CUDA-synchronised timing, every method greedy against
# one vanilla reference (lossless classified), sampling at T > 0 (generators on the GPU), int8 (bitsandbytes)
# and model.device_map=auto, then prints one report. Run it whenever a GPU machine is at hand and paste its
# output into docs/gpu_check.md with the date and the GPU.
#   make setup TORCH=torch && scripts/gpu_check.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-gpu_check}}
BIN=${BIN:-.venv/bin}
mkdir -p "$OUT"
COMMON=(device=cuda bench.limit=3 bench.max_turns=1 max_new_tokens=64 warmup=1 progress=false
        logger.wandb.mode=disabled allow_untrained=true)
[ -n "${SPECDEC_DATA:-}" ] || export SPECDEC_DATA=$(realpath ../shared/data 2>/dev/null || echo "")
status=0
run() {   # name, overrides...
  local name=$1; shift
  if timeout 240 "$BIN/specdec-bench" "${COMMON[@]}" "run_dir=$OUT/$name" "$@" >"$OUT/$name.log" 2>&1; then
    echo "ok      $name: $(grep -m1 'tokens/s' "$OUT/$name.log" | sed 's/^.*questions, //')"
  else
    echo "FAILED  $name: $(grep -v '^\s*$' "$OUT/$name.log" | tail -1)"; status=1
  fi
}
"$BIN/python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
run vanilla method=vanilla
for method in hf_generate hf_prompt_lookup pld pld_specbench lookahead lookahead_specbench early_exit sps medusa \
              medusa_cpu_auto eagle eagle2 eagle2_cpu ours ours_auto ours_no_trigram; do
  run "$method" method=$method reference="$OUT/vanilla"
done
run medusa_typical_T0.7 method=medusa_typical decoding.temperature=0.7 decoding.top_p=0.9
for method in vanilla eagle2 ours sps; do run "${method}_T0.7" method=$method decoding.temperature=0.7 decoding.top_p=0.9; done
run vanilla_int8 method=vanilla model.quantization=int8
run eagle2_int8 method=eagle2 model.quantization=int8
run vanilla_device_map method=vanilla model.device_map=auto reference="$OUT/vanilla"
run eagle2_device_map method=eagle2 model.device_map=auto reference="$OUT/vanilla"
"$BIN/specdec-report" "runs=$OUT" "out_dir=$OUT/report" >"$OUT/report.log" 2>&1 \
  && sed -n '1,40p' "$OUT/report/summary.md" || { echo "FAILED  report: $(tail -1 "$OUT/report.log")"; status=1; }
exit $status
