#!/usr/bin/env bash
# normkit's GPU check in one command: correctness, then timing, then the summary, each phase a
# process of its own in its own time box, every result written under the output folder as it
# comes (benchmarks/GPU.md says what is measured and how to read it).
#
#   bash benchmarks/gpu_check.sh [--quick] [--dry-run] [--resume] [OUTPUT_DIR]
#
# --resume keeps the checks and measurements an earlier run finished in OUTPUT_DIR and runs
# the rest (those its time limits skipped).
# OUTPUT_DIR defaults to $OUT (the device tool's folder that comes back), else gpu_results;
# another folder is copied to $OUT at the end when $OUT is set.
# Files: log.txt, correctness.{json,md}, timing.{json,md}, summary.md.
# Exit status: 0 when every correctness check passed, else that phase's status (1 a failure,
# 3 stopped by its time limit, 4 the device context was lost, 124/137 killed by the time box).
# --dry-run: the same phases on the CPU with small shapes (the Triton kernels in Triton's
# interpreter), as tests/test_gpu_check.py runs it.
set -u
cd "$(dirname "$0")/.." || exit 2

quick=0 dry=0 resume=() out=${OUT:-gpu_results}
for arg in "$@"; do
    case $arg in
        --quick) quick=1 ;;
        --dry-run) dry=1 ;;
        --resume) resume=(--resume) ;;
        -*) echo "gpu_check.sh: unknown option $arg (options: --quick, --dry-run, --resume, then an output folder)" >&2
            exit 2 ;;
        *) out=$arg ;;
    esac
done
mkdir -p "$out" || exit 2
log=$out/log.txt
[ ${#resume[@]} = 0 ] && : >"$log"

# Seconds per phase (the Python limit stops starting checks; the time box kills 20 s later)
# and for the whole script, which no phase may overrun: full, 500 s at the very most (about
# 4 minutes expected), so that a --quick rerun (240 s at most) still fits in a 15-minute
# device lease with the machine's start.
correctness_limit=210 timing_limit=210 budget=500
flags=()
if [ $quick = 1 ]; then correctness_limit=100 timing_limit=100 budget=240 flags+=(--quick); fi
if [ $dry = 1 ]; then correctness_limit=400 timing_limit=400 budget=1000 flags+=(--dry-run); export TRITON_INTERPRET=1; fi

export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python=${PYTHON:-python3}

note() { echo "== gpu_check: $*" | tee -a "$log"; }

run_phase() {  # phase, planned limit, seconds to leave for what follows, extra flags...
    local phase=$1 limit=$2 reserve=$3
    shift 3
    local left=$((budget - SECONDS - reserve - 30))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 20 ]; then
        note "$phase phase not run: the script's budget of ${budget}s is spent"
        return 3
    fi
    note "$phase phase, limit ${limit}s"
    timeout -k 10 $((limit + 20)) "$python" benchmarks/gpu_check.py --phase "$phase" --out "$out" \
        --time-limit "$limit" "${flags[@]}" "$@" 2>&1 | tee -a "$log"
    return "${PIPESTATUS[0]}"
}

note "started $(date -u '+%Y-%m-%d %H:%M:%S') UTC in $PWD, output in $out"
if [ $dry = 0 ]; then
    nvidia-smi 2>&1 | tee -a "$log" || note "nvidia-smi is not available"
fi
# The CPU library is a build output git ignores, so a fresh copy of the tree lacks it (the
# opcheck of the CPU operators needs it); the loader refuses a library in a group- or
# world-writable folder.
if [ ! -f normkit/kernels/libnormkit_cpu.so ]; then
    chmod go-w normkit/kernels 2>/dev/null
    note "building the CPU kernels"
    timeout 90 "$python" -m normkit.kernels._build 2>&1 | tail -n 5 | tee -a "$log"
fi

run_phase correctness "$correctness_limit" $((timing_limit + 30)) "${resume[@]}"
correctness=$?
case $correctness in
    0 | 1 | 2 | 3) ;;
    *)  # killed or the device context was lost: finished checks are kept, the rest run again
        note "correctness phase ended with status $correctness; resuming it in a fresh process"
        run_phase correctness $((correctness_limit / 2)) $((timing_limit / 2 + 30)) --resume
        correctness=$? ;;
esac

run_phase timing "$timing_limit" 0 "${resume[@]}"
timing=$?
note "timing phase status $timing"

if [ $timing != 0 ]; then  # each phase writes summary.md as it ends; a phase that died did not
    "$python" benchmarks/gpu_check.py --phase summary --out "$out" "${flags[@]}" >/dev/null 2>>"$log"
fi
note "finished $(date -u '+%H:%M:%S') UTC: correctness status $correctness, timing status $timing; see $out/summary.md"
if [ -n "${OUT:-}" ] && [ "$(cd "$out" && pwd)" != "$(cd "$OUT" 2>/dev/null && pwd)" ]; then
    cp "$out"/* "$OUT"/  # the device tool brings back $OUT only
fi
exit "$correctness"
