"""Embedded torch trainer backend: a HF causal LM trained with the OPD loss on CPU or one GPU.

``TorchTrainRayActor`` (actor.py) is the training rank; model.py holds batching and the sparse
LM head, loss.py the wiring to ``ta_opd.losses``, checkpoint.py atomic verified checkpoints.
"""
