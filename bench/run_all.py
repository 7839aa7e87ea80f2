"""Run every benchmark in bench/ (make bench). Each prints ratios against its own baseline."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SKIP = {"run_all.py", "llama_cpp_convert.py"}


def main() -> int:
    failed = []
    for script in sorted(HERE.glob("bench_*.py")):
        if script.name in SKIP:
            continue
        print(f"\n=== {script.name} ===", flush=True)
        if subprocess.run([sys.executable, str(script)]).returncode:
            failed.append(script.name)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
