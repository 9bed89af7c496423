"""DeepSpeed configs shipped with jsarag (zero0..3, zero3_offload): ``deepspeed.config: zero2.json`` picks one."""
