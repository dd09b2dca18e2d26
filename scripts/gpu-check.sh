#!/usr/bin/env bash
# The GPU check: runs ON a GPU machine (CUDA 13 driver, NVRTC, cuBLAS, compute-sanitizer; no
# Rust, no network), from the repository root of the carried tree, with the binaries that
# scripts/gpu-package.sh built and stripped (default folder gpu-bundle/).
#
# Usage: bash scripts/gpu-check.sh [RESULTS_JSON]
#   RESULTS_JSON  default: $OUT/gpu-results.json where OUT is set, else ./gpu-results.json
# Environment:
#   GPU_BUNDLE           folder of the carried binaries (default gpu-bundle)
#   GPU_CHECK_BUDGET_S   wall-clock budget of the whole check in seconds (default 540: 9 min)
#   LLAMA_BIN            a llama.cpp CUDA build of llama-bench: benched beside moe-serve
#   LLAMA_SRC            a llama.cpp source tree: llama-bench is built from it in the
#                        background (CUDA, sm_90) when LLAMA_BIN is unset, with a deadline
#   LLAMA_BUILD_S        that build's deadline in seconds (default 300)
#   GPU_CHECK_PRESET, GPU_CHECK_LAYERS
#                        the benched model (default bench-m with 12 layers; smaller ones
#                        are for dry runs of this script on machines without a GPU)
#
# Steps, each with its own timeout inside the budget; a failed or timed-out step is recorded
# and the check goes on:
#   environment, CUDA libraries     what the machine has; library folders put on the path
#   synth (background)              bench-m with 12 layers (+ its GGUF twin for llama.cpp)
#   gpu tests                       the `gpu-*` test binary (kernel parity, every fixture on
#                                   cuda against transformers and the CPU, eviction churn)
#   run, memcheck, racecheck        a short `moe-serve run` on cuda, then under
#                                   compute-sanitizer --tool memcheck and --tool racecheck
#   plan + bench x4                 `moe-serve run --json` on bench-m: every expert in VRAM,
#                                   VRAM budgets of an 8 GB and a 24 GB card, and the CPU
#   llama-bench x2                  -ngl 99, and -ngl 99 --n-cpu-moe N (N = 12: every layer's
#                                   experts on the CPU, and the N that fits an 8 GB card)
# It writes ONE results file: every step's command, exit status, duration, parsed figures and
# the tail of its log, written atomically (temporary file, then rename).
set -uo pipefail

# ---- budget ---------------------------------------------------------------------------------
BUDGET_S=${GPU_CHECK_BUDGET_S:-540}
# Kept back from every step's timeout for writing the results file.
RESERVE_S=8
# A step that would get less than this is skipped (too short to say anything).
MIN_STEP_S=5
# A step's log tail kept in the results (enough for a panic message and its context).
LOG_TAIL_LINES=40
START_S=$(date +%s)

# ---- folders ----------------------------------------------------------------------------------
ROOT=$(pwd)
BUNDLE=${GPU_BUNDLE:-gpu-bundle}
RESULTS=${1:-${OUT:+$OUT/gpu-results.json}}
RESULTS=${RESULTS:-$ROOT/gpu-results.json}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
STEPS="$WORK/steps.jsonl"
: >"$STEPS"
export XDG_CACHE_HOME="$WORK/xdg-cache" XDG_STATE_HOME="$WORK/xdg-state"
export HF_HUB_OFFLINE=1
CACHE_DIR="$WORK/cache"
mkdir -p "$CACHE_DIR"
SERVE="$BUNDLE/moe-serve"
LINKED_ROOT=""
BG_PIDS=()

