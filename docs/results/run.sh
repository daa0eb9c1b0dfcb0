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
        lr_sweep)        echo "-m study=lr_sweep" ;;
        granularity)     echo "-m study=granularity granularity=1,8" ;;  # G=2,4: the same study without granularity=1,8 (resumes)
        token_budget)    echo "-m study=token_budget tokens=500000,1000000,4000000 seed=0,1,2" ;;
        router_order)    echo "-m study=router_order seed=0,1" ;;
        equal_resources) echo "-m study=equal_resources seed=0,1" ;;
        # WSD parents of 2M and their cooldown branches; analysis.branch_check compares them with the cosine
        # runs of token_budget (0.5M, 1M) and granularity (2M): run those two first
        branch_check)    echo "-m study.name=branch_check granularity=1,8 seed=0,1,2 tokens=500000,1000000,2000000 optim=wsd optim.decay_shape=1-sqrt branch_from=2000000" ;;
        scaling_law)     echo "study=scaling_law" ;;  # a study preset is a sweep without -m (~2.5 h; resumes)
        *) echo "unknown result name $1 (default, lr_sweep, granularity, token_budget, router_order, equal_resources, branch_check, scaling_law)" >&2; exit 2 ;;
    esac
}

machine_facts() {
    python -c 'import torch; print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} torch threads in this shell")'
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
- machine: $(machine_facts) (per run: summary.json "machine", report/runs.csv machine.*)
- report: [report/report.md](report/report.md); sweep log: [log.txt](log.txt)
- raw curves: [report/curves.csv](report/curves.csv) (run x step), [report/runs.csv](report/runs.csv) (run);
  recompute the report from them: \`python -m analysis.report --from-curves docs/results/$name/report --study-dir <out>\`
EOF
    if [ "$name" = branch_check ]; then
        python -m analysis.branch_check "$ROOT/branch_check" --against "$ROOT/token_budget" "$ROOT/granularity" \
            --csv "$out/report/branch_vs_cosine.csv" | tee "$out/branch_vs_cosine.txt"
    fi
    echo "== $name: ${wall} s -> $out"
done
