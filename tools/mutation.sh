#!/usr/bin/env bash
# Mutation testing with mutmut (3.8.x), module by module; NOT part of CI (hours on 2 cores for every module).
#
#   tools/mutation.sh                                   # every configured module, one after the other
#   tools/mutation.sh m2f_deploy.artifact               # one module (a dotted name; mutants are named after it)
#   tools/mutation.sh --score m2f_deploy.artifact ...   # only print the scores of what has run
#
# What is mutated and which tests judge it: [tool.mutmut] in pyproject.toml. mutmut copies the package into
# ./mutants and runs the tests there: PYTHONPATH must not point at the work tree, or the tests would import the
# unmutated package and every mutant would "survive". `mutmut results` lists survivors, `mutmut show NAME` the change.
set -euo pipefail
cd "$(dirname "$0")/.."
unset PYTHONPATH
MODULES=(m2f_deploy.artifact m2f_deploy.export.agreement m2f_deploy.export.validate m2f_deploy.cli.common
         m2f_deploy.cli.export m2f_deploy.cli.predict m2f_deploy.cli.validate m2f_deploy.cli.bench)
score_only=0
if [[ "${1:-}" == "--score" ]]; then score_only=1; shift; fi
(($#)) && MODULES=("$@")
if ((!score_only)); then
  for module in "${MODULES[@]}"; do
    # one child: the machine is shared; nice: stay out of the way of interactive work
    nice -n 15 mutmut run --max-children 1 "${module}.*" >/dev/null
  done
fi
mutmut results --all true 2>/dev/null | python3 -c '
import collections, sys
modules = sys.argv[1:]
counts = collections.defaultdict(collections.Counter)
for line in sys.stdin:
    name, _, status = line.strip().rpartition(": ")
    module = next((m for m in modules if name.startswith(m + ".")), None)
    if module:
        counts[module][status] += 1
print("| module | mutants | killed | survived | timeout | not checked | score |")
print("|---|---|---|---|---|---|---|")
for m in modules:
    c = counts[m]
    killed, survived, timeout, unchecked = c["killed"], c["survived"], c["timeout"], c["not checked"]
    judged = killed + survived + timeout
    score = f"{100 * (killed + timeout) / judged:.1f} %" if judged else "-"
    print(f"| {m} | {sum(c.values())} | {killed} | {survived} | {timeout} | {unchecked} | {score} |")
' "${MODULES[@]}"
