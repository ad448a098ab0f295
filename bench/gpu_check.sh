#!/bin/bash
# Device-machine checks: the projector benchmark on CUDA and CPU/CUDA equality of the seeded matrices.
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv
python3 - <<'PY'
import torch
from lightning_dfa.projectors import OPU, SeededGaussian, Structured
for make in (lambda: SeededGaussian(3000, 5000, seed=3), lambda: Structured(3000, 5000, seed=3),
             lambda: OPU(3000, 5000, seed=3, camera=False, encoding=None)):
    cpu, gpu = make(), make().cuda()
    x = torch.randn(64, 3000)
    a, b = cpu(x), gpu(x.cuda()).cpu()
    m = (cpu.ideal_matrix() if isinstance(cpu, OPU) else cpu.materialize())
    mg = (gpu.ideal_matrix() if isinstance(gpu, OPU) else gpu.materialize()).cpu()
    print(type(cpu).__name__, "matrix equal:", torch.equal(m, mg), "max |diff|", (m - mg).abs().max().item(),
          "output rel diff", ((a - b).norm() / a.norm()).item())
PY
python3 bench/projectors.py --device cuda --repeats 3 --json $OUT/bench_cuda.json \
  --kinds gaussian,seeded,seeded:generator=device,structured,opu,opu:generator=device 2>&1 | tee $OUT/bench_cuda.txt | grep -v '^ \|^\[\|^\]\|^{\|^}'
