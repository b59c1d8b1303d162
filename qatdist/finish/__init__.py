"""The end of a run and what is measured against it: `finalize` (convert, compile, measure,
write `final/`), `baselines` (the float and PTQ references), `accuracy_budget` (layers back to
fp32 until the metric's drop is within budget), `export` and `openvino_ir` (deployable artifacts
rebuilt from a run folder)."""
