"""The integer backend: a converted model lowered to an integer program, and two executors of it.

``lowering`` turns a converted model into a flat program of integer steps (``program``);
``intref`` runs it on int64 tensors (the reference); ``simulate`` runs it with integers carried
in float32 or int8 kernels (exact, fast). Every quantized accuracy bitsweep reports comes from it.
"""
