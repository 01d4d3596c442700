#!/usr/bin/env bash
# Train the bundled model on one GPU in a single short lease (about 8 minutes), as docs/TRAINING.md describes.
#
#   scripts/gpu_training.sh prepare   here, once: fills .carry/ (git-ignored) with what the GPU machine lacks:
#                                     SimpleITK for its Python 3.12, unpacked and recompressed with xz (28 MB instead
#                                     of the wheel's 52 MB: the device tool carries 64 MiB a call, tracked files
#                                     included), and a copy of the real data (../shared/data); prints what travels
#   scripts/gpu_training.sh seg       there, with .carry: trains the MR vertebra segmentation network
#                                     (srr-train-segmentation) in SEG_VARIANTS side by side on the one GPU for
#                                     SEG_MINUTES, each resuming from .carry/seg/<variant>/last.pt or SEG_RESUME when
#                                     present; leaves each variant's last.pt in $OUT and their curves and logs in
#                                     $OUT/seg_logs.tar.gz
#   scripts/gpu_training.sh run       there, from the repository root, with .carry carried along: checks the GPU
#                                     synthesis against the CPU's (pytest), trains stage 1 (default_gpu_baseline) and
#                                     stage 2 (default_gpu) within their schedule.max_minutes, exports the model with
#                                     its card to $OUT/model and packs the run folders into $OUT/runs.tar.gz
#
# A later lease continues where this one stopped: put that runs.tar.gz at .carry/runs.tar.gz and `run` again
# (stage 1 resumes; stage 2 starts afresh from stage 1's new best). Environment: OUT (default out/gpu), DEVICE
# (default cuda), STAGE1 / STAGE2 (configs, default default_gpu_baseline / default_gpu), STAGE1_MINUTES /
# STAGE2_MINUTES (override the configs' max_minutes), DEVICE_LABEL (the model card's training hardware).
set -euo pipefail
cd "$(dirname "$0")/.."

