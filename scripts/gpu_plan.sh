#!/usr/bin/env bash
# The GPU measurements still owed (issues 4 and 7), as commands that each fit the GPU machine's 10-minute limit and
# bring back at most 8 files (more than 8 under $OUT are dropped). Run on the GPU machine from the repo root, with
# the kit carried (`.devkit`), one part per call:
#   bash scripts/gpu_plan.sh first      # tests + mva + nf4 below, in one call (start here)
#   bash scripts/gpu_plan.sh ninth      # GPU tests, then ours on both models at 2048+8192 (the eighth session's tail)
#   bash scripts/gpu_plan.sh tenth      # graphs GPU tests; Llama ours/unsloth/hf at 2048+8192 (first-backward capture)
#   bash scripts/gpu_plan.sh qwen_four  # Qwen2.5-VL-7B: all four systems at 2048+8192 in one command
#   bash scripts/gpu_plan.sh first_steps # Qwen 2048: host time of ours' first two steps per capture schedule
#   bash scripts/gpu_plan.sh eleventh   # first_steps, then cProfile of ours' and hf's Qwen load
#   bash scripts/gpu_plan.sh sdpa_first_call # SDPA first/steady fwd+bwd per backend, cold and warm CUDA JIT cache
#   bash scripts/gpu_plan.sh llama_table # Llama table: four systems at 2048+8192 with fresh caches
#   bash scripts/gpu_plan.sh thirteenth # the Llama table (fresh caches, warm-up), then ours alone on Qwen
#   bash scripts/gpu_plan.sh sync_check # Qwen 2048 ours + hf after os.sync(): the order effect on first step and load
#   bash scripts/gpu_plan.sh fourteenth # GPU tests, then ours + hf on Qwen 2048: load_splits and first_step_triton
#   bash scripts/gpu_plan.sh fifteenth  # graphs GPU tests, then the Qwen table (four systems, one command)
#   bash scripts/gpu_plan.sh llama_prof # a torch.profiler trace of ours at Llama 2048
#   bash scripts/gpu_plan.sh sixteenth  # the Llama table (four systems), then a profile of ours at Llama 2048
#   bash scripts/gpu_plan.sh seventeenth # the precompile GPU test, then ours alone on Qwen 2048 (first step)
#   bash scripts/gpu_plan.sh eighteenth # Mllama split GPU tests, then the Llama table (four systems, Unsloth last)
#   bash scripts/gpu_plan.sh twentysecond # Qwen 2048 ours: expandable segments deferred vs from import, 8 steps each
#   bash scripts/gpu_plan.sh twentythird  # the Llama table at the current code (four systems, 2048+8192)
#   bash scripts/gpu_plan.sh twentyfourth # the Qwen table at the current code (four systems, 2048+8192)
#   bash scripts/gpu_plan.sh twentyfifth  # precompile GPU test (rotary); order effect; pinned buffers; device map; niced helper
#   bash scripts/gpu_plan.sh twentysixth  # the Qwen table (fast LoRA init), then ours at 2048: helper process; peft's init
#   bash scripts/gpu_plan.sh twentyseventh # the Llama table (fast LoRA init, really on), then ours at 2048 with the helper
#   bash scripts/gpu_plan.sh twentyeighth # fast LoRA set-up GPU test; Qwen 2048: the recipe, then ours at the new defaults
#   bash scripts/gpu_plan.sh thirtyninth  # Qwen 2048 table (all four systems) at the final code, within ~300 s
#   bash scripts/gpu_plan.sh thirtyeighth # the Llama table (all four systems, 2048+8192) at the final code of 2026-12-04
#   bash scripts/gpu_plan.sh thirtyseventh # LoRA GPU test; Qwen 2048 recipe+ours twice (both orders), load profiles; Llama 2048
#   bash scripts/gpu_plan.sh thirtysixth  # Llama 2048 recipe + ours load, then Qwen 2048 again (same command each)
#   bash scripts/gpu_plan.sh thirtyfifth  # thirtyfourth then thirtythird in one call (one machine start)
#   bash scripts/gpu_plan.sh thirtyfourth # LoRA set-up GPU test (uint8 discard draws) + the draw's speed there
#   bash scripts/gpu_plan.sh thirtythird  # Qwen 2048 recipe + ours: load at the final code
#   bash scripts/gpu_plan.sh thirtysecond # Qwen 2048 load A/B: LoRA draws in a thread vs inline, helper off
#   bash scripts/gpu_plan.sh thirtieth    # the Llama table (all four systems, 2048+8192) at today's defaults
#   bash scripts/gpu_plan.sh thirtyfirst  # LoRA set-up GPU test, then the Qwen table at today's defaults
#   bash scripts/gpu_plan.sh twentyninth  # nf4 dequantization kernel (bits, speed); Llama ours with it and with bitsandbytes'
#   bash scripts/gpu_plan.sh twentyfirst # allocator and precompile GPU tests
#   bash scripts/gpu_plan.sh twentieth  # Llama 2048: ours+hf bench (ES deferred), ours' cold first step sampled, load cProfile
#   bash scripts/gpu_plan.sh nineteenth # allocator+precompile GPU tests; Qwen 2048 ours: helper process, default, ES deferred; hf
#   bash scripts/gpu_plan.sh tests      # GPU tests: compiled kernels + real graphs
#   bash scripts/gpu_plan.sh llama      # Llama-3.2-11B-Vision: all four systems at 2048 (same run)
#   bash scripts/gpu_plan.sh qwen       # Qwen2.5-VL-7B: ours, unsloth at 2048 and 8192 (BUDGET=s, default 540)
#   bash scripts/gpu_plan.sh generate   # bench_generate batch 1 and 8: generate, 4-bit fast_generate, ours (16-bit copy)
#   bash scripts/gpu_plan.sh llama8k    # Llama-3.2-11B-Vision at 8192: all four systems (the missing cells)
#   bash scripts/gpu_plan.sh split_four # the split's GPU tests, then (when they pass) all four systems at 2048
#   bash scripts/gpu_plan.sh split_ab   # ours with the Mllama vision-attention split (default) and without
#   bash scripts/gpu_plan.sh memory     # Llama 2048: what is alive at ours' peak, graphs on and off (memory_peak.py)
#   bash scripts/gpu_plan.sh narrow_mem # Mllama GPU tests, ours with/without the vision-MLP narrowing, memory_peak
#   bash scripts/gpu_plan.sh mem2       # ours at 2048+8192 (lean vision states), then memory_peak at both seqs
#   bash scripts/gpu_plan.sh table      # graphs GPU test; ours without expandable segments; ours + unsloth, 2048+8192
#   bash scripts/gpu_plan.sh final      # ours + unsloth at 2048+8192 (one run), then the graphs/kernel GPU tests
#   bash scripts/gpu_plan.sh probe      # Llama 2048: memory_peak + who holds the vision output after forward
#   bash scripts/gpu_plan.sh cross_ab   # GPU tests; ours default vs cross_attention_split vs lazy backward capture
#   bash scripts/gpu_plan.sh next       # graphs GPU tests; ours/unsloth/hf Llama 2048+8192 with load phases; memory at 2048
#   bash scripts/gpu_plan.sh sixth      # GPU tests + ours on both models: what the sixth session built unmeasured
#   bash scripts/gpu_plan.sh seventh    # load A/B of the device map, a profile of ours at Llama 8192
#   bash scripts/gpu_plan.sh rope_ab    # the rope patch: GPU tests, then ours with it off/on on both models
#   bash scripts/gpu_plan.sh dense_ab   # Mllama splits as dense SDPA calls vs the varlen call; ours + Unsloth table
#   bash scripts/gpu_plan.sh lean_ab    # the lean MLP recompute (default): GPU tests, then off/on on both models at 2048+8192
#   bash scripts/gpu_plan.sh lean_chunks # the lean MLP with 2048-token chunks at 8192, both models
#   bash scripts/gpu_plan.sh final_prof # kernel GPU tests, ours + unsloth at 2048+8192, a profile of ours at 8192
#   bash scripts/gpu_plan.sh attention  # text self-attention per SDPA backend, then the vision attention variants
#   bash scripts/gpu_plan.sh mva        # Mllama vision attention: masked SDPA vs the exact maskless split
#   bash scripts/gpu_plan.sh nf4        # the opt-in nf4 decode kernel against bitsandbytes, per shape
set -uo pipefail
mkdir -p /tmp/site && tar -C /tmp/site -xzf .devkit/site.tar.gz
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
out=${OUT:-/tmp/gpu_plan_out}
mkdir -p "$out"
# one bench_qlora command into /tmp/$1 (the rest of the arguments are its own), its table, CSV and log copied to
# $out/$1/, then each row's table line, first step, load and load splits printed
bench_rows() {
  local dir=/tmp/$1 name=$1
  shift
  python scripts/bench_qlora.py "$@" --out "$dir" > "$dir.txt" 2>&1
  mkdir -p "$out/$name"  # one folder per command: a case may run several
  cp "$dir/results.md" "$dir/results.csv" "$dir/workers.log" "$out/$name/"
  grep "^| [A-Z]\|caches:" "$dir/results.md" | grep -v "^| model" | cut -c1-200
  python - "$dir/results.csv" <<'PY'
import csv, sys
for r in csv.DictReader(open(sys.argv[1])):
    print(r["system"], r["seq"], r["status"], "first", r["first_step_s"][:6], "load", r["load_s"], r["load_parts"],
          r["load_splits"])
PY
}
# ours with one patch off (the JSON $1), then with the defaults, on both models at 2048+8192: an A/B of patch $2,
# with budgets $3 (off, builds the folders) and $4 (on) seconds per model
ours_off_on() {
  for m in llama32_11b_vision qwen2_5_vl_7b; do
    python scripts/bench_qlora.py --model $m --seqs 2048 8192 --systems ours --steps 6 --budget "$3" \
      --ours-patches "$1" --out /tmp/ab_off_$m > /dev/null 2>&1
    python scripts/bench_qlora.py --model $m --seqs 2048 8192 --systems ours --steps 6 --budget "$4" \
      --out /tmp/ab_on_$m > /dev/null 2>&1
    cp /tmp/ab_off_$m/results.csv "$out/${m}_$2_off.csv"; cp /tmp/ab_on_$m/results.csv "$out/${m}_$2_on.csv"
    grep "| ours" /tmp/ab_off_$m/results.md /tmp/ab_on_$m/results.md | cut -c1-200
  done
}
case "${1:-}" in
  first)  # the quick ones in one call (about 4 minutes): GPU tests, the attention microbench, the nf4 kernel
    timeout 240 python -m pytest -q tests/gpu tests/kernels 2>&1 | tail -40 > "$out/gpu_tests.txt"
    tail -5 "$out/gpu_tests.txt"
    timeout 150 python scripts/bench_mllama_vision_attention.py --tiles 1 4 --out "$out" 2>&1 | tail -10
    timeout 120 python scripts/bench_nf4_matmul.py --rows 1 8 16 --out "$out" 2>&1 | tail -14 ;;
  ninth)  # ~8 minutes: every GPU test (the rewritten rope test among them), then ours on both models: what the
    # eighth session built after its GPU time (unused_layer_kwargs, frozen-weight RMSNorm backward, join order,
    # scale-1 LoRA backward), against its table (Llama 0.499 / 1.258 s, Qwen 0.257 / 0.808 s)
    timeout 200 python -m pytest -q tests/gpu tests/kernels 2>&1 | tail -40 > "$out/gpu_tests.txt"
    tail -3 "$out/gpu_tests.txt"
    for m in llama32_11b_vision qwen2_5_vl_7b; do
      python scripts/bench_qlora.py --model $m --seqs 2048 8192 --systems ours --steps 6 --budget 150 \
        --out /tmp/n_$m > /dev/null 2>&1
      cp /tmp/n_$m/results.csv "$out/${m}_ours.csv"; grep "| ours" /tmp/n_$m/results.md | cut -c1-200
    done ;;
  tenth)  # ~9 minutes: real graphs captured in the first backward (GPU tests) and the fixed RMSNorm grid test; then
    # Llama with ours, Unsloth and hf in one command at both seqs: the capture step's peak, and load against hf
    timeout 100 python -m pytest -q tests/gpu/test_cuda_graphs_gpu.py tests/kernels/test_rms_norm.py 2>&1 | tail -12 \
      > "$out/gpu_tests.txt"; tail -1 "$out/gpu_tests.txt"
    python scripts/bench_qlora.py --model llama32_11b_vision --seqs 2048 8192 --systems ours unsloth hf --steps 6 \
      --budget 420 --out /tmp/t_main > /dev/null 2>&1
    cp /tmp/t_main/results.md /tmp/t_main/results.csv /tmp/t_main/workers.log "$out/"
    grep "| Llama" "$out/results.md" | cut -c1-200; grep "CUDA graphs\|loaded in" "$out/workers.log" | cut -c1-200 ;;
  qwen_four)  # ~8 minutes: every Qwen row of the README table from one command, then ours with the earlier capture
    # schedule (second forward) as the A/B of the first-backward capture's memory and first-step time
    python scripts/bench_qlora.py --model qwen2_5_vl_7b --seqs 2048 8192 --systems ours unsloth hf liger --steps 6 \
      --budget 420 --out /tmp/q4 > /dev/null 2>&1
    cp /tmp/q4/results.md /tmp/q4/results.csv /tmp/q4/workers.log "$out/"
    grep "| Qwen" "$out/results.md" | cut -c1-200; grep "CUDA graphs\|loaded in" "$out/workers.log" | cut -c1-200
    python scripts/bench_qlora.py --model qwen2_5_vl_7b --seqs 2048 8192 --systems ours --steps 6 --budget 100 \
      --ours-patches '{"cuda_graphs_capture": "second_forward"}' --out /tmp/q_sf > /dev/null 2>&1
    cp /tmp/q_sf/results.csv "$out/ours_second_forward.csv"; grep "| ours" /tmp/q_sf/results.md | cut -c1-200 ;;
  first_steps)  # ~4 minutes: why the first-backward capture made Qwen's first step 20 s on a fresh machine (second
    # forward: 7.4 s, but it ran later, after the machine's CUDA JIT cache had filled): each schedule twice, with its
    # own Triton cache and CUDA JIT cache (cold, then warm), second_forward first this time; every thread's stacks
    # sampled, the phases timed and Triton's compilations timed per thread
    python scripts/bench_scaling.py prepare --model qwen2_5_vl_7b --seq 2048 > /dev/null 2>&1
    for s in second_forward first_backward; do for t in cold warm; do
      TRITON_CACHE_DIR=/tmp/tc_$s CUDA_CACHE_PATH=/tmp/nvc_$s timeout 100 python scripts/first_steps.py \
        --model qwen2_5_vl_7b --seq 2048 --patches "{\"cuda_graphs_capture\": \"$s\"}" --out "$out/${s}_$t" 2>&1 \
        | grep "^step\|ours" | head -12
    done; done ;;
  eleventh)  # ~6 minutes: first_steps above (both capture schedules, cold then warm, second_forward first), then
    # where ours' and hf's Qwen load time goes, under cProfile (ours' LoRA phase took 1.7 s against hf's 1.0 s)
    bash "$0" first_steps
    for s in ours hf; do
      timeout 90 python scripts/profile_load.py --model qwen2_5_vl_7b --system $s --top 30 --out "$out" 2>&1 \
        | grep -v "Loading weights" | head -75 > "$out/profile_load_$s.txt"
      head -1 "$out/profile_load_$s.txt"
    done ;;
  sdpa_first_call)  # ~1 minute: each SDPA backend's first and steady forward+backward at the bench models'
    # attention shapes, with an empty then a warm CUDA JIT cache (run once 2026-12-02, h200_2026-12-02f_twelfth/)
    timeout 120 python scripts/bench_sdpa_first_call.py --out "$out" 2>&1 | tail -8 ;;
  llama_table)  # ~10 minutes: the Llama table, four systems at 2048+8192, each with its own empty caches
    python scripts/bench_qlora.py --model llama32_11b_vision --seqs 2048 8192 --systems ours unsloth hf liger \
      --steps 6 --budget 545 --out /tmp/l12 > /dev/null 2>&1
    cp /tmp/l12/results.md /tmp/l12/results.csv /tmp/l12/workers.log "$out/"
    grep "| Llama\|caches:" "$out/results.md" | cut -c1-200 ;;
  thirteenth)  # ~9.5 minutes: the Llama table (four systems at 2048+8192, each with its own empty caches, after the
    # warm-up process), then ours alone on Qwen at 2048+8192 (the twelfth command's ours ran the since-removed flash
    # order for the vision attention, whose sdpa_kernel priority outlived its context: text attention at 8192 slowed)
    python scripts/bench_qlora.py --model llama32_11b_vision --seqs 2048 8192 --systems ours unsloth hf liger \
      --steps 6 --budget 450 --out /tmp/l13 > /tmp/l13.txt 2>&1
    cp /tmp/l13/results.md /tmp/l13/results.csv /tmp/l13/workers.log "$out/"
    grep "| Llama\|caches:" "$out/results.md" | cut -c1-200; grep "warm-up" /tmp/l13.txt
    python scripts/bench_qlora.py --model qwen2_5_vl_7b --seqs 2048 8192 --systems ours --steps 6 --budget 120 \
      --warmup off --out /tmp/q13 > /dev/null 2>&1
    cp /tmp/q13/results.csv "$out/qwen_ours.csv"; grep "| Qwen" /tmp/q13/results.md | cut -c1-200 ;;
  sync_check)  # ~2.5 minutes: ours and hf on Qwen 2048 (3 steps), the checkpoint built fresh, then os.sync() and the
    # warm-up before the first system: is ours' first step (13.9 vs 19.6 s) and load (vs hf) an order effect?
    timeout 150 python scripts/bench_qlora.py --model qwen2_5_vl_7b --seqs 2048 --systems ours hf --steps 3 \
      --budget 140 --out /tmp/sc > /tmp/sc.txt 2>&1
    cp /tmp/sc/results.md /tmp/sc/results.csv /tmp/sc/workers.log "$out/" 2>/dev/null
    grep "os.sync\|warm-up\|| Qwen" /tmp/sc.txt | cut -c1-200 ;;
  fourteenth)  # ~7 minutes: every GPU test (owed since the first-backward capture became the default), then ours and
    # hf on Qwen 2048 (3 steps, fresh caches, warm-up): which part of ours' LoRA set-up is slow on the GPU
    # (load_splits) and the Triton share of each first step (first_step_triton)
    timeout 300 python -m pytest -q tests/gpu tests/kernels 2>&1 | tail -40 > "$out/gpu_tests.txt"
    tail -4 "$out/gpu_tests.txt"
    timeout 170 python scripts/bench_qlora.py --model qwen2_5_vl_7b --seqs 2048 --systems ours hf --steps 3 \
      --budget 160 --out /tmp/f14 > /tmp/f14.txt 2>&1
    cp /tmp/f14/results.md /tmp/f14/results.csv /tmp/f14/workers.log "$out/" 2>/dev/null
    grep "os.sync\|warm-up\|| Qwen" /tmp/f14.txt | cut -c1-200
    python - <<'PY'
