"""Benchmark: load a full-size random 7B checkpoint on the CPU and compute logits for 8 tokens.

Reports the load time and the peak resident memory of `mistral logits` (measured by GNU time),
against the checkpoint's size on disk. Target: peak RSS <= 1.15 x checkpoint size.

    python scripts/bench_load.py [--weights weights/random-7b] [--dtype bfloat16]

Makes the checkpoint first (bf16, Mistral format, ~14.5 GB, about 1.5 minutes) if it is not there.
"""

import argparse
import platform
import re
import subprocess
import sys
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, default=Path("weights/random-7b"))
    p.add_argument("--dtype", default="bfloat16")
    a = p.parse_args()
    if not (a.weights / "consolidated.safetensors").exists():
        subprocess.run([sys.executable, "-m", "mistral.cli", "make-random", str(a.weights), "--preset", "7b-v0.3",
                        "--format", "consolidated", "--dtype", "bfloat16"], check=True)
    size = sum(f.stat().st_size for f in a.weights.glob("*.safetensors"))
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "mistral.cli", "-v", "logits", str(a.weights),
           "--tokens", "1,3,1000,4,5,6,7,8", "--dtype", a.dtype, "--out", "/tmp/bench_load_logits.safetensors"]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode:
        sys.exit(run.stderr)
    err = run.stderr
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", err).group(1)) * 1024
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", err).group(1)
    load = re.search(r"load time: ([\d.]+) s", err).group(1)
    cpu = platform.processor() or platform.machine()
    print(f"machine: {platform.node()} ({cpu}), {__import__('os').cpu_count()} cores")
    print(f"checkpoint: {a.weights} ({size / 1e9:.2f} GB on disk)")
    print(f"load time: {load} s   whole command (load + 8-token forward, {a.dtype}): {wall}")
    print(f"peak RSS: {rss / 1e9:.2f} GB = {rss / size:.3f} x checkpoint size (target <= 1.15)")


if __name__ == "__main__":
    main()
