#!/usr/bin/env python3
"""Where the time of one speculative round goes: after one warm-up prompt, profile the next
prompt's speculative decode (torch.profiler, CPU and CUDA activities) and print the top ops by
self CPU and self CUDA time, and the round counts.

    python3 scripts/spec_profile.py DIR --share 0.3
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import qstream  # noqa: E402
from qstream.generate import SamplingConfig, load_tokenizer  # noqa: E402
from qstream.speculate import SpecConfig, speculative_generate  # noqa: E402
from spec_acceptance import PROMPTS  # noqa: E402
from spec_acceptance_indir import budget_for_share  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir")
    ap.add_argument("--share", type=float, default=0.3)
    ap.add_argument("--new-tokens", type=int, default=24)
    a = ap.parse_args()
    budget, _ = budget_for_share(Path(a.dir), a.share)
    m = qstream.load(a.dir, gpu_memory=budget, draft=True, max_seq=1024, draft_max_seq=1024, max_slots=3, progress=False)
    tok = load_tokenizer(a.dir)
    cfg, spec = SamplingConfig(max_new_tokens=a.new_tokens), SpecConfig(budget=64, fallback=False)
    speculative_generate(m, m.draft, tok, [PROMPTS[0]], cfg, spec)  # warm-up: compilation
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if m.device.type == "cuda" else [])
    t = time.perf_counter()
    with torch.profiler.profile(activities=acts) as p:
        r = speculative_generate(m, m.draft, tok, [PROMPTS[1]], cfg, spec)
    wall = time.perf_counter() - t
    st = r.spec
    print(f"{st.passes} passes, {sum(st.draft_forwards)} draft forwards, {wall:.2f} s wall (profiled), "
          f"draft {sum(st.draft_s):.2f} s, verify {sum(st.verify_s):.2f} s")
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
    if m.device.type == "cuda":
        print(p.key_averages().table(sort_by="self_cuda_time_total", row_limit=12))
    m.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