import csv, os
for r in csv.DictReader(open("/tmp/f14/results.csv")):
    print(r["system"], "load_parts", r["load_parts"], "splits", r["load_splits"], "triton", r["first_step_triton"])
PY
    ;;
  fifteenth)  # ~9 minutes: the graphs GPU tests (the forward warm-up now once per layer class and signature), then
    # every Qwen row of the table from one command (four systems, fresh caches, warm-up)
    timeout 80 python -m pytest -q tests/gpu/test_cuda_graphs_gpu.py 2>&1 | tail -6 > "$out/gpu_tests.txt"
    tail -1 "$out/gpu_tests.txt"
    python scripts/bench_qlora.py --model qwen2_5_vl_7b --seqs 2048 8192 --systems ours unsloth hf liger --steps 6 \
      --budget 440 --out /tmp/q15 > /dev/null 2>&1
    cp /tmp/q15/results.md /tmp/q15/results.csv /tmp/q15/workers.log "$out/"
    grep "| Qwen\|caches:" "$out/results.md" | cut -c1-200; grep "CUDA graphs" "$out/workers.log" | cut -c1-200
    python - <<'PY'
import csv
for r in csv.DictReader(open("/tmp/q15/results.csv")):
    print(r["system"], r["seq"], "load", r["load_parts"], r["load_splits"], "triton", r["first_step_triton"])
