"""Run every benchmark in bench/ in turn (each prints its own side-by-side ratios)."""

import subprocess
import sys
from pathlib import Path

here = Path(__file__).resolve().parent
failed = 0
for script in sorted(here.glob("bench_*.py")):
    print(f"\n=== {script.name}", flush=True)
    failed |= subprocess.run([sys.executable, str(script)], cwd=here).returncode
sys.exit(failed)
