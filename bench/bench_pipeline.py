"""Wall time of the whole `make run` pipeline, per stage, on a fresh copy of the repo.

Runs `tinyldm run` (default params unless --set is given) in a temp copy so the
workspace is untouched, then prints each stage's seconds and share of the total.
Usage: python bench/bench_pipeline.py [--set KEY=VALUE ...]
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def main(argv: list[str]) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="tinyldm-bench-"))
    try:
        files = subprocess.check_output(["git", "ls-files", "-co", "--exclude-standard"],
                                        cwd=ROOT, text=True).splitlines()
        for f in files:
            if (ROOT / f).is_file():
                (tmp / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / f, tmp / f)
        for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                    ["git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "b"]):
            subprocess.run(cmd, cwd=tmp, check=True)
        env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", CI="1",
                   PREFECT_HOME=str(tmp / ".prefect"))
        env.pop("MLFLOW_TRACKING_URI", None)
        t0 = time.monotonic()
        r = subprocess.run([str(BIN / "tinyldm"), "run", *argv], cwd=tmp, env=env,
                           capture_output=True, text=True)
        total = time.monotonic() - t0
        if r.returncode:
            print(r.stdout[-3000:], r.stderr[-3000:])
            return 1
        stages = json.loads((tmp / "reports" / "pipeline_run.json").read_text())
        print(f"{'stage':10s} {'seconds':>8s} {'share':>6s}")
        for s in stages:
            print(f"{s['stage']:10s} {s['seconds']:8.1f} {s['seconds'] / total:6.1%}")
        print(f"{'total':10s} {total:8.1f}  (incl. flow start-up "
              f"{total - sum(s['seconds'] for s in stages):.1f} s)")
        images = json.loads((tmp / "reports/metrics/scrape.json").read_text())["images"]
        print(f"images: {images}")
        out = ROOT / "bench" / "out"
        out.mkdir(exist_ok=True)
        (out / "pipeline.json").write_text(json.dumps(
            {"total_s": total, "images": images, "stages": stages, "args": argv}, indent=2))
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