PY
    ;;
  llama_prof)  # ~4 minutes: where ours' Llama 2048 step goes (the one cell under its target): torch.profiler over 3
    # steps after 3 warm-up steps, with a trace (the checkpoint built first: a fresh machine has none)
    python scripts/bench_scaling.py prepare --model llama32_11b_vision --seq 2048 > /dev/null 2>&1
    timeout 300 python scripts/profile_step.py --model llama32_11b_vision --seq 2048 --warmup 3 --steps 3 --trace \
      --out "$out/profile_2048" 2>&1 | tail -2
    gzip -f "$out/profile_2048/trace.json" 2>/dev/null; head -30 "$out/profile_2048/profile_cuda.txt" | cut -c1-160 ;;
  sixteenth)  # ~9.5 minutes: the Llama table (four systems at 2048+8192, fresh caches, warm-up; ~6 minutes), then a
    # torch.profiler trace of ours at 2048 (the one cell under its target) on the same checkpoint
    python scripts/bench_qlora.py --model llama32_11b_vision --seqs 2048 8192 --systems ours unsloth hf liger \
      --steps 6 --budget 430 --out /tmp/l16 > /tmp/l16.txt 2>&1
    cp /tmp/l16/results.md /tmp/l16/results.csv /tmp/l16/workers.log "$out/"
    grep "| Llama\|caches:" "$out/results.md" | cut -c1-200; grep "CUDA graphs" "$out/workers.log" | cut -c1-200
    python - <<'PY'
import csv
for r in csv.DictReader(open("/tmp/l16/results.csv")):
    if r["seq"] == "2048":
        print(r["system"], "load", r["load_parts"], r["load_splits"], "triton", r["first_step_triton"], "gc", r["gc_s"])
PY
    timeout 140 python scripts/profile_step.py --model llama32_11b_vision --seq 2048 --warmup 3 --steps 3 --trace \
      --out "$out/profile_2048" 2>&1 | tail -1 | cut -c1-400
    gzip -f "$out/profile_2048/trace.json" 2>/dev/null; head -24 "$out/profile_2048/profile_cuda.txt" | cut -c1-160 ;;
  seventeenth)  # ~4 minutes: the background Triton compilation's GPU test (the first step compiles none of the
    # covered kernels, fresh processes and caches; the eleventh session's 60 s were too few), then ours alone on
    # Qwen 2048 (3 steps) with it on (opt-in since): first step and first_step_triton against the fifteenth
    # command's 13.4 s and 11 compilations (2.37 s). Measured: 9.7 s, 4 compilations, load 7.9 s
    timeout 150 python -m pytest -q tests/gpu/test_precompile_gpu.py 2>&1 | tail -15 > "$out/gpu_tests.txt"
    tail -1 "$out/gpu_tests.txt"
    timeout 120 python scripts/bench_qlora.py --model qwen2_5_vl_7b --seqs 2048 --systems ours --steps 3 \
      --ours-patches '{"precompile": true}' --budget 115 --out /tmp/q17 > /tmp/q17.txt 2>&1
    cp /tmp/q17/results.md /tmp/q17/results.csv /tmp/q17/workers.log "$out/" 2>/dev/null
    grep "| Qwen" /tmp/q17/results.md | cut -c1-200
    python - <<'PY'
import csv
for r in csv.DictReader(open("/tmp/q17/results.csv")):
    print(r["system"], "load", r["load_parts"], r["load_splits"], "triton", r["first_step_triton"], "gc", r["gc_s"])
PY
    ;;
  eighteenth)  # ~10 minutes: the Mllama split GPU tests (the row permutation now selects rows, its backward by the
    # inverse), then the Llama table at the current code, Unsloth last (the last worker gets all the time left:
    # in the sixteenth command its share, 176 s, was too short on a slow machine)
    timeout 60 python -m pytest -q tests/gpu/test_mllama_split_gpu.py 2>&1 | tail -6 > "$out/gpu_tests.txt"
    tail -1 "$out/gpu_tests.txt"
    python scripts/bench_qlora.py --model llama32_11b_vision --seqs 2048 8192 --systems ours hf liger unsloth \
      --steps 6 --budget 525 --out /tmp/l18 > /tmp/l18.txt 2>&1
    cp /tmp/l18/results.md /tmp/l18/results.csv /tmp/l18/workers.log "$out/"
    grep "| Llama\|caches:" "$out/results.md" | cut -c1-200 ;;
  nineteenth)  # ~8 minutes: the allocator and precompile GPU tests, then ours alone on Qwen 2048 (3 steps, fresh
    # caches each): the precompile helper process, the default, expandable segments deferred to training (the load
    # gap's suspect: page mapping per allocation), and the hf recipe's load for reference (5.6 s vs 4.8 s in the
    # fifteenth command; threads precompile measured 9.7 s first step / 7.9 s load)
    timeout 60 python -m pytest -q tests/gpu/test_allocator_gpu.py 2>&1 | tail -8 > "$out/gpu_tests_alloc.txt"
    tail -1 "$out/gpu_tests_alloc.txt"
    timeout 200 python -m pytest -q tests/gpu/test_precompile_gpu.py 2>&1 | tail -15 > "$out/gpu_tests.txt"
    tail -1 "$out/gpu_tests.txt"
    python scripts/bench_qlora.py --model qwen2_5_vl_7b --seqs 2048 --systems ours --steps 3 --budget 100 \
      --ours-patches '{"precompile": "process"}' --out /tmp/q19p > /dev/null 2>&1
    python scripts/bench_qlora.py --model qwen2_5_vl_7b --seqs 2048 --systems ours --steps 3 --budget 80 \
      --warmup off --out /tmp/q19d > /dev/null 2>&1
    HF_FASTVISION_EXPANDABLE_SEGMENTS=train python scripts/bench_qlora.py --model qwen2_5_vl_7b --seqs 2048 \
      --systems ours --steps 3 --budget 80 --warmup off --out /tmp/q19t > /dev/null 2>&1
    python scripts/bench_qlora.py --model qwen2_5_vl_7b --seqs 2048 --systems hf --steps 3 --budget 80 \
      --warmup off --out /tmp/q19h > /dev/null 2>&1
    for d in q19p q19d q19t q19h; do cp /tmp/$d/results.csv "$out/$d.csv"; grep "| Qwen" /tmp/$d/results.md | cut -c1-150; done
    python - <<'PY'
