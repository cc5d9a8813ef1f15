"""The math of one training step for M models at once: tensors in, tensors out.

data (the task and each model's split), models (the study's MLP, the transformer), optim (AdamW and the
field's gradient filters), measures (the Fourier and norm readouts), step (forward, fused loss, backward,
update, clamp as one compilable function). No files, no pandas; imports only torch, config and kernels.
"""
from fastgrok import _submodules_on_first_use

__getattr__, __all__ = _submodules_on_first_use(__name__, __path__)
