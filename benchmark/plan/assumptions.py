"""The planner's stated assumptions: efficiencies, fixed costs and memory constants, calibrated
where docs/paper_scale.md's validation says (the CUDA values are stated, not measured)."""

from __future__ import annotations

# Model forward FLOP/s reached, as a fraction of a square matmul's on the same device and
# dtype. CPU: calibrated on the validation sweeps (SmolLM2's hooked truncated forward, batch
# 32 x 128). CUDA: not measured (no GPU here); a typical eager-PyTorch value at >= 8k tokens
# per pass.
MODEL_EFFICIENCY = {"cpu": 0.85, "cuda": 0.4}
# The LM set's passes take longer than their FLOPs say: the log-softmax over the vocabulary
# (CE, KL), the splices, and one extra chunked pass per member. CPU: measured 1.6-1.8x on the
# smoke group (SmolLM2, vocabulary 49k, d_model 576); CUDA: not measured.
LM_EVAL_FACTOR = {"cpu": 1.7, "cuda": 1.2}
# SAE steps on a device this machine lacks, by train.precision: an H100/H200's dense peak in
# fp32 (no TF32: 67 TFLOP/s), TF32 (495) and bf16 (989) over its bf16 peak ...
FP32_RATIO = 0.068
PRECISION_RATIO = {"fp32": FP32_RATIO, "tf32": 0.5, "bf16": 1.0}
# ... and a step reaches about this fraction of that in its six dense products.
SAE_EFFICIENCY = 0.5
STARTUP_SECONDS = 8.0  # one process: imports and composition (~5 s here), the model boot
CONVERT_SECONDS = 15.0  # the bundled GGUF dequantised once per cache_dir (benchmark.models)
JOB_SECONDS = 0.5  # per job: its config and folder, the SAE and the record written
TOKENIZE_SECONDS = 2.5  # per 1M tokens windowed (measured: ~400k tokens/s, bundled corpus)
HOST_BASE_BYTES = 1.5e9  # Python + torch + transformers
READER_BUFFER_BYTES = 256 * 2**20  # the cached store's shuffle buffer (buffer_mb)
SAE_STATE_COPIES = 4  # fp32 weights, gradients, Adam's exp_avg and exp_avg_sq
SAE_STEP_TENSORS = 4  # batch x d_sae fp32 tensors alive in a step
STEP_SECONDS = 0.5  # time SAE steps of at most about this long (else a smaller shape, scaled)
TIMED_SECONDS = 1.5  # per architecture, after the warm-up step
MIN_WIDTH, MIN_BATCH = 2048, 256
DEFAULT_DEVICE_MEMORY = 80e9  # a CUDA device this machine lacks (an 80 GB H100); --device-memory
