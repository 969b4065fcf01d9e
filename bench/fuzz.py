"""Property-based fuzzing at scale: thousands of random CNNs (tests/fuzz_models.py) through
apply(), identity initialisation and remove(), with the invariants of tests/test_fuzz.py.

    python bench/fuzz.py [--examples 2000] [--seed 0]
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from hypothesis import HealthCheck, given, seed, settings  # noqa: E402

from fuzz_models import check, nets  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench/out/fuzz.md"))
    args = ap.parse_args()
    outcomes: Counter = Counter()
    blocks: Counter = Counter()
    start = time.perf_counter()

    @seed(args.seed)
    @settings(max_examples=args.examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(nets())
    def run(case):
        net, expected = case
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outcomes[check(net, expected)] += 1
        blocks[expected] += 1
        n = sum(outcomes.values())
        if n % 100 == 0:
            print(f"[{n}/{args.examples}] {dict(outcomes)} "
                  f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)

    failure = None
    try:
        run()
    except Exception as exc:  # hypothesis reports the shrunk example
        failure = f"{type(exc).__name__}: {exc}"
    n = sum(outcomes.values())
    lines = [f"# se-inject fuzzing: {n} random CNNs (seed {args.seed})", "",
             f"- invariants held: {'no, ' + failure.splitlines()[0] if failure else 'all'}",
             f"- outcomes: gated and identity-checked {outcomes['gated']}; gated, identity init "
             "refused (IdentityInitError: no layer it may scale) "
             f"{outcomes['identity refused']}; "
             f"refused, no block {outcomes['refused']}",
             "- gates per net: " + ", ".join(f"{k}: {v}" for k, v in sorted(blocks.items())),
             f"- time: {time.perf_counter() - start:.0f} s"]
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    sys.exit(1 if failure else 0)


if __name__ == "__main__":
    main()
