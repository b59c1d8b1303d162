"""Fast fake quantization: qatdist's C++ ops (`native_ops`, source in `csrc/`), the fake-quant
modules that call them (`fast_fake_quant`) and the conv-BN weight scaling fused into them
(`weight_scaling`)."""