import csv
for d in ("q19p", "q19d", "q19t", "q19h"):
    for r in csv.DictReader(open(f"/tmp/{d}/results.csv")):
        print(d, r["system"], "load", r["load_parts"], r["load_splits"], "reserved", r["peak_reserved_gib"],
              r["end_reserved_gib"], "triton", r["first_step_triton"])
PY
    ;;
  twentieth)  # ~8 minutes: Llama 2048, the two targets still missed there, with expandable segments now deferred to
    # training (the default since the nineteenth command: Qwen's load 6.0 -> 4.9 s, the recipe's 5.4 s). ours and hf
    # side by side (load against the recipe's in one command; ours' step against the eighteenth command's 0.474 s),
    # then where ours' cold first step goes (17.8 s in the eighteenth command, Triton 2.3 s of it; fresh Triton,
    # Inductor and CUDA JIT caches, every thread's stacks sampled), then ours' and hf's load under cProfile
    python scripts/bench_qlora.py --model llama32_11b_vision --seqs 2048 --systems ours hf --steps 6 --budget 320 \
      --out /tmp/l20 > /tmp/l20.txt 2>&1
    cp /tmp/l20/results.md /tmp/l20/results.csv /tmp/l20/workers.log "$out/" 2>/dev/null
    grep "| Llama\|caches:" /tmp/l20/results.md | cut -c1-150; grep "allocator" /tmp/l20/workers.log
    python - <<'PY'
import csv
for r in csv.DictReader(open("/tmp/l20/results.csv")):
    print(r["system"], "load", r["load_parts"], r["load_splits"], "triton", r["first_step_triton"], "gc", r["gc_s"])
PY
    TRITON_CACHE_DIR=/tmp/tc20 CUDA_CACHE_PATH=/tmp/nvc20 TORCHINDUCTOR_CACHE_DIR=/tmp/ind20 timeout 120 \
      python scripts/first_steps.py --model llama32_11b_vision --seq 2048 --steps 2 --top 30 \
      --out "$out/first_steps_cold" 2>&1 | grep "^step\|innermost" | head -64 > "$out/first_steps.txt"
    head -20 "$out/first_steps.txt" | cut -c1-140
    for s in ours hf; do
      timeout 60 python scripts/profile_load.py --model llama32_11b_vision --system $s --top 40 --out "$out/load_$s" \
        > "$out/profile_load_$s.txt" 2>&1
      grep "^\[" "$out/profile_load_$s.txt" | cut -c1-200
    done ;;
  twentyfirst)  # ~4 minutes: the allocator GPU test (the runtime setter now torch's accelerator one: the CUDA one
    # warned of its deprecation in the twentieth command) and the precompile GPU test (the norm warm-up now runs
    # both row-count variants: in the nineteenth command the tiny step rebuilt the norm's backward)
    timeout 50 python -m pytest -q tests/gpu/test_allocator_gpu.py 2>&1 | tail -8 > "$out/gpu_tests_alloc.txt"
    tail -1 "$out/gpu_tests_alloc.txt"
    timeout 170 python -m pytest -q tests/gpu/test_precompile_gpu.py 2>&1 | tail -15 > "$out/gpu_tests.txt"
    tail -4 "$out/gpu_tests.txt" | cut -c1-300 ;;
  twentysecond)  # ~8 minutes: does deferring expandable segments to training cost ours' step anything? (Qwen 2048
    # in the nineteenth command: 0.273 s deferred against 0.255 s from import, one step each.) 8 steps of each
    # setting, alternating, the precompile helper process twice (first step, load), then the recipe's load for
    # reference; host_probe_ms tells the machine's speed
    python scripts/bench_qlora.py --model qwen2_5_vl_7b --seqs 2048 --systems ours --steps 8 --budget 170 \
      --out /tmp/q22t > /dev/null 2>&1
    HF_FASTVISION_EXPANDABLE_SEGMENTS=import python scripts/bench_qlora.py --model qwen2_5_vl_7b --seqs 2048 \
      --systems ours --steps 8 --budget 70 --warmup off --out /tmp/q22i > /dev/null 2>&1
    python scripts/bench_qlora.py --model qwen2_5_vl_7b --seqs 2048 --systems ours --steps 8 --budget 80 \
      --warmup off --ours-patches '{"precompile": "process"}' --out /tmp/q22p > /dev/null 2>&1
    python scripts/bench_qlora.py --model qwen2_5_vl_7b --seqs 2048 --systems ours --steps 8 --budget 70 \
      --warmup off --out /tmp/q22t2 > /dev/null 2>&1
    python scripts/bench_qlora.py --model qwen2_5_vl_7b --seqs 2048 --systems ours --steps 8 --budget 80 \
      --warmup off --ours-patches '{"precompile": "process"}' --out /tmp/q22p2 > /dev/null 2>&1
    python scripts/bench_qlora.py --model qwen2_5_vl_7b --seqs 2048 --systems hf --steps 4 --budget 70 \
      --warmup off --out /tmp/q22h > /dev/null 2>&1
    for d in q22t q22i q22p q22t2 q22p2 q22h; do cp /tmp/$d/results.csv "$out/$d.csv"; grep "| Qwen" /tmp/$d/results.md | cut -c1-120; done
    python - <<'PY'
import csv
for d in ("q22t", "q22i", "q22p", "q22t2", "q22p2", "q22h"):
    for r in csv.DictReader(open(f"/tmp/{d}/results.csv")):
        print(d, r["system"], "steps", r["steps_s"][:80], "load", r["load_splits"], "host", r["host_probe_ms"],
              "triton1", r.get("first_step_triton"))
PY
    ;;
  twentythird)  # ~10 minutes: the Llama table at the current code (four systems, fresh caches, warm-up, Unsloth last;
    # expandable segments deferred to training, the default since the twentieth command)
    python scripts/bench_qlora.py --model llama32_11b_vision --seqs 2048 8192 --systems ours hf liger unsloth \
      --steps 6 --budget 540 --out /tmp/l23 > /tmp/l23.txt 2>&1
    cp /tmp/l23/results.md /tmp/l23/results.csv /tmp/l23/workers.log "$out/"
    grep "| Llama\|caches:" "$out/results.md" | cut -c1-200
    python - <<'PY'
import csv
for r in csv.DictReader(open("/tmp/l23/results.csv")):
    print(r["system"], r["seq"], "load", r["load_splits"], "triton", r["first_step_triton"], "host", r["host_probe_ms"])
PY
    ;;
  twentyfourth)  # ~9 minutes: the Qwen table at the current code (four systems, fresh caches, warm-up)
    python scripts/bench_qlora.py --model qwen2_5_vl_7b --seqs 2048 8192 --systems ours unsloth hf liger --steps 6 \
      --budget 400 --out /tmp/q24 > /tmp/q24.txt 2>&1
    cp /tmp/q24/results.md /tmp/q24/results.csv /tmp/q24/workers.log "$out/"
    grep "| Qwen\|caches:" "$out/results.md" | cut -c1-200
    python - <<'PY'
import csv
for r in csv.DictReader(open("/tmp/q24/results.csv")):
    print(r["system"], r["seq"], "load", r["load_splits"], "triton", r["first_step_triton"], "host", r["host_probe_ms"])
