"""The values a config field may take where it names one of several implementations.

Declared once, without jax, for config validation (sora_jax/config.py), for the code that dispatches
on them and for binaries' flag checks; a test checks each dispatching module handles exactly these.
"""

ATTENTION_BACKENDS = ("auto", "xla", "xla_chunked", "cudnn", "splash", "ring", "all_to_all")
# Which key tiles a query tile attends under model.sparse_attention_keep < 1 (model/sparse_attention.py).
SPARSE_ATTENTION_RULES = ("window", "topk", "window_topk")
CONTEXT_PARALLEL_BACKENDS = ("ring", "all_to_all")  # attention over a sequence split on `context`
REMAT_POLICIES = ("none", "full", "dots_saveable", "offload", "offload_dots")
PREDICTIONS = ("velocity", "x0")  # model.prediction: what the DiT outputs
DTYPES = ("float32", "bfloat16", "float16")  # model.param_dtype, model.compute_dtype
RESIDUAL_DTYPES = ("float32", "bfloat16")  # model.residual_dtype (fp16 would overflow the stream)
ENCODER_DTYPES = ("float32", "bfloat16")  # data.encoder_dtype
RECORD_DTYPES = ("bfloat16", "float16")  # data.record_dtype: latents and text embeddings on disk
SIGMA_SAMPLINGS = ("uniform", "logit_normal", "mode")
SAMPLERS = ("euler", "unipc")
SCHEDULES = ("constant", "cosine", "wsd")
VAES = ("wan", "pixel")
VALIDATION_MODES = ("error", "skip")  # data.validation: a bad record stops the run or is skipped
# train.host_state: trees kept in pinned host memory (`frozen`: a LoRA run's frozen projection weights)
HOST_STATE_PARTS = ("ema", "opt_state", "frozen")
LORA_BASE_DTYPES = ("float32", "bfloat16")  # train.lora_base_dtype: the frozen weights of a LoRA run
INIT_OPTIMIZER = ("restart", "carry")  # train.init_optimizer: what a run started from another run keeps
EXPERTS = ("high", "low")  # train.train_experts with model.experts = 2: high-noise and low-noise DiT
