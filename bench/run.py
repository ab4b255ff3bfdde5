"""`make bench`: run every bench/bench_*.py in turn; each prints its own table."""

import subprocess
import sys
from pathlib import Path

here = Path(__file__).parent
failed = 0
for script in sorted(here.glob("bench_*.py")):
    print(f"== {script.name}", flush=True)
    failed += subprocess.run([sys.executable, str(script), *sys.argv[1:]]).returncode != 0
sys.exit(1 if failed else 0)