PY
    ;;
  twentyfifth)  # ~9 minutes: (1) the precompile GPU test with the rotary kernel covered; (2) the order effect on
    # load and first step: both table commands of the thirteenth session ran ours first, on a host twice as slow
    # (host_probe_ms 9-15) as later in the same command; here the recipe goes first, then ours; (3) the pinned
    # host buffers of the offloaded checkpoint (0.97 s of Llama's first step) through cudaHostRegister in 8
    # threads instead of cudaHostAlloc, against the same allocator variable without it (both set from the start);
    # (4), (5) below
    timeout 200 python -m pytest -q tests/gpu/test_precompile_gpu.py 2>&1 | tail -15 > "$out/gpu_tests.txt"
    tail -1 "$out/gpu_tests.txt"
    python scripts/bench_qlora.py --model qwen2_5_vl_7b --seqs 2048 --systems hf ours --steps 4 --budget 170 \
      --out /tmp/q25o > /dev/null 2>&1
    PYTORCH_ALLOC_CONF=expandable_segments:True python scripts/bench_qlora.py --model qwen2_5_vl_7b --seqs 2048 \
      --systems ours --steps 4 --budget 70 --warmup off --out /tmp/q25a > /dev/null 2>&1
    PYTORCH_ALLOC_CONF=expandable_segments:True,pinned_use_cuda_host_register:True,pinned_num_register_threads:8 \
      python scripts/bench_qlora.py --model qwen2_5_vl_7b --seqs 2048 --systems ours --steps 4 --budget 70 \
      --warmup off --out /tmp/q25r > /dev/null 2>&1
    # (4) ours' one load difference from the recipe's call: device_map "sequential" (accelerate's planner) vs {"": 0}
    python scripts/bench_qlora.py --model qwen2_5_vl_7b --seqs 2048 --systems ours --steps 4 --budget 70 \
      --warmup off --ours-device-map '{"": 0}' --out /tmp/q25d > /dev/null 2>&1
    # (5) the precompile helper process, now niced (load 7.7-9.4 s and peft's injection 4.4-5.7 s in twentysecond)
    python scripts/bench_qlora.py --model qwen2_5_vl_7b --seqs 2048 --systems ours --steps 4 --budget 80 \
      --warmup off --ours-patches '{"precompile": "process"}' --out /tmp/q25p > /dev/null 2>&1
    for d in q25o q25a q25r q25d q25p; do cp /tmp/$d/results.csv "$out/$d.csv"; grep "| Qwen" /tmp/$d/results.md | cut -c1-120; done
    python - <<'PY'
import csv
for d in ("q25o", "q25a", "q25r", "q25d", "q25p"):
    for r in csv.DictReader(open(f"/tmp/{d}/results.csv")):
        print(d, r["system"], "first", r["first_step_s"][:6], "load", r["load_parts"], r["load_splits"],
              "host", r["host_probe_ms"], "triton1", r.get("first_step_triton"))
PY
    ;;
  twentysixth)  # ~8 minutes: the Qwen table with the fast LoRA set-up (default since this command; the recipe first),
    # then ours at 2048 with the precompile helper process (its injection slowdown came from peft's 712 blocking
    # copies while a second CUDA context works?) and with peft's own LoRA set-up, for the A/B
    python scripts/bench_qlora.py --model qwen2_5_vl_7b --seqs 2048 8192 --systems hf ours unsloth liger --steps 6 \
      --budget 385 --out /tmp/q26 > /tmp/q26.txt 2>&1
    cp /tmp/q26/results.md /tmp/q26/results.csv /tmp/q26/workers.log "$out/"
    grep "| Qwen\|caches:" "$out/results.md" | cut -c1-200
    python scripts/bench_qlora.py --model qwen2_5_vl_7b --seqs 2048 --systems ours --steps 4 --budget 70 \
      --warmup off --ours-patches '{"precompile": "process"}' --out /tmp/q26p > /dev/null 2>&1
    python scripts/bench_qlora.py --model qwen2_5_vl_7b --seqs 2048 --systems ours --steps 4 --budget 70 \
      --warmup off --ours-lora-init peft --out /tmp/q26i > /dev/null 2>&1
    for d in q26p q26i; do cp /tmp/$d/results.csv "$out/$d.csv"; grep "| Qwen" /tmp/$d/results.md | cut -c1-120; done
    python - <<'PY'
import csv
for d in ("q26", "q26p", "q26i"):
    for r in csv.DictReader(open(f"/tmp/{d}/results.csv")):
        print(d, r["system"], r["seq"], "first", r["first_step_s"][:6], "load", r["load_parts"], r["load_splits"],
              "host", r["host_probe_ms"], "triton1", r.get("first_step_triton"), "losses", r["losses"][:60])
PY
    ;;
  twentyseventh)  # ~9 minutes: the Llama table, the recipe first, with the fast LoRA set-up really on (in twentysixth
    # the bench's timing wrapper hid peft's low_cpu_mem_usage argument, so ours took peft's path), then ours at 2048
    # with the precompile helper process
    python scripts/bench_qlora.py --model llama32_11b_vision --seqs 2048 8192 --systems hf ours liger unsloth \
      --steps 6 --budget 450 --out /tmp/l27 > /tmp/l27.txt 2>&1
    cp /tmp/l27/results.md /tmp/l27/results.csv /tmp/l27/workers.log "$out/"
    grep "| Llama\|caches:" "$out/results.md" | cut -c1-200
    python scripts/bench_qlora.py --model llama32_11b_vision --seqs 2048 --systems ours --steps 4 --budget 75 \
      --warmup off --ours-patches '{"precompile": "process"}' --out /tmp/l27p > /dev/null 2>&1
    cp /tmp/l27p/results.csv "$out/l27p.csv"; grep "| Llama" /tmp/l27p/results.md | cut -c1-120
    python - <<'PY'
import csv
for d in ("l27", "l27p"):
    for r in csv.DictReader(open(f"/tmp/{d}/results.csv")):
        print(d, r["system"], r["seq"], "first", r["first_step_s"][:6], "load", r["load_parts"], r["load_splits"],
              "host", r["host_probe_ms"], "triton1", r.get("first_step_triton"), "losses", r["losses"][:60])
PY
    ;;
  thirtyninth)  # ~5 minutes: the Qwen table at 2048 only (what the session's last device time fits), all four
    # systems at the final code of 2026-12-04, the recipe first
    bench_rows q39 --model qwen2_5_vl_7b --seqs 2048 --systems hf ours liger unsloth --steps 5 --budget 290
    ;;
  thirtyeighth)  # ~9 minutes: the Llama table at the final code of 2026-12-04 (A drawn while kernels and training
    # are set up), all four systems, the recipe first
    bench_rows l38 --model llama32_11b_vision --seqs 2048 8192 --systems hf ours liger unsloth --steps 6 --budget 470
    ;;
  thirtyseventh)  # ~7 minutes: the LoRA set-up now binds kernels and sets up training while A is drawn (GPU test
    # first), Qwen 2048 recipe + ours in both orders, a cProfile of each system's load, then Llama 2048 recipe + ours
    timeout 90 python -m pytest -q tests/gpu/test_lora_init_gpu.py 2>&1 | tail -15 > "$out/gpu_tests.txt"
    tail -1 "$out/gpu_tests.txt"
    bench_rows q37 --model qwen2_5_vl_7b --seqs 2048 --systems hf ours --steps 3 --budget 150
    bench_rows q37r --model qwen2_5_vl_7b --seqs 2048 --systems ours hf --steps 3 --budget 120
    mkdir -p "$out/profile"
    for s in hf ours; do
      timeout 60 python scripts/profile_load.py --model qwen2_5_vl_7b --system $s --top 30 --out "$out/profile" \
        > "$out/profile_$s.txt" 2>&1
      grep "^\[$s\] load" "$out/profile_$s.txt"
    done
    bench_rows l37 --model llama32_11b_vision --seqs 2048 --systems hf ours --steps 3 --budget 200
    ;;
  thirtysixth)  # ~8 minutes: load at the final code: Llama 2048 (recipe, ours), then Qwen 2048 (recipe, ours)
    bench_rows l36 --model llama32_11b_vision --seqs 2048 --systems hf ours --steps 3 --budget 270
    bench_rows q36 --model qwen2_5_vl_7b --seqs 2048 --systems hf ours --steps 3 --budget 200
    ;;
  thirtyfifth)  # ~4 minutes: thirtyfourth, then thirtythird (one machine start for both)
    bash "$0" thirtyfourth
    bash "$0" thirtythird
    ;;
  thirtyfourth)  # ~1 minute: the LoRA set-up's GPU test with the uint8 discard draws, then the draw's speed on
    # this host (Qwen2.5-VL-7B's 356 layer shapes, r=16): two calls per layer against peft's three inits
    timeout 70 python -m pytest -q tests/gpu/test_lora_init_gpu.py 2>&1 | tail -15 > "$out/gpu_tests.txt"
    tail -1 "$out/gpu_tests.txt"
    timeout 30 python - <<'PY' 2>&1 | tail -5 | tee "$out/draw_speed.txt"
import time
from hf_fastvision.training import lora_init as li
shapes = [(3584, 3584), (3584, 512), (3584, 512), (3584, 3584), (3584, 18944), (3584, 18944), (18944, 3584)] * 28
shapes += [(1280, 3840), (1280, 1280), (1280, 3420), (1280, 3420), (3420, 1280)] * 32 + [(5120, 5120), (5120, 3584)]
print("aligned", li._two_calls_aligned(), "layers", len(shapes))
for _ in range(2):
    t = time.perf_counter(); a = li.draw_lora_a(shapes, 16, 3407); t1 = time.perf_counter() - t
    t = time.perf_counter(); b = li.draw_lora_a_reference(shapes, 16, 3407); t2 = time.perf_counter() - t
    print(f"two calls {t1:.3f} s, peft's three inits {t2:.3f} s, equal {bool((a == b).all())}")
