#!/usr/bin/env bash
# Reproduce the committed laptop results: bash docs/results/run.sh NAME [NAME ...]
# Each NAME runs one sweep into outputs/results/ (its own study directory) and copies the report, the
# command, the wall time and the git sha into docs/results/NAME/ (the report folder holds the raw curves,
# curves.csv and runs.csv, that recompute it: docs/outputs.md). A re-run skips finished points.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=outputs/results

args_of() {
    case "$1" in
        default)         echo "-m granularity=1,8" ;;
        lr_sweep)        echo "-m study=lr_sweep model.init=normal" ;;  # the init before the tuned preset
        lr_sweep_fan_in) echo "-m study=lr_sweep model.init=fan_in study.name=lr_sweep_fan_in optim.lr=0.001,0.003,0.01,0.03" ;;
        lr_sweep_2m)     echo "-m study=lr_sweep tokens=2000000 optim.lr=0.005,0.01,0.02 study.name=lr_sweep_2m" ;;
        probe_normal_init) echo "-m granularity=1,8 model.init=normal optim.lr=0.003 study.name=probe_normal_init" ;;
        granularity)     echo "-m study=granularity" ;;
        token_budget)    echo "-m study=token_budget tokens=500000,1000000,4000000 seed=0,1" ;;
        router_order)    echo "-m study=router_order seed=0,1" ;;
        *) echo "unknown result name $1" >&2; exit 2 ;;
    esac
}

for name in "$@"; do
    args=$(args_of "$name")
    study=$name  # each NAME is also its study.name
    out=docs/results/$name
    mkdir -p "$out" "$ROOT"
    sha=$(git rev-parse --short HEAD)
    # results are written into docs/results/ as they finish: only changes elsewhere make the code dirty
    dirty=$(git status --porcelain --untracked-files=no -- . ':!docs/results' | grep -q . && echo " (uncommitted changes)" || true)
    start=$(date +%s)
    # shellcheck disable=SC2086
    python -m studies.run $args paths.root=$ROOT 2>&1 | tee "$out/log.txt"
    wall=$(( $(date +%s) - start ))
    rm -rf "$out/report"
    cp -r "$ROOT/$study/report" "$out/report"
    # the committed copies name paths relative to the checkout, not this machine's
    find "$out" -name '*.md' -o -name '*.txt' -o -name '*.csv' | xargs sed -i "s#$PWD/##g"
    cat > "$out/README.md" <<EOF
# $name

- command: \`python -m studies.run $args paths.root=$ROOT\`
- git sha: \`$sha\`$dirty
- wall time: ${wall} s on $(nproc) cores ($(uname -m)), started $(date -u -d @"$start" +%Y-%m-%dT%H:%MZ)
- report: [report/report.md](report/report.md); sweep log: [log.txt](log.txt)
- raw curves: [report/curves.csv](report/curves.csv) (run x step), [report/runs.csv](report/runs.csv) (run);
  recompute the report from them: \`python -m analysis.report --from-curves docs/results/$name/report --study-dir <out>\`
EOF
    echo "== $name: ${wall} s -> $out"
done