# shellcheck disable=SC2317 # invoked by the EXIT trap
cleanup() {
    local p
    for p in "${BG_PIDS[@]}"; do
        kill -- "$p" 2>/dev/null
    done
    if [[ -n "$LINKED_ROOT" && -L "$LINKED_ROOT" ]]; then
        rm -f "$LINKED_ROOT"
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

now_s() { date +%s; }
left_s() { echo $((BUDGET_S - ($(now_s) - START_S))); }

# ---- JSON -------------------------------------------------------------------------------------
# A JSON string of $1 (control characters other than newline and tab dropped).
json_str() {
    local s
    s=$(printf '%s' "$1" | tr -d '\000-\010\013\014\016-\037')
    s=${s//\\/\\\\}
    s=${s//\"/\\\"}
    s=${s//$'\n'/\\n}
    s=${s//$'\t'/\\t}
    s=${s//$'\r'/}
    printf '"%s"' "$s"
}

# Whether $1 is one valid JSON value (python3 or jq; without either, nothing is trusted).
is_json() {
    if command -v python3 >/dev/null 2>&1; then
        printf '%s' "$1" | python3 -c 'import json,sys; json.load(sys.stdin)' 2>/dev/null
    elif command -v jq >/dev/null 2>&1; then
        printf '%s' "$1" | jq -e . >/dev/null 2>&1
    else
        return 1
    fi
}

# $1 as raw JSON when it is valid JSON, else as a string; null when empty.
json_value() {
    if [[ -z "$1" ]]; then
        printf 'null'
    elif is_json "$1"; then
        printf '%s' "$1"
    else
        json_str "$1"
    fi
}

# The command line $@, shell-quoted.
cmd_str() {
    local out="" a
    for a in "$@"; do
        out+="$(printf '%q' "$a") "
    done
    printf '%s' "${out% }"
}

# record NAME STATUS RC SECONDS COMMAND RESULT_JSON LOG [EXTRA_JSON_FIELDS]
record() {
    local extra=${8:-}
    printf '{"name":%s,"status":%s,"rc":%s,"seconds":%s,"command":%s,"result":%s,"log_tail":%s%s}\n' \
        "$(json_str "$1")" "$(json_str "$2")" "$3" "$4" "$(json_str "$5")" "$6" \
        "$(json_str "$7")" "${extra:+,$extra}" >>"$STEPS"
    echo "gpu-check: $1: $2 (rc $3, $4 s)" >&2
}

# run_step NAME CAP_S CMD...: runs CMD with a timeout of min(CAP_S, what the budget leaves);
# its stdout is the step's result (JSON when it is JSON), the tail of both streams its log.
# Sets STEP_RC and STEP_OUT for the caller.
run_step() {
    local name=$1 cap=$2
    shift 2
    local t
    t=$(($(left_s) - RESERVE_S))
    ((t > cap)) && t=$cap
    STEP_RC=125
    STEP_OUT=""
    if ((t < MIN_STEP_S)); then
        record "$name" skipped null 0 "$(cmd_str "$@")" null "no time left in the ${BUDGET_S} s budget"
        return 0
    fi
    local out="$WORK/$name.out" err="$WORK/$name.err" t0 t1
    t0=$(date +%s.%N)
    timeout -k 5 "$t" "$@" >"$out" 2>"$err"
    STEP_RC=$?
    t1=$(date +%s.%N)
    local secs status
    secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
    case $STEP_RC in
    0) status=ok ;;
    124 | 137) status="timeout after ${t} s" ;;
    *) status=failed ;;
    esac
    STEP_OUT=$(cat "$out")
    local log
    log=$(tail -n "$LOG_TAIL_LINES" "$err")
    if ((STEP_RC != 0)) && [[ -s "$out" ]] && ! is_json "$STEP_OUT"; then
        log+=$'\n--- stdout ---\n'$(tail -n "$LOG_TAIL_LINES" "$out")
    fi
    record "$name" "$status" "$STEP_RC" "$secs" "$(cmd_str "$@")" "$(json_value "$STEP_OUT")" \
        "$log" "${STEP_EXTRA:-}"
    STEP_EXTRA=""
}
STEP_EXTRA=""

# ---- environment --------------------------------------------------------------------------------
# Puts the folder holding library $1 on LD_LIBRARY_PATH unless the loader already finds it.
find_lib() {
    local name=$1 d
    if ldconfig -p 2>/dev/null | grep -q "$name"; then
        echo "$name: ldconfig"
        return 0
    fi
    local dirs=(/usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/local/cuda/lib64
        /usr/local/cuda/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu)
    local d2
    for d2 in /usr/local/cuda-13*/lib64 /usr/local/cuda-13*/targets/x86_64-linux/lib; do
        [[ -d "$d2" ]] && dirs+=("$d2")
    done
    if command -v python3 >/dev/null 2>&1; then
        local site
        site=$(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null)
        for d2 in $site; do
            for d in "$d2"/nvidia/*/lib "$d2"/nvidia/cu13/lib; do
                [[ -d "$d" ]] && dirs+=("$d")
            done
        done
    fi
    local have
    IFS=: read -r -a have <<<"${LD_LIBRARY_PATH:-}"
    for d in "${have[@]}"; do
        if [[ -n "$d" && -e "$d/$name" ]]; then
            echo "$name: $d (LD_LIBRARY_PATH)"
            return 0
        fi
    done
    for d in "${dirs[@]}"; do
        if [[ -e "$d/$name" ]]; then
            export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
            echo "$name: $d"
            return 0
        fi
    done
    d=$(timeout 20 find / -xdev -name "$name" -print -quit 2>/dev/null)
    if [[ -n "$d" ]]; then
        d=$(dirname "$d")
        export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        echo "$name: $d"
        return 0
    fi
    echo "$name: NOT FOUND"
    return 1
}

env_report() {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "cores: $(nproc)"
    echo "kernel: $(uname -r)"
    echo "memory: $(awk '/MemTotal/ { print $2 " kB" }' /proc/meminfo)"
    nvidia-smi --query-gpu=name,memory.total,memory.free,driver_version,clocks.max.sm \
        --format=csv,noheader 2>&1 | sed 's/^/gpu: /'
    command -v compute-sanitizer >/dev/null && compute-sanitizer --version 2>&1 | tail -n 1 |
        sed 's/^/compute-sanitizer: /'
    command -v nvcc >/dev/null && nvcc --version 2>&1 | tail -n 1 | sed 's/^/nvcc: /'
    [[ -f "$BUNDLE/MANIFEST" ]] && sed 's/^/bundle: /' "$BUNDLE/MANIFEST"
}
# Not in a command substitution: find_lib's export must stay in this shell.
for l in libcuda.so.1 libnvrtc.so.13 libnvrtc-builtins.so.13.0 libcublas.so.13; do
    find_lib "$l" >>"$WORK/libs.txt" 2>&1
done
LIBS=$(cat "$WORK/libs.txt")
export LD_LIBRARY_PATH
t0=$(now_s)
ENV=$(env_report)
record environment ok 0 $(($(now_s) - t0)) "env_report" \
    "$(json_str "$ENV"$'\n'"$LIBS"$'\n'"LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}")" ""

# ---- the bundle -----------------------------------------------------------------------------------
TEST_BINS=("$BUNDLE"/gpu-*)
if [[ ! -x "$SERVE" || ! -x "${TEST_BINS[0]}" || ${#TEST_BINS[@]} -ne 1 ]]; then
    record bundle failed 1 0 "ls $BUNDLE" null \
        "expected $BUNDLE/moe-serve and exactly one $BUNDLE/gpu-* (run scripts/gpu-package.sh and carry $BUNDLE): $(ls -l "$BUNDLE" 2>&1)"
fi
TEST_BIN=${TEST_BINS[0]}
# The test binary reads the fixtures from the folder it was built in: point that path here.
BUILD_ROOT=$(sed -n 's/^build_root=//p' "$BUNDLE/MANIFEST" 2>/dev/null)
if [[ -n "$BUILD_ROOT" && "$BUILD_ROOT" != "$ROOT" ]]; then
    if [[ ! -e "$BUILD_ROOT" ]]; then
        mkdir -p "$(dirname "$BUILD_ROOT")" && ln -s "$ROOT" "$BUILD_ROOT" && LINKED_ROOT=$BUILD_ROOT
    elif [[ ! -f "$BUILD_ROOT/tests/fixtures/index.json" ]]; then
        record fixtures failed 1 0 "ls $BUILD_ROOT" null \
            "$BUILD_ROOT exists here without the fixtures; the gpu tests will not find them"
    fi
fi

# ---- background work: llama.cpp build, bench-m synthesis ---------------------------------------
LLAMA_BUILD_S=${LLAMA_BUILD_S:-300}
LLAMA_BUILD_PID=""
LLAMA_BUILD_LOG="$WORK/llama-build.log"
if [[ -z "${LLAMA_BIN:-}" && -n "${LLAMA_SRC:-}" ]]; then
    LLAMA_BIN="$WORK/llama-build/bin/llama-bench"
    LLAMA_BUILD_CMD="cmake -S $LLAMA_SRC -B $WORK/llama-build -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90-real -DGGML_CUDA_FA_ALL_QUANTS=OFF -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release && cmake --build $WORK/llama-build --target llama-bench -j $(nproc)"
    LLAMA_BUILD_T0=$(now_s)
    timeout -k 5 "$LLAMA_BUILD_S" bash -c "$LLAMA_BUILD_CMD" >"$LLAMA_BUILD_LOG" 2>&1 &
    LLAMA_BUILD_PID=$!
    BG_PIDS+=("$LLAMA_BUILD_PID")
fi
WANT_LLAMA=""
[[ -n "${LLAMA_BIN:-}" ]] && WANT_LLAMA=1

BENCH_MODEL="$WORK/bench-m"
BENCH_GGUF="$WORK/bench-m.gguf"
BENCH_PRESET=${GPU_CHECK_PRESET:-bench-m}
BENCH_LAYERS=${GPU_CHECK_LAYERS:-12}
SYNTH_CMD=("$SERVE" synth --preset "$BENCH_PRESET" --layers "$BENCH_LAYERS" --seed 0
    --out "$BENCH_MODEL")
[[ -n "$WANT_LLAMA" ]] && SYNTH_CMD+=(--gguf "$BENCH_GGUF")
# Synthesis is disk and CPU work that overlaps the tests (which time nothing); at most 240 s
# (bench-m with 12 layers is 7.8 GB, its twin as much again).
SYNTH_T0=$(now_s)
timeout -k 5 240 "${SYNTH_CMD[@]}" >"$WORK/synth.out" 2>"$WORK/synth.err" &
SYNTH_PID=$!
BG_PIDS+=("$SYNTH_PID")

# ---- the gpu tests ---------------------------------------------------------------------------------
# 4 test threads: the GPU tests share one device and each loads models with 4 compute threads.
STEP_EXTRA=""
run_step gpu_tests 200 env MOE_GPU_REQUIRED=1 "$TEST_BIN" --test-threads 4 --nocapture
TEST_LOG="$WORK/gpu_tests.err"
# The per-kernel and per-fixture figures the tests print, and the summary line.
grep -h '^gpu-metric ' "$WORK/gpu_tests.out" "$TEST_LOG" 2>/dev/null | sed 's/^gpu-metric //' \
    >"$WORK/metrics.jsonl"
if command -v python3 >/dev/null 2>&1; then
    # One JSON array of the lines that parse (a line cut by a killed test is dropped).
    METRICS=$(python3 -c '
import json, sys
out = []
for line in open(sys.argv[1]):
    try:
        out.append(json.loads(line))
    except ValueError:
        pass
print(json.dumps(out))' "$WORK/metrics.jsonl")
else
    METRICS="[$(paste -sd, "$WORK/metrics.jsonl")]"
    is_json "$METRICS" || METRICS=$(json_str "$(cat "$WORK/metrics.jsonl")")
fi
SUMMARY=$(grep -h '^test result:' "$WORK/gpu_tests.out" "$TEST_LOG" 2>/dev/null | tail -n 1)
FAILED_TESTS=$(grep -h -E '^test .* \.\.\. FAILED' "$WORK/gpu_tests.out" "$TEST_LOG" 2>/dev/null |
    sed 's/^test //; s/ \.\.\. FAILED$//' | tr '\n' ' ')
record gpu_test_figures "$([[ -n "$SUMMARY" ]] && echo ok || echo failed)" 0 0 \
    "grep gpu-metric (from gpu_tests)" "$METRICS" "$SUMMARY" \
    "\"summary\":$(json_str "$SUMMARY"),\"failed_tests\":$(json_str "$FAILED_TESTS")"

# ---- a short run on cuda, then under compute-sanitizer -----------------------------------------------
FIXTURE="tests/fixtures/qwen3_moe/model"
SHORT_IDS="1,2,3,4,5,6,7"
SHORT_RUN=("$SERVE" run --model "$FIXTURE" --device cuda --cache-dir "$CACHE_DIR"
    --prompt-ids "$SHORT_IDS" --max-tokens 4 --temperature 0 --ignore-eos --threads 4 --json)
# The plain run first also compiles the kernels into the cache, so the sanitized runs time
# the kernels, not NVRTC.
run_step run_fixture_cuda 60 "${SHORT_RUN[@]}"
if command -v compute-sanitizer >/dev/null 2>&1; then
    for tool in memcheck racecheck; do
        run_step "sanitizer_$tool" 90 compute-sanitizer --tool "$tool" --error-exitcode 3 \
            --print-limit 20 "${SHORT_RUN[@]}"
    done
else
    record sanitizer_memcheck skipped null 0 "compute-sanitizer" null "compute-sanitizer is not on the PATH"
    record sanitizer_racecheck skipped null 0 "compute-sanitizer" null "compute-sanitizer is not on the PATH"
fi

# ---- wait for the background work -----------------------------------------------------------------
# Waits for background job PID, killing it once the budget has less than KEEP_S left (the
# steps after it need that time), and records it.
wait_bg() { # NAME PID T0 LOG CMD_STRING KEEP_S
    local rc killed=""
    while kill -0 "$2" 2>/dev/null; do
        if (($(left_s) < $6)); then
            kill -- "$2" 2>/dev/null
            killed=" (stopped: the budget keeps $6 s for the steps after it)"
            break
        fi
        sleep 1
    done
    wait "$2"
    rc=$?
    local status=ok
    ((rc == 124 || rc == 137)) && status=timeout
    ((rc != 0 && rc != 124 && rc != 137)) && status=failed
    [[ -n "$killed" ]] && status="timeout$killed"
    record "$1" "$status" "$rc" $(($(now_s) - $3)) "$5" null "$(tail -n "$LOG_TAIL_LINES" "$4" 2>/dev/null)"
    return "$rc"
}
# The benches need about 2 minutes (4 runs of moe-serve, 2 or 3 of llama-bench).
wait_bg synth_bench_m "$SYNTH_PID" "$SYNTH_T0" "$WORK/synth.err" "$(cmd_str "${SYNTH_CMD[@]}")" 120
SYNTH_RC=$?
if [[ -n "$LLAMA_BUILD_PID" ]]; then
    # The benches below compute experts on the CPU: they start after the build, never beside it.
    wait_bg llama_build "$LLAMA_BUILD_PID" "$LLAMA_BUILD_T0" "$LLAMA_BUILD_LOG" "$LLAMA_BUILD_CMD" 120 ||
        LLAMA_BIN=""
fi

# ---- decode and prefill on bench-m -------------------------------------------------------------------
# A 512-token prompt (prefill) and 64 greedy tokens (decode), ids spread over the vocabulary.
PROMPT_IDS=$(awk 'BEGIN { for (i = 0; i < 512; i++) printf "%s%d", (i ? "," : ""), (i * 7919 + 13) % 32000 }')
DECODE_TOKENS=64
BENCH_ARGS=(--cache-dir "$CACHE_DIR" --prompt-ids "$PROMPT_IDS" --max-tokens "$DECODE_TOKENS"
    --temperature 0 --ignore-eos --json)
# Every expert in VRAM: as many slots per layer as the model has experts (bench-m: 64), the
# VRAM budget left at the planner's default (the free memory minus its margin).
EXPERTS=$(sed -n 's/.*"num_experts": *\([0-9][0-9]*\).*/\1/p' "$BENCH_MODEL/config.json" 2>/dev/null |
    head -n 1)
ALL_VRAM_TOML="$WORK/all-experts-in-vram.toml"
cat >"$ALL_VRAM_TOML" <<EOF
model = "$BENCH_MODEL"
device = "cuda"
[experts]
slots_per_layer = ${EXPERTS:-64}
EOF
# Cards are emulated by the VRAM budgets the project's configs give them: an 8 GB card 7 GiB
# (configs/gpu-8gb-ram-64gb.toml), a 24 GB card 22 GiB (configs/gpu-24gb.toml).
declare -A BENCH=(
    [all_experts_in_vram]="--config $ALL_VRAM_TOML"
    [vram_8gb_card]="--model $BENCH_MODEL --device cuda --vram-budget 7GiB"
    [vram_24gb_card]="--model $BENCH_MODEL --device cuda --vram-budget 22GiB"
    [cpu]="--model $BENCH_MODEL --device cpu"
)
figures() { # the run --json fields the comparison needs, as JSON fields
    local v=$1
    if is_json "$v" && command -v python3 >/dev/null 2>&1; then
        printf '%s' "$v" | python3 -c '
import json, sys
r = json.load(sys.stdin)
keys = ["prefill_tokens_per_s", "decode_tokens_per_s", "prefill_ms", "decode_ms", "load_ms",
        "prompt_tokens", "completion_tokens", "device", "peak_rss_bytes", "vram"]
out = {k: r.get(k) for k in keys}
e = r.get("experts") or {}
out["experts"] = {k: e.get(k) for k in ["hits", "misses", "bytes_moved", "stall_ms",
                                        "copy_bytes_per_s", "host_compute_bytes_per_s"]}
print(json.dumps({"figures": out})[1:-1])'
    fi
}
if ((SYNTH_RC == 0)); then
    for name in all_experts_in_vram vram_8gb_card vram_24gb_card cpu; do
        read -r -a flags <<<"${BENCH[$name]}"
        run_step "plan_$name" 30 "$SERVE" plan "${flags[@]}" --json
        run_step "bench_$name" 120 "$SERVE" run "${flags[@]}" "${BENCH_ARGS[@]}"
        if ((STEP_RC == 0)); then
            f=$(figures "$STEP_OUT")
            [[ -n "$f" ]] && record "figures_$name" ok 0 0 "from bench_$name" "{$f}" ""
        fi
    done
else
    record bench skipped null 0 "moe-serve run ($BENCH_PRESET)" null "$BENCH_PRESET was not written (see synth_bench_m)"
fi

# ---- llama.cpp on the GGUF twin ---------------------------------------------------------------------
if [[ -n "${LLAMA_BIN:-}" && -x "${LLAMA_BIN:-}" && -f "$BENCH_GGUF" ]]; then
    # N for an 8 GB card: the layers whose experts do not fit in 7 GiB beside everything else.
    N8=$BENCH_LAYERS
    if command -v python3 >/dev/null 2>&1; then
        N8=$(python3 - "$BENCH_MODEL" "$BENCH_LAYERS" <<'EOF' 2>/dev/null || echo "$BENCH_LAYERS"
import glob, json, os, sys
d, layers = sys.argv[1], int(sys.argv[2])
c = json.load(open(os.path.join(d, "config.json")))
total = sum(os.path.getsize(f) for f in glob.glob(os.path.join(d, "*.safetensors")))
expert_layer = c["num_experts"] * 3 * c["hidden_size"] * c["moe_intermediate_size"] * 2
resident = total - layers * expert_layer
fit = max(0, (7 * 2**30 - resident - 2**30) // expert_layer)  # 1 GiB for KV and compute buffers
print(max(0, layers - fit))
EOF
        )
    fi
    LLAMA_ARGS=(-m "$BENCH_GGUF" -p 512 -n "$DECODE_TOKENS" -r 2 -o json)
    run_step llama_bench_ngl99 120 "$LLAMA_BIN" "${LLAMA_ARGS[@]}" -ngl 99
    run_step "llama_bench_ngl99_n_cpu_moe_$BENCH_LAYERS" 120 "$LLAMA_BIN" "${LLAMA_ARGS[@]}" -ngl 99 --n-cpu-moe "$BENCH_LAYERS"
    if [[ "$N8" != "$BENCH_LAYERS" ]]; then
        run_step "llama_bench_ngl99_n_cpu_moe_${N8}_8gb_card" 120 "$LLAMA_BIN" "${LLAMA_ARGS[@]}" -ngl 99 --n-cpu-moe "$N8"
    fi
elif [[ -n "$WANT_LLAMA" ]]; then
    record llama_bench skipped null 0 "${LLAMA_BIN:-llama-bench}" null \
        "llama-bench unavailable (LLAMA_BIN not executable or its build failed) or the GGUF twin missing"
else
    record llama_bench skipped null 0 "llama-bench" null \
        "no llama.cpp: set LLAMA_BIN (a CUDA llama-bench) or LLAMA_SRC (a source tree to build); the GGUF twin comes from moe-serve synth --gguf"
fi

# ---- the results file ----------------------------------------------------------------------------------
ELAPSED=$(($(now_s) - START_S))
tmp="$RESULTS.tmp-$$"
mkdir -p "$(dirname "$RESULTS")"
{
    printf '{"check":"moe-offload gpu-check","started_at":%s,"elapsed_s":%s,"budget_s":%s,' \
        "$(json_str "$(date -u -d "@$START_S" +%Y-%m-%dT%H:%M:%SZ)")" "$ELAPSED" "$BUDGET_S"
    printf '"steps":['
    paste -sd, "$STEPS"
    printf ']}\n'
} >"$tmp"
mv -f "$tmp" "$RESULTS"
echo "gpu-check: results in $RESULTS ($ELAPSED s of $BUDGET_S)" >&2
# Exit status: 0 when every step that ran passed.
if grep -q '"status":"\(failed\|timeout\)' "$STEPS"; then
    exit 1
fi
exit 0