PY
    ;;
  thirtythird)  # ~3 minutes: Qwen 2048, the recipe then ours at the final code of 2026-12-04 (LoRA draws in two
    # uniform_ calls per layer, in a thread): load and first step in one command
    bench_rows q33 --model qwen2_5_vl_7b --seqs 2048 --systems hf ours --steps 3 --budget 250
    ;;
  thirtysecond)  # ~5 minutes: the LoRA set-up's GPU test, then Qwen 2048 load A/B: the recipe, then ours with the
    # draws in a thread / inline (alternated, twice), and inline without the precompile helper (2 steps each)
    timeout 90 python -m pytest -q tests/gpu/test_lora_init_gpu.py 2>&1 | tail -15 > "$out/gpu_tests.txt"
    tail -1 "$out/gpu_tests.txt"
    python scripts/bench_qlora.py --model qwen2_5_vl_7b --seqs 2048 --systems hf --steps 2 --budget 100 \
      --out /tmp/q32_hf > /dev/null 2>&1
    cp /tmp/q32_hf/results.csv "$out/hf.csv"
    for v in thread inline thread inline; do
      HF_FASTVISION_LORA_DRAW=$v python scripts/bench_qlora.py --model qwen2_5_vl_7b --seqs 2048 --systems ours \
        --steps 2 --budget 60 --warmup off --out /tmp/q32_$v > /dev/null 2>&1
      cat /tmp/q32_$v/results.csv >> "$out/ours_$v.csv"
    done
    HF_FASTVISION_LORA_DRAW=inline python scripts/bench_qlora.py --model qwen2_5_vl_7b --seqs 2048 --systems ours \
      --steps 2 --budget 60 --warmup off --ours-patches '{"precompile": false}' --out /tmp/q32_nohelper > /dev/null 2>&1
    cp /tmp/q32_nohelper/results.csv "$out/ours_inline_nohelper.csv"
    python - "$out" <<'PY'
import csv, glob, sys
for f in sorted(glob.glob(sys.argv[1] + "/*.csv")):
    for r in csv.DictReader(open(f)):
        if r.get("system") in ("hf", "ours"):
            print(f.rsplit("/", 1)[1], r["system"], "load", r["load_s"][:5], r["load_parts"], r["load_splits"])
PY
    ;;
  thirtieth)  # ~9 minutes: the Llama table at today's defaults (nf4 dequantization kernel, real-first vision rows,
    # chunked unit draws for the LoRA set-up), all four systems, the recipe first
    bench_rows l30 --model llama32_11b_vision --seqs 2048 8192 --systems hf ours liger unsloth --steps 6 --budget 470
    ;;
  thirtyfirst)  # ~9 minutes: the LoRA set-up's GPU test (unit numbers scaled on the GPU), then the Qwen table at
    # today's defaults, all four systems, the recipe first
    timeout 90 python -m pytest -q tests/gpu/test_lora_init_gpu.py 2>&1 | tail -15 > "$out/gpu_tests.txt"
    tail -1 "$out/gpu_tests.txt"
    bench_rows q31 --model qwen2_5_vl_7b --seqs 2048 8192 --systems hf ours liger unsloth --steps 6 --budget 440
    ;;
  twentyninth)  # ~4 minutes: the nf4 dequantization kernel on CUDA (the same bits as bitsandbytes, and its speed),
    # the Mllama split GPU test (the encoder now orders the rows real-first once), then ours alone on the Llama table
    # shapes with the kernel, and again with bitsandbytes' dequantization (both with the encoder change)
    timeout 150 python -m pytest -q tests/kernels/test_nf4_dequantize.py tests/kernels/test_lora_linear_4bit.py \
      tests/gpu/test_mllama_split_gpu.py 2>&1 | tail -15 > "$out/gpu_tests.txt"
    tail -1 "$out/gpu_tests.txt"
    timeout 120 python scripts/bench_nf4_dequantize.py --out "$out" 2>&1 | tail -11
    python scripts/bench_qlora.py --model llama32_11b_vision --seqs 2048 8192 --systems ours --steps 6 --budget 150 \
      --out /tmp/l29 > /tmp/l29.txt 2>&1
    cp /tmp/l29/results.md "$out/results.md"; cp /tmp/l29/workers.log "$out/workers.log"
    grep "| Llama" /tmp/l29/results.md | cut -c1-200
    HF_FASTVISION_NF4_DEQUANTIZE=bitsandbytes python scripts/bench_qlora.py --model llama32_11b_vision \
      --seqs 2048 8192 --systems ours --steps 6 --budget 120 --warmup off --out /tmp/l29b > /tmp/l29b.txt 2>&1
    cp /tmp/l29b/results.md "$out/results_bnb_dequant.md"
    grep "| Llama" /tmp/l29b/results.md | cut -c1-200
    ;;
  twentyeighth)  # ~3 minutes: Qwen 2048, the recipe then ours at this session's defaults (meta-device LoRA set-up,
    # the precompile helper process): load and first step in one command; first the fast LoRA set-up's GPU test
    timeout 90 python -m pytest -q tests/gpu/test_lora_init_gpu.py 2>&1 | tail -15 > "$out/gpu_tests.txt"
    tail -1 "$out/gpu_tests.txt"
    python scripts/bench_qlora.py --model qwen2_5_vl_7b --seqs 2048 --systems hf ours --steps 4 --budget 165 \
      --out /tmp/q28 > /tmp/q28.txt 2>&1
    cp /tmp/q28/results.md /tmp/q28/results.csv /tmp/q28/workers.log "$out/"
    grep "| Qwen\|caches:" "$out/results.md" | cut -c1-200
    python - <<'PY'
import csv
for r in csv.DictReader(open("/tmp/q28/results.csv")):
    print(r["system"], r["seq"], "first", r["first_step_s"][:6], "load", r["load_parts"], r["load_splits"],
          "host", r["host_probe_ms"], "triton1", r.get("first_step_triton"))
