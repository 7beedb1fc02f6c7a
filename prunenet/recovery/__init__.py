"""Recovering what pruning lost, without data: LoRA self-distillation on the teacher's own text."""
