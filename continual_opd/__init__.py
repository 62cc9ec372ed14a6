"""continual-opd: fine-tune on your documents, then win back general skills with on-policy distillation.

Notation: every tensor name ends in its shape, one letter per dimension, and every module uses these letters:

    B   batch: rows (prompts, rollouts, examples) in a forward pass
    P   prompt positions (left-padded)
    L   response positions: the generated answer tokens (what the losses are computed on)
    T   full sequence positions, T = P + L (what the model's forward pass sees)
    V   vocabulary
    N   selected positions (e.g. the masked response tokens of a batch, flattened)

e.g. `ids_BT` (token ids of prompt + answer), `mask_BL` (1 on answer tokens up to the stop token), `logits_BLV`
(the logits that predict the L answer tokens). A scalar or a per-row value needs no suffix (`truncated_B` is per row).
"""

__version__ = "0.1.0"
