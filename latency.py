"""int8 vs fp32 latency of lraspp_mobilenet_v3_large at CamVid's full frame, batch 1 and 8."""
import time, torch
from qatdist.config import ModelConfig, QuantConfig
from qatdist.quant.model import QatModel
from qatdist.quant.convert import compile_for_inference
from qatdist.tasks.evaluate import side_by_side_latency_ms
torch.set_num_threads(2)
qat = QatModel.build(ModelConfig(name="lraspp_mobilenet_v3_large"), QuantConfig(), num_classes=11, image_size=64, seed=0, dense=True)
for _ in range(2):
    qat.prepared(torch.randn(2, 3, 96, 128))  # observers see data once (train mode)
int8 = compile_for_inference(qat.to_int8())
fp32 = compile_for_inference(qat.fp32_model.eval())
for b in (1, 8):
    x = torch.randn(b, 3, 360, 480)
    t0 = time.time()
    with torch.no_grad():
        int8(x); fp32(x)
    print("compiled batch", b, round(time.time() - t0, 1), "s", flush=True)
    ms = side_by_side_latency_ms({"int8": lambda t: int8(t), "fp32": lambda t: fp32(t)}, x, iters=10 if b == 1 else 5)
    print(f"batch {b}: int8 {ms['int8']:.1f} ms, fp32 {ms['fp32']:.1f} ms, int8/fp32 {ms['int8']/ms['fp32']:.2f}", flush=True)
