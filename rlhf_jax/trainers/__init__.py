"""The three InstructGPT stages (plus base-model pretraining) on one shared host loop."""