PY
    ;;
  tests)
    timeout 540 python -m pytest -q tests/gpu tests/kernels 2>&1 | tail -40 > "$out/gpu_tests.txt"
    cat "$out/gpu_tests.txt" ;;
  llama)
    python scripts/bench_qlora.py --model llama32_11b_vision --seqs 2048 --systems ours unsloth hf liger --steps 6 \
      --budget 540 --out /tmp/llama > /dev/null 2>&1
    cp /tmp/llama/results.md /tmp/llama/results.csv /tmp/llama/workers.log "$out/"
    tail -5 "$out/results.md"; grep "CUDA graphs" "$out/workers.log" ;;
  qwen)
    python scripts/bench_qlora.py --model qwen2_5_vl_7b --seqs 2048 8192 --systems ours unsloth --steps 8 \
      --budget "${BUDGET:-540}" --out /tmp/qwen > /dev/null 2>&1
    cp /tmp/qwen/results.md /tmp/qwen/results.csv /tmp/qwen/workers.log "$out/"
    tail -6 "$out/results.md"; grep "CUDA graphs" "$out/workers.log" ;;
  generate)
    timeout 540 python scripts/bench_generate.py --batches 1 8 --new-tokens 256 --repeats 2 \
      --systems generate fast_generate_4bit fast_generate --out /tmp/gen 2>&1 | grep -v "warn" | tail -15
    cp /tmp/gen/*.md /tmp/gen/*.csv /tmp/gen/*.json "$out/" 2>/dev/null ;;
  llama8k)
    python scripts/bench_qlora.py --model llama32_11b_vision --seqs 8192 --systems ours unsloth hf liger --steps 5 \
      --budget 540 --out /tmp/llama8k > /dev/null 2>&1
    cp /tmp/llama8k/results.md /tmp/llama8k/results.csv /tmp/llama8k/workers.log "$out/"
    tail -6 "$out/results.md" ;;
  split_four)
    timeout 90 python -m pytest -q tests/gpu/test_mllama_split_gpu.py 2>&1 | tail -15 > "$out/split_tests.txt"
    tail -3 "$out/split_tests.txt"
    if grep -q " passed" "$out/split_tests.txt" && ! grep -q "failed" "$out/split_tests.txt"; then
      python scripts/bench_qlora.py --model llama32_11b_vision --seqs 2048 --systems ours unsloth hf liger --steps 6 \
        --budget 480 --out /tmp/llama > /dev/null 2>&1
      cp /tmp/llama/results.md /tmp/llama/results.csv /tmp/llama/workers.log "$out/"
      tail -5 "$out/results.md"; grep "CUDA graphs" "$out/workers.log"
    fi ;;
  split_ab)  # ours (split on, the default) and ours with it off (same checkpoint, one command)
    python scripts/bench_qlora.py --model llama32_11b_vision --seqs 2048 --systems ours --steps 6 --budget 150 \
      --out /tmp/ls_on > /dev/null 2>&1
    python scripts/bench_qlora.py --model llama32_11b_vision --seqs 2048 --systems ours --steps 6 --budget 120 \
      --ours-patches '{"vision_attention_split": false}' --out /tmp/ls_off > /dev/null 2>&1
    cp /tmp/ls_off/results.md "$out/split_off.md"; cp /tmp/ls_on/results.md "$out/split_on.md"
    cp /tmp/ls_on/workers.log "$out/split_on_workers.log"; grep "| ours" "$out/split_on.md" "$out/split_off.md"
    grep "CUDA graphs" "$out/split_on_workers.log" ;;
  memory)
    python scripts/bench_qlora.py --model llama32_11b_vision --seqs 2048 --systems ours --steps 2 --budget 150 \
      --out /tmp/mem_build > /dev/null 2>&1  # builds the checkpoint folder (and a step time for the record)
    tail -1 /tmp/mem_build/results.md
    timeout 150 python scripts/memory_peak.py --model llama32_11b_vision --seq 2048 --out /tmp/mem_on 2>&1 | tail -14
    timeout 150 python scripts/memory_peak.py --model llama32_11b_vision --seq 2048 --out /tmp/mem_off \
      --patches '{"cuda_graphs": false}' 2>&1 | tail -14
    cp /tmp/mem_on/memory_peak.md "$out/memory_peak_graphs_on.md"; cp /tmp/mem_off/memory_peak.md "$out/memory_peak_graphs_off.md"
    cp /tmp/mem_on/memory_peak.json "$out/memory_peak_graphs_on.json" ;;
  narrow_mem)  # ~9 minutes: GPU tests of the Mllama patches, the vision_mlp A/B at 2048, then what is alive at the peak
    timeout 120 python -m pytest -q tests/gpu/test_mllama_narrowing_gpu.py tests/gpu/test_mllama_split_gpu.py 2>&1 \
      | tail -15 > "$out/mllama_gpu_tests.txt"; tail -3 "$out/mllama_gpu_tests.txt"
    python scripts/bench_qlora.py --model llama32_11b_vision --seqs 2048 --systems ours --steps 6 --budget 130 \
      --out /tmp/nm_on > /dev/null 2>&1
    python scripts/bench_qlora.py --model llama32_11b_vision --seqs 2048 --systems ours --steps 6 --budget 80 \
      --ours-patches '{"vision_mlp": false}' --out /tmp/nm_off > /dev/null 2>&1
    cp /tmp/nm_on/results.md "$out/vision_mlp_on.md"; cp /tmp/nm_off/results.md "$out/vision_mlp_off.md"
    grep "| ours" "$out/vision_mlp_on.md" "$out/vision_mlp_off.md" | cut -c1-220
    timeout 130 python scripts/memory_peak.py --model llama32_11b_vision --seq 2048 --out /tmp/mem_on 2>&1 | tail -14
    cp /tmp/mem_on/memory_peak.md "$out/memory_peak_graphs_on.md"; cp /tmp/mem_on/memory_peak.json "$out/" ;;
  mem2)  # ~6 minutes
    python scripts/bench_qlora.py --model llama32_11b_vision --seqs 2048 8192 --systems ours --steps 6 --budget 200 \
      --out /tmp/m2 > /dev/null 2>&1
    cp /tmp/m2/results.md /tmp/m2/results.csv "$out/"; grep "| ours" "$out/results.md" | cut -c1-200
    for seq in 2048 8192; do
      timeout 150 python scripts/memory_peak.py --model llama32_11b_vision --seq $seq --out /tmp/mp$seq 2>&1 | head -4
      cp /tmp/mp$seq/memory_peak.md "$out/memory_peak_$seq.md"; cp /tmp/mp$seq/memory_peak.json "$out/memory_peak_$seq.json"
    done ;;
  table)  # ~8 minutes
    timeout 90 python -m pytest -q tests/gpu/test_cuda_graphs_gpu.py 2>&1 | tail -8 > "$out/graphs_tests.txt"
    tail -2 "$out/graphs_tests.txt"
    HF_FASTVISION_EXPANDABLE_SEGMENTS=0 python scripts/bench_qlora.py --model llama32_11b_vision --seqs 2048 8192 \
      --systems ours --steps 6 --budget 130 --out /tmp/t_noexp > /dev/null 2>&1
    cp /tmp/t_noexp/results.md "$out/ours_no_expandable.md"; grep "| ours" "$out/ours_no_expandable.md" | cut -c1-150
    python scripts/bench_qlora.py --model llama32_11b_vision --seqs 2048 8192 --systems ours unsloth --steps 6 \
      --budget 390 --out /tmp/t_main > /dev/null 2>&1
    cp /tmp/t_main/results.md /tmp/t_main/results.csv /tmp/t_main/workers.log "$out/"
    grep "| Llama" "$out/results.md" | cut -c1-150; grep "CUDA graphs" "$out/workers.log" ;;
  final)  # ~7 minutes
    python scripts/bench_qlora.py --model llama32_11b_vision --seqs 2048 8192 --systems ours unsloth --steps 6 \
      --budget 400 --out /tmp/f_main > /dev/null 2>&1
    cp /tmp/f_main/results.md /tmp/f_main/results.csv /tmp/f_main/workers.log "$out/"
    grep "| Llama" "$out/results.md" | cut -c1-150; grep "CUDA graphs\|allocator" "$out/workers.log"
    timeout 100 python -m pytest -q tests/gpu/test_cuda_graphs_gpu.py tests/kernels/test_gated_overwrite.py \
      tests/kernels/test_swiglu.py tests/kernels/test_geglu.py 2>&1 | tail -8 > "$out/gpu_tests.txt"; tail -2 "$out/gpu_tests.txt" ;;
  final_prof)  # ~9 minutes: kernel GPU tests, ours vs Unsloth same run, then a profile of ours at 8192
    timeout 70 python -m pytest -q tests/kernels/test_gated_overwrite.py tests/kernels/test_swiglu.py \
      tests/kernels/test_geglu.py 2>&1 | tail -8 > "$out/gpu_tests.txt"; tail -1 "$out/gpu_tests.txt"
    python scripts/bench_qlora.py --model llama32_11b_vision --seqs 2048 8192 --systems ours unsloth --steps 6 \
      --budget 370 --out /tmp/f_main > /dev/null 2>&1
    cp /tmp/f_main/results.md /tmp/f_main/results.csv /tmp/f_main/workers.log "$out/"
    grep "| Llama" "$out/results.md" | cut -c1-150; grep "CUDA graphs" "$out/workers.log"
    timeout 110 python scripts/profile_step.py --model llama32_11b_vision --seq 8192 --warmup 2 --steps 2 \
      --out "$out/profile_8192" 2>&1 | tail -1 ;;
  next)  # ~8 minutes: the load-time A/Bs (device map, expandable segments) and what makes Llama's 2048 peak
    timeout 60 python -m pytest -q tests/gpu/test_cuda_graphs_gpu.py 2>&1 | tail -8 > "$out/gpu_tests.txt"
    tail -1 "$out/gpu_tests.txt"
    python scripts/bench_qlora.py --model llama32_11b_vision --seqs 2048 8192 --systems ours unsloth hf --steps 6 \
      --budget 300 --out /tmp/n_main > /dev/null 2>&1
    cp /tmp/n_main/results.md /tmp/n_main/results.csv /tmp/n_main/workers.log "$out/"
    grep "| Llama" "$out/results.md" | cut -c1-150; grep "loaded in" "$out/workers.log" | cut -c1-160
    python scripts/bench_qlora.py --model llama32_11b_vision --seqs 2048 --systems ours --steps 2 --budget 90 \
      --ours-device-map '{"": 0}' --out /tmp/n_dm > /dev/null 2>&1
    cp /tmp/n_dm/workers.log "$out/device_map_workers.log"; grep "loaded in" "$out/device_map_workers.log" | cut -c1-160
    HF_FASTVISION_EXPANDABLE_SEGMENTS=0 python scripts/bench_qlora.py --model llama32_11b_vision --seqs 2048 \
      --systems ours --steps 2 --budget 90 --out /tmp/n_ne > /dev/null 2>&1  # does the allocator set-up cost load time?
    grep "loaded in" /tmp/n_ne/workers.log | cut -c1-160
    timeout 100 python scripts/memory_peak.py --model llama32_11b_vision --seq 2048 --out /tmp/mp2 2>&1 | head -3
    cp /tmp/mp2/memory_peak.md "$out/memory_peak_2048.md" ;;  # the cell still above Unsloth (8.81 vs 8.59 GiB)
  sixth)  # ~7 minutes: what the sixth session changed after its GPU time ran out (vision-split input permutation,
    # the loss skipping ignored rows, the lean MLP's no-adapter path), against that session's ours rows
    # (Qwen 0.265 / 0.838 s, Llama 0.579 / 1.360 s; scripts/results/h200_2026-12-01f_*)
    timeout 120 python -m pytest -q tests/kernels/test_gated_overwrite.py tests/kernels/test_lora_linear_4bit.py \
      tests/kernels/test_fused_linear_cross_entropy.py tests/gpu/test_cuda_graphs_gpu.py \
      tests/gpu/test_mllama_split_gpu.py 2>&1 | tail -8 > "$out/gpu_tests.txt"; tail -1 "$out/gpu_tests.txt"
    for m in llama32_11b_vision qwen2_5_vl_7b; do
      python scripts/bench_qlora.py --model $m --seqs 2048 8192 --systems ours --steps 6 --budget 150 \
        --out /tmp/s_$m > /dev/null 2>&1
      cp /tmp/s_$m/results.csv "$out/${m}_ours.csv"; grep "| ours" /tmp/s_$m/results.md | cut -c1-200
    done ;;
  seventh)  # ~6 minutes: the load-time A/B of the device map (default, {"": 0}, default again: file-cache order),
    # then a profile of ours at Llama 8192, the cell furthest from its target (1.18x Unsloth, target 1.25x)
    python scripts/bench_qlora.py --model llama32_11b_vision --seqs 2048 8192 --systems ours --steps 3 --budget 220 \
      --out /tmp/v_a > /dev/null 2>&1
    python scripts/bench_qlora.py --model llama32_11b_vision --seqs 2048 --systems ours --steps 2 --budget 90 \
      --ours-device-map '{"": 0}' --out /tmp/v_b > /dev/null 2>&1
    python scripts/bench_qlora.py --model llama32_11b_vision --seqs 2048 --systems ours --steps 2 --budget 90 \
      --out /tmp/v_c > /dev/null 2>&1
    for v in a b c; do grep -h "loaded in" /tmp/v_$v/worker_ours.log /tmp/v_$v/workers.log 2>/dev/null | head -1 \
      | cut -c1-150; done | tee "$out/load_device_map_ab.txt"
    python scripts/bench_scaling.py prepare --model llama32_11b_vision --seq 8192 --batch 1 > /dev/null 2>&1
    timeout 150 python scripts/profile_step.py --model llama32_11b_vision --seq 8192 --warmup 2 --steps 2 \
      --out "$out/profile_8192" 2>&1 | tail -2 ;;
  rope_ab)  # ~8 minutes: the rope patch (seventh session, on by default, unmeasured): GPU tests of the kernel and
    # of real graphs with it, then ours with rope off and on (default) on both models at 2048+8192
    timeout 100 python -m pytest -q tests/kernels/test_rope.py tests/gpu/test_cuda_graphs_gpu.py \
      tests/gpu/test_rope_patch_gpu.py 2>&1 | tail -8 > "$out/gpu_tests.txt"; tail -1 "$out/gpu_tests.txt"
    ours_off_on '{"rope": false}' rope 130 90 ;;
  dense_ab)  # ~9 minutes: GPU tests of the dense split calls and of the rope patch; ours with both Mllama splits as
    # the one varlen call (the seventh session's code path); then the table run, ours (dense, the default) and Unsloth
    timeout 80 python -m pytest -q tests/gpu/test_mllama_split_gpu.py tests/gpu/test_rope_patch_gpu.py \
      tests/gpu/test_cuda_graphs_gpu.py 2>&1 | tail -12 > "$out/gpu_tests.txt"; tail -1 "$out/gpu_tests.txt"
    python scripts/bench_qlora.py --model llama32_11b_vision --seqs 2048 8192 --systems ours --steps 6 --budget 120 \
      --ours-patches '{"vision_attention_split": "varlen", "cross_attention_split": "varlen"}' --out /tmp/d_varlen \
      > /dev/null 2>&1
    cp /tmp/d_varlen/results.csv "$out/ours_varlen.csv"; grep "| ours" /tmp/d_varlen/results.md | cut -c1-200
    python scripts/bench_qlora.py --model llama32_11b_vision --seqs 2048 8192 --systems ours unsloth --steps 6 \
      --budget 350 --out /tmp/d_main > /dev/null 2>&1
    cp /tmp/d_main/results.md /tmp/d_main/results.csv /tmp/d_main/workers.log "$out/"
    grep "| Llama\|^| |" "$out/results.md" | cut -c1-200; grep "CUDA graphs" "$out/workers.log" ;;
  lean_ab)  # ~9 minutes: the lean MLP recompute (default) on CUDA graphs, then off/on for both models
    timeout 70 python -m pytest -q tests/gpu/test_cuda_graphs_gpu.py 2>&1 | tail -8 > "$out/gpu_tests.txt"
    tail -1 "$out/gpu_tests.txt"
    ours_off_on '{"mlp_lean_recompute": false}' lean 120 100 ;;
  lean_chunks)  # ~6 minutes: the lean MLP with 2048-token chunks (more dequantization, a smaller peak) at 8192
    for m in llama32_11b_vision qwen2_5_vl_7b; do
      python scripts/bench_qlora.py --model $m --seqs 8192 --systems ours --steps 5 --budget 120 \
        --ours-patches '{"mlp_lean_recompute": 2048}' --out /tmp/lc_$m > /dev/null 2>&1
      cp /tmp/lc_$m/results.csv "$out/${m}_lean_2048.csv"; grep "| ours" /tmp/lc_$m/results.md | cut -c1-200
    done ;;
  probe)  # ~3 minutes (builds the folder first)
    python scripts/bench_qlora.py --model llama32_11b_vision --seqs 2048 --systems ours --steps 3 --budget 120 \
      --out /tmp/p_build > /dev/null 2>&1; grep "| Llama" /tmp/p_build/results.md | cut -c1-150
    timeout 150 python scripts/memory_peak.py --model llama32_11b_vision --seq 2048 --out /tmp/probe \
      --probe vision_model multi_modal_projector 2>&1 | tail -6
    cp /tmp/probe/memory_peak.md /tmp/probe/memory_peak.json "$out/" ;;
  cross_ab)  # ~8 minutes: what the fourth session built after its GPU time ran out, measured
    timeout 150 python -m pytest -q tests/gpu/test_mllama_cross_split_gpu.py tests/gpu/test_cuda_graphs_gpu.py \
      tests/gpu/test_mllama_split_gpu.py 2>&1 | tail -8 > "$out/gpu_tests.txt"; tail -2 "$out/gpu_tests.txt"
    python scripts/bench_qlora.py --model llama32_11b_vision --seqs 2048 8192 --systems ours --steps 6 --budget 150 \
      --out /tmp/c_off > /dev/null 2>&1
    python scripts/bench_qlora.py --model llama32_11b_vision --seqs 2048 8192 --systems ours --steps 6 --budget 110 \
      --ours-patches '{"cross_attention_split": true}' --out /tmp/c_on > /dev/null 2>&1
    python scripts/bench_qlora.py --model llama32_11b_vision --seqs 2048 8192 --systems ours --steps 6 --budget 110 \
      --ours-patches '{"cuda_graphs_lazy_backward": true}' --out /tmp/c_lazy > /dev/null 2>&1
    cp /tmp/c_lazy/results.csv "$out/lazy_backward.csv"; grep "| Llama" /tmp/c_lazy/results.md | cut -c1-170
    cp /tmp/c_off/results.csv "$out/cross_off.csv"; cp /tmp/c_on/results.csv "$out/cross_on.csv"
    cp /tmp/c_on/workers.log "$out/cross_on_workers.log"
    grep "| Llama" /tmp/c_off/results.md /tmp/c_on/results.md | cut -c1-170; grep "CUDA graphs" "$out/cross_on_workers.log"
    timeout 120 python scripts/memory_peak.py --model llama32_11b_vision --seq 2048 --out /tmp/probe \
      --probe vision_model multi_modal_projector 2>&1 | tail -4
    cp /tmp/probe/memory_peak.md "$out/" ;;
  attention)  # ~3 minutes, no checkpoint needed: the text self-attention backends (cuDNN's forward runs at half
    # its backward's rate at 8192), then Mllama's vision attention variants
    timeout 200 python scripts/bench_text_attention.py --seqs 2048 8192 --out "$out" 2>&1 | tail -24
    timeout 150 python scripts/bench_mllama_vision_attention.py --tiles 1 4 --out "$out" 2>&1 | tail -10 ;;
  mva)
    timeout 300 python scripts/bench_mllama_vision_attention.py --tiles 1 4 --out "$out" 2>&1 | tail -12 ;;
  nf4)
    timeout 120 python scripts/bench_nf4_matmul.py --rows 1 8 16 --out "$out" 2>&1 | tail -20 ;;
  *)
    echo "usage: bash scripts/gpu_plan.sh first|ninth|tenth|qwen_four|first_steps|tests|seventh|rope_ab|dense_ab|llama|llama8k|split_four|split_ab|memory|mem2|table|final|final_prof|next|lean_ab|lean_chunks|probe|cross_ab|qwen|generate|attention|mva|nf4" >&2; exit 2 ;;
esac