prepare() {
    local version=2.5.3 tmp
    tmp=$(mktemp -d)
    mkdir -p .carry/data
    rm -rf .carry/whl  # the wheel of earlier versions of this script
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d "$tmp/whl" "SimpleITK==$version"
    python3 -m zipfile -e "$tmp"/whl/*.whl "$tmp/site"
    tar cf - -C "$tmp/site" . | xz -9 -T0 >.carry/simpleitk.tar.xz
    rm -rf "$tmp"
    cp -r ../shared/data/totalsegmentator-examples .carry/data/
    python3 - <<'PY'
import pathlib, subprocess
tracked = subprocess.run(["git", "ls-files", "-z"], capture_output=True, check=True).stdout.split(b"\0")
size = sum(pathlib.Path(p.decode()).stat().st_size for p in tracked if p and pathlib.Path(p.decode()).is_file())
carry = sum(p.stat().st_size for p in pathlib.Path(".carry").rglob("*") if p.is_file())
total = (size + carry) / 2**20
print(f"travels with .carry: {size / 2**20:.1f} MiB tracked + {carry / 2**20:.1f} MiB .carry = {total:.1f} MiB (limit 64)")
if total > 63:
    raise SystemExit("over the device tool's 64 MiB: carry less, or move a committed training state out for the call")
PY
}

run() {
    local out=${OUT:-out/gpu} device=${DEVICE:-cuda} runs=/tmp/srr-runs
    local stage1=${STAGE1:-default_gpu_baseline} stage2=${STAGE2:-default_gpu}
    mkdir -p "$out" "$runs"
    setup_python
    export SRR_SHARED_DATA=$PWD/.carry/data
    local label=${DEVICE_LABEL:-}
    if [[ -z $label && $device == cuda* ]]; then
        label="1x $(python3 -c 'import torch; print(torch.cuda.get_device_name(0))')"
    fi
    label=${label:-CPU}
    local train=(python3 -m SpineRigidRegLib.cli.train --device "$device" --real-data-dir .carry/data --no-tensorboard)
    # Stage 1 always resumes (a carried runs.tar.gz, or an earlier call on the same warm machine; else it starts at
    # step 0); stage 2 starts afresh from stage 1's best.
    [[ -f .carry/runs.tar.gz ]] && tar xzf .carry/runs.tar.gz -C "$runs"
    rm -rf "${runs:?}/$stage2"
    if [[ $device == cuda* ]]; then
        python3 -m pytest -q -p no:cacheprovider Testing/training/test_pairs.py Testing/training/test_trainer.py \
            -k gpu --tb=short 2>&1 | tail -60
    fi
    "${train[@]}" --config "$stage1" --out "$runs/$stage1" --resume \
        ${STAGE1_MINUTES:+--max-minutes "$STAGE1_MINUTES"} >"$out/stage1.log" 2>&1 || { tail -20 "$out/stage1.log"; return 1; }
    "${train[@]}" --config "$stage2" --out "$runs/$stage2" --init-from "$runs/$stage1/best.pt" \
        ${STAGE2_MINUTES:+--max-minutes "$STAGE2_MINUTES"} >"$out/stage2.log" 2>&1 || { tail -20 "$out/stage2.log"; return 1; }
    python3 -m SpineRigidRegLib.cli.train --export "$runs/$stage1" "$runs/$stage2" --out "$out/model" \
        --device-label "$label"
    for stage in "$stage1" "$stage2"; do
        echo "== $stage validation (identity: $(tail -1 "$runs/$stage/validation_identity.csv"))"
        cat "$runs/$stage/validation.csv"
        tail -2 "$runs/$stage/train.csv"
    done
    tar czf "$out/runs.tar.gz" --exclude=tensorboard -C "$runs" .
    ls -la "$out" "$out/model"
}

# SimpleITK from .carry/simpleitk.tar.xz when the machine lacks it (Python's own tarfile: no xz program needed).
setup_python() {
    if ! python3 -c "import SimpleITK" 2>/dev/null; then
        python3 -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='data')" \
            .carry/simpleitk.tar.xz /tmp/site
        export PYTHONPATH=/tmp/site
    fi
    export PYTHONPATH=$PWD/SpineRigidReg${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
}

# Variants trained side by side (a small UNet leaves most of one GPU idle): name and extra arguments.
SEG_VARIANTS=${SEG_VARIANTS:-"default: phantoms0:--phantoms,0 rot30:--rotation-deg,30,--phantoms,24 bigpatch:--patch,96,128,128,--batch,4"}

seg() {
    local out=${OUT:-out/gpu} device=${DEVICE:-cuda} minutes=${SEG_MINUTES:-7} runs=/tmp/srr-seg
    mkdir -p "$out" "$runs"
    setup_python
    local pids=() names=() variant name extra
    for variant in $SEG_VARIANTS; do
        name=${variant%%:*} extra=${variant#*:}
        mkdir -p "$runs/$name"
        # A carried state, else SEG_RESUME's (the committed training/mr_vertebrae/last.pt), continues; without
        # either, SEG_INIT's weights (e.g. the bundled model) start a new run when given.
        if [[ -f .carry/seg/$name/last.pt ]]; then
            cp ".carry/seg/$name/last.pt" "$runs/$name/"
        elif [[ -n ${SEG_RESUME:-} ]]; then
            cp "$SEG_RESUME" "$runs/$name/last.pt"
        fi
        # shellcheck disable=SC2086
        python3 -m SpineRigidRegLib.cli.train_segmentation --out "$runs/$name" --device "$device" \
            --real-data-dir .carry/data --max-minutes "$minutes" --decay-minutes "$minutes" --threads 4 \
            --batch "${SEG_BATCH:-8}" ${extra//,/ } \
            ${SEG_INIT:+--init-from "$SEG_INIT"} ${SEG_ARGS:-} >"$runs/$name/train.log" 2>&1 &
        pids+=($!) names+=("$name")
    done
    local i status=0
    for i in "${!pids[@]}"; do
        wait "${pids[$i]}" || { status=1; echo "== ${names[$i]} failed"; }
        echo "== ${names[$i]}"; tail -4 "$runs/${names[$i]}/curve.csv" 2>/dev/null; tail -2 "$runs/${names[$i]}/train.log"
        [[ -f $runs/${names[$i]}/last.pt ]] && cp "$runs/${names[$i]}/last.pt" "$out/${names[$i]}.pt"
    done
    tar czf "$out/seg_logs.tar.gz" --exclude='*.pt' -C "$runs" .
    return $status
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    seg) seg ;;
    *) echo "usage: $0 prepare|run|seg" >&2; exit 2 ;;
esac
