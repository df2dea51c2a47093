"""The fast twins: the same arithmetic as the reading path in model.py and attention.py, in forms
that run faster or in less memory. Each module says what its reference is, where it is used and
why; tests check each against its reference.

    rope_op.py          Eq. 5 as one fused op on CUDA and under torch.compile (model.rotate_pairs' twin)
    rotation_table.py   e^{i m theta_d} in two factors, for the table Dynamic Scaling rebuilds at
                        every decoding step (model.rotation_table's twin)
    decode_kernel.py    a float32 decoding step on the CPU in C: attention as one kernel
                        (decode_attention.c), rotating pre-RoPE keys as it reads them
                        (model.CachedKeys + attention's twin), and the linear layers' GEMV
                        split over the threads (decode_linear.c; `Linear`, nn.Linear's twin)
"""
from .decode_kernel import Linear
from .rope_op import fused as fused_rope
from .rotation_table import rotation_table
